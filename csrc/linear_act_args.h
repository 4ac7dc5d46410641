// The host-side argument checks and shapes of linear_act and linear_act_backward, written once for the CPU op
// (cpu/linear_act.cpp) and the CUDA op (cuda/linear_act.cu), which include it: both check the activation, x,
// weight, bias, grad_out and out here, with the same messages, and get back the operands reshaped as their
// kernels take them. Each caller passes its dtype check (FloatCheck: the CUDA kernels also take float16 and
// bfloat16) and keeps its device check. Host code only, free of CPU-only and CUDA headers: g++ and nvcc both
// compile it.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>
#include <c10/util/string_view.h>

#include <optional>
#include <vector>

#include "activation.h"
#include "checks.h"

namespace fastmnist {

// x (*, k) and weight (n, k): dtypes, devices and in_features. Returns n.
inline int64_t check_linear_act_inputs(const char* op, FloatCheck check_float, const at::Tensor& x,
                                       const at::Tensor& weight) {
  check_float(op, "x", x);
  check_float(op, "weight", weight);
  check_same_dtype_device(op, "weight", weight, "x", x);
  TORCH_CHECK(x.dim() >= 1, op, ": x must have shape (*, in_features), got a 0-dimensional tensor");
  check_dim(op, "weight", weight, 2);
  TORCH_CHECK(x.size(-1) == weight.size(1), op, ": x has in_features = ", x.size(-1),
              " but weight has shape ", weight.sizes(), " (out_features, in_features = ", weight.size(1), ")");
  return weight.size(0);
}

// The forward output's shape: x's with the last dimension n.
inline std::vector<int64_t> linear_act_out_shape(const at::Tensor& x, int64_t n) {
  std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end());
  shape.back() = n;
  return shape;
}

struct LinearActForwardArgs {
  Activation act;
  int64_t n;                       // out_features
  at::Tensor x2d;                  // x as (rows, in_features), contiguous
  at::Tensor bias;                 // contiguous, or undefined
  std::vector<int64_t> out_shape;  // the output's shape: (*, n)
};

inline LinearActForwardArgs check_linear_act_args(const char* op, FloatCheck check_float, const at::Tensor& x,
                                                  const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                                                  c10::string_view activation, double negative_slope) {
  LinearActForwardArgs a;
  a.act = parse_activation(activation);
  check_negative_slope(negative_slope);
  a.n = check_linear_act_inputs(op, check_float, x, weight);
  a.bias = checked_bias(op, bias, x, weight);
  a.x2d = x.reshape({-1, weight.size(1)}).contiguous();
  a.out_shape = linear_act_out_shape(x, a.n);
  return a;
}

struct LinearActBackwardArgs {
  Activation act;
  int64_t n;     // out_features
  at::Tensor g;  // grad_out as (rows, n), contiguous
  at::Tensor y;  // the forward output as (rows, n), contiguous
};

inline LinearActBackwardArgs check_linear_act_backward_args(const char* op, FloatCheck check_float,
                                                            const at::Tensor& grad_out, const at::Tensor& x,
                                                            const at::Tensor& weight, const at::Tensor& out,
                                                            c10::string_view activation, double negative_slope) {
  LinearActBackwardArgs a;
  a.act = parse_activation(activation);
  check_negative_slope(negative_slope);
  a.n = check_linear_act_inputs(op, check_float, x, weight);
  check_same_dtype_device(op, "grad_out", grad_out, "x", x);
  check_same_dtype_device(op, "out", out, "x", x);
  const std::vector<int64_t> out_shape = linear_act_out_shape(x, a.n);
  TORCH_CHECK(out.sizes() == grad_out.sizes() && out.sizes() == at::IntArrayRef(out_shape), op, ": grad_out ",
              grad_out.sizes(), " and out ", out.sizes(), " must both have the forward output's shape ", out_shape);
  a.g = grad_out.reshape({-1, a.n}).contiguous();
  a.y = out.reshape({-1, a.n}).contiguous();
  return a;
}

}  // namespace fastmnist
