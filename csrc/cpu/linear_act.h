// The CPU linear+activation kernels as functions that write into given tensors, shared by the linear_act ops
// and the fused training step.
#pragma once

#include <ATen/core/Tensor.h>

#include "activation.h"

namespace fastmnist {

// Whether a layer with this many outputs runs on our own small-output kernels rather than BLAS. Only those read a
// gathered input in place (the row_index arguments below; for wider layers the caller gathers the batch into a
// buffer first) and have the row-range entries at the end.
bool linear_small_output(int64_t out_features);

// y (m, n) = act(x2d (m, k) @ w (n, k)^T + b (n,) or no bias when undefined); all contiguous, same dtype.
// With row_index (m,) int64 defined, row r of the input is x2d's row row_index[r] (indices already checked).
void linear_act_forward_into(at::Tensor& y, const at::Tensor& x2d, const at::Tensor& w, const at::Tensor& b,
                             Activation act, double negative_slope, const at::Tensor& row_index = {});

// From the output y (m, n) and its gradient g: gz = g * act'(y) (skipped when gz is undefined or the activation
// is the identity, where gz is g) and grad_bias (n,) = column sums of gz (skipped when undefined; summed in a
// fixed order). gz may be g itself (in place).
void linear_act_grad_pre_into(at::Tensor& gz, at::Tensor& grad_bias, const at::Tensor& g, const at::Tensor& y,
                              Activation act, double negative_slope);

// grad_x (m, k) = gz (m, n) @ w (n, k); all contiguous, same dtype.
void linear_grad_input_into(at::Tensor& grad_x, const at::Tensor& gz, const at::Tensor& w);

// grad_w (n, k) = gz (m, n)^T @ x2d (m, k); all contiguous, same dtype; row_index as above.
void linear_grad_weight_into(at::Tensor& grad_w, const at::Tensor& gz, const at::Tensor& x2d,
                             const at::Tensor& row_index = {});

// Plain SGD's update of a linear layer's weight, w (n, k) -= lr * gz (m, n)^T @ x2d (m, k), as one GEMM with
// beta = 1 and alpha = -lr where the weight gradient goes through BLAS (n above the small-output limit): the
// gradient is never written and read back. Returns false, doing nothing, for the small-output layers, whose
// own kernels write the gradient.
bool linear_sgd_weight_update(const at::Tensor& w, const at::Tensor& gz, const at::Tensor& x2d, double lr);

// The small-output kernels (linear_small_output(n)) on rows [r0, r1) of the batch only, on the calling thread, for
// callers that split the rows themselves: y rows [r0, r1) of (m, n) = act(x (m, k) @ w (n, k)^T + b (n,) or no
// bias when null), and grad_w (n, k) = gz[r0:r1]^T (n, r1 - r0) @ x[r0:r1] (r1 - r0, k), summed over the rows in
// order. Contiguous data; row_index (null: dense rows) as above, indexed by batch row.
template <typename T>
void linear_forward_rows(const T* x, const int64_t* row_index, const T* w, const T* bias, T* y, int64_t r0,
                         int64_t r1, int64_t n, int64_t k, Activation act, T negative_slope);
template <typename T>
void linear_grad_weight_rows(const T* gz, const T* x, const int64_t* row_index, T* grad_w, int64_t r0, int64_t r1,
                             int64_t n, int64_t k);

}  // namespace fastmnist
