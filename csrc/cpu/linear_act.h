// The CPU linear+activation kernels as functions that write into given tensors, shared by the linear_act ops
// and the fused training step.
#pragma once

#include <ATen/core/Tensor.h>

#include "activation.h"

namespace fastmnist {

// y (m, n) = act(x2d (m, k) @ w (n, k)^T + b (n,) or no bias when undefined); all contiguous, same dtype.
void linear_act_forward_into(at::Tensor& y, const at::Tensor& x2d, const at::Tensor& w, const at::Tensor& b,
                             Activation act, double negative_slope);

// From the output y (m, n) and its gradient g: gz = g * act'(y) (skipped when gz is undefined or the activation
// is the identity, where gz is g) and grad_bias (n,) = column sums of gz (skipped when undefined; summed in a
// fixed order). gz may be g itself (in place).
void linear_act_grad_pre_into(at::Tensor& gz, at::Tensor& grad_bias, const at::Tensor& g, const at::Tensor& y,
                              Activation act, double negative_slope);

// grad_w (n, k) = gz (m, n)^T @ x2d (m, k); all contiguous, same dtype.
void linear_grad_weight_into(at::Tensor& grad_w, const at::Tensor& gz, const at::Tensor& x2d);

}  // namespace fastmnist
