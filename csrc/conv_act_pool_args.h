// The host-side argument checks and output geometry of conv_act_pool and conv_act_pool_backward, written once for
// the CPU op (cpu/conv_act_pool.cpp) and the CUDA op (cuda/conv_act_pool.cu), which include it: both check the
// activation, x, weight, padding, bias, grad_out and act here, with the same messages, and get back the sizes of
// the call and the operands as their kernels take them. Each caller passes its dtype check (FloatCheck: the CUDA
// kernels also take float16 and bfloat16) and keeps its device's own checks (the CPU that x is on the CPU, CUDA
// that x is on CUDA and that the kernel fits its shared-memory tile). Host code only, free of CPU-only and CUDA
// headers: g++ and nvcc both compile it.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>
#include <c10/util/string_view.h>

#include "activation.h"
#include "checks.h"

namespace fastmnist {

// The sizes of one call: input (n, c, h, w), weight (o, c, k, k), padding pad, pooled output (n, o, ho, wo). The
// pooling reads the conv outputs [0, 2 ho) x [0, 2 wo); an odd last conv row or column is dropped.
struct ConvActPoolShape {
  int64_t n, c, h, w, o, k, pad, ho, wo;
};

struct ConvActPoolArgs {
  Activation act;
  bool batched;            // x is (N, C_in, H, W); else (C_in, H, W), one sample
  at::Tensor x4;           // x as (N, C_in, H, W), with its own strides
  ConvActPoolShape shape;
};

// Forward and backward: the activation, x (N, C_in, H, W) or (C_in, H, W), weight (C_out, C_in, k, k), padding.
inline ConvActPoolArgs check_conv_act_pool_args(const char* op, FloatCheck check_float, const at::Tensor& x,
                                                const at::Tensor& weight, int64_t padding,
                                                c10::string_view activation) {
  ConvActPoolArgs a;
  a.act = parse_activation(activation);
  TORCH_CHECK(a.act != Activation::LeakyRelu, op,
              ": activation 'leaky_relu' is not supported; expected one of identity, relu, sigmoid, tanh");
  check_float(op, "x", x);
  check_float(op, "weight", weight);
  check_same_dtype_device(op, "weight", weight, "x", x);
  TORCH_CHECK(x.dim() == 4 || x.dim() == 3, op, ": x must have shape (N, C_in, H, W) or (C_in, H, W), got shape ",
              x.sizes());
  check_dim(op, "weight", weight, 4);
  TORCH_CHECK(weight.size(2) == weight.size(3), op, ": the kernel must be square, got weight of shape ",
              weight.sizes());
  TORCH_CHECK(weight.size(2) >= 1, op, ": the kernel size must be at least 1, got weight of shape ",
              weight.sizes());
  a.batched = x.dim() == 4;
  a.x4 = a.batched ? x : x.unsqueeze(0);
  ConvActPoolShape& s = a.shape;
  s.n = a.x4.size(0), s.c = a.x4.size(1), s.h = a.x4.size(2), s.w = a.x4.size(3);
  s.o = weight.size(0), s.k = weight.size(2), s.pad = padding;
  TORCH_CHECK(weight.size(1) == s.c, op, ": x has ", s.c, " input channels (shape ", x.sizes(),
              ") but weight has shape ", weight.sizes(), " (C_out, C_in = ", weight.size(1), ", k, k)");
  TORCH_CHECK(padding >= 0, op, ": padding must be >= 0, got ", padding);
  const int64_t conv_h = s.h + 2 * padding - s.k + 1, conv_w = s.w + 2 * padding - s.k + 1;
  TORCH_CHECK(conv_h >= 1 && conv_w >= 1, op, ": kernel size ", s.k, " is larger than the padded input (",
              s.h + 2 * padding, " x ", s.w + 2 * padding, ")");
  TORCH_CHECK(conv_h >= 2 && conv_w >= 2, op, ": the convolution output (", conv_h, " x ", conv_w,
              ") is smaller than one 2x2 pooling window");
  s.ho = conv_h / 2, s.wo = conv_w / 2;
  return a;
}

// The backward's grad_out (the pooled output's shape) and act (the activation saved by the forward, read unless
// the activation is the identity), both as (N, ...) and contiguous; act is undefined for the identity.
struct ConvActPoolBackwardInputs {
  at::Tensor grad_out, act;
};

inline ConvActPoolBackwardInputs check_conv_act_pool_backward_inputs(const char* op, const at::Tensor& grad_out,
                                                                     const at::Tensor& act_out, const at::Tensor& x,
                                                                     const ConvActPoolArgs& a) {
  check_same_dtype_device(op, "grad_out", grad_out, "x", x);
  const ConvActPoolShape& s = a.shape;
  const int64_t out_shape[] = {s.n, s.o, s.ho, s.wo};
  const int64_t act_shape[] = {s.n, s.o, 2 * s.ho, 2 * s.wo};
  const size_t first = a.batched ? 0 : 1;  // the sizes to print leave out the batch that x does not have
  ConvActPoolBackwardInputs in;
  in.grad_out = a.batched ? grad_out : grad_out.unsqueeze(0);
  TORCH_CHECK(in.grad_out.sizes() == at::IntArrayRef(out_shape), op,
              ": grad_out must have the shape of the forward output ", at::IntArrayRef(out_shape).slice(first),
              ", got ", grad_out.sizes());
  in.grad_out = in.grad_out.contiguous();
  if (a.act != Activation::Identity) {
    check_same_dtype_device(op, "act", act_out, "x", x);
    in.act = a.batched ? act_out : act_out.unsqueeze(0);
    TORCH_CHECK(in.act.sizes() == at::IntArrayRef(act_shape), op,
                ": act must be the activation saved by conv_act_pool (save_act=True), of shape ",
                at::IntArrayRef(act_shape).slice(first), ", got ", act_out.sizes());
    in.act = in.act.contiguous();
  }
  return in;
}

}  // namespace fastmnist
