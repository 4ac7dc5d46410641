// The softmax cross-entropy row kernel and target check (cross_entropy.cpp), shared by the loss ops and the fused
// training step.
#pragma once

#include <cstdint>

namespace fastmnist::cpu {

// What one call of the row kernel reads and writes; cross_entropy.cpp's header gives the formulas. Pointers
// that are not needed are null.
template <typename T>
struct CERows {
  const T* x;          // (rows, C) logits
  int64_t C;
  const int64_t* y;    // class-index targets (rows,), or null
  const T* q;          // probability targets (rows, C), or null
  const T* w;          // class weights (C,) padded with zeros to a whole vector, or null
  int64_t ignore_index;
  T eps;               // label smoothing
  T w_sum;             // sum of the class weights (C without weights)
  double* lse;         // per-row log-sum-exp: written, or read when lse_in
  bool lse_in;
  T* loss;             // per-row loss
  T* grad;             // (rows, C) logit gradient; may alias x
  const T* gscale;     // grad_output per row (stride gscale_stride; 0 for a scalar), times gmul
  int64_t gscale_stride;
  T gmul;
  T* grad_q;           // gradient of the probability targets
};

// Loss and/or gradient of rows [0, rows), in parallel.
template <typename T>
void cross_entropy_rows(const CERows<T>& p, int64_t rows);

// The same for rows [r0, r1) only, on the calling thread (for callers that split the rows themselves).
template <typename T>
void cross_entropy_row_range(const CERows<T>& p, int64_t r0, int64_t r1);

// Checks the class-index targets y (rows,) before any row is read: each in [0, C) or equal to ignore_index, else
// an IndexError naming the value. Returns the mean's divisor: the summed class weights w (or null: the count) of
// the kept targets.
template <typename T>
double check_targets_and_weight_sum(const char* op, const int64_t* y, int64_t rows, int64_t C, const T* w,
                                    int64_t ignore_index);

}  // namespace fastmnist::cpu
