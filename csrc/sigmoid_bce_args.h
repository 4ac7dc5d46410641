// The host-side argument checks of sigmoid_bce and sigmoid_bce_backward, written once for the CPU op
// (cpu/sigmoid_bce.cpp) and the CUDA op (cuda/sigmoid_bce.cu), which include it: both check logits, target,
// weight, pos_weight, reduction and grad_loss here, with the same messages, and get back the operands
// contiguous. Each caller passes its dtype check (FloatCheck: the CUDA kernels also take float16 and bfloat16)
// and keeps its device check. Host code only, free of CPU-only and CUDA headers: g++ and nvcc both compile it.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <optional>

#include "checks.h"

namespace fastmnist {

struct SigmoidBCEArgs {
  at::Tensor x, y, w, pw;                // logits, target, weight, pos_weight (undefined when absent); contiguous
  bool w_full = false, pw_full = false;  // weight / pos_weight is (rows, C); else (C,), the same for every row
  int64_t rows, C;
};

// weight / pos_weight: (C,) or (rows, C); returns whether it is the full (rows, C).
inline bool check_bce_broadcast_arg(const char* op, const char* name, const at::Tensor& t, const at::Tensor& x) {
  check_same_dtype_device(op, name, t, "logits", x);
  if (t.dim() == 1 && t.size(0) == x.size(1)) return false;
  TORCH_CHECK(t.sizes() == x.sizes(), op, ": ", name, " must have shape (", x.size(1), ",) or ", x.sizes(),
              ", got ", t.sizes());
  return true;
}

inline SigmoidBCEArgs check_sigmoid_bce_args(const char* op, FloatCheck check_float, const at::Tensor& logits,
                                             const at::Tensor& target, const std::optional<at::Tensor>& weight,
                                             const std::optional<at::Tensor>& pos_weight, int64_t reduction) {
  check_float(op, "logits", logits);
  check_dim(op, "logits", logits, 2);
  check_same_dtype_device(op, "target", target, "logits", logits);
  TORCH_CHECK(target.sizes() == logits.sizes(), op, ": target must have the shape of logits ", logits.sizes(),
              ", got ", target.sizes());
  check_reduction(op, reduction);
  SigmoidBCEArgs a;
  a.rows = logits.size(0);
  a.C = logits.size(1);
  a.x = logits.contiguous();
  a.y = target.contiguous();
  if (weight.has_value() && weight->defined()) {
    a.w_full = check_bce_broadcast_arg(op, "weight", *weight, logits);
    a.w = weight->contiguous();
  }
  if (pos_weight.has_value() && pos_weight->defined()) {
    a.pw_full = check_bce_broadcast_arg(op, "pos_weight", *pos_weight, logits);
    a.pw = pos_weight->contiguous();
  }
  return a;
}

// The backward's grad_loss: the loss's shape, (rows, C) for reduction none, else one element.
inline void check_sigmoid_bce_grad_loss(const char* op, const at::Tensor& grad_loss, const at::Tensor& logits,
                                        int64_t reduction) {
  check_same_dtype_device(op, "grad_loss", grad_loss, "logits", logits);
  TORCH_CHECK(reduction == kNone ? grad_loss.sizes() == logits.sizes() : grad_loss.numel() == 1, op,
              ": grad_loss has shape ", grad_loss.sizes(), ", which does not match the loss");
}

}  // namespace fastmnist
