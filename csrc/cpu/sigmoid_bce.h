// The sigmoid-BCE row kernel (sigmoid_bce.cpp), shared by the loss ops and the fused training step.
#pragma once

#include <cstdint>

namespace fastmnist::cpu {

// What one call of the row kernel reads and writes; sigmoid_bce.cpp's header gives the formulas. Pointers that
// are not needed are null. The call is a forward pass when loss or row_sum is set, else a backward pass.
template <typename T>
struct BCERows {
  const T* x;       // logits, rows of C
  const T* y;       // targets, laid out as x
  const T* w;       // weight, or null
  int64_t w_ld;     // 0: (C,) per class, C: (rows, C)
  const T* pw;      // pos_weight, or null
  int64_t pw_ld;
  int64_t C;        // row length
  int64_t total;    // elements in all rows: the last row may be shorter than C
  T* loss;          // (rows, C) elementwise loss (reduction none), or null
  double* row_sum;  // (rows,) per-row loss sums, or null
  const T* g;       // grad_loss: (rows, C) when g_ld == C, else a scalar (g_ld == 0)
  int64_t g_ld;
  T gmul;
  T* grad_x;        // or null
  T* grad_y;        // or null
};

// Forward or backward of rows [0, rows), in parallel.
template <typename T>
void sigmoid_bce_rows(const BCERows<T>& p, int64_t rows);

}  // namespace fastmnist::cpu
