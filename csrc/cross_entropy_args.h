// The host-side argument checks of softmax_cross_entropy, linear_cross_entropy and their backwards, written once
// for the CPU ops (cpu/cross_entropy.cpp) and the CUDA ops (cuda/cross_entropy.cu), which include it: both check
// logits or x and weight, bias, targets, class weights, reduction, label smoothing, grad_loss and the saved lse
// here, with the same messages, and get back the operands contiguous (the CPU op then pads the class weights for
// its vector loads). Each caller passes its dtype check (FloatCheck: the CUDA kernels also take float16 and
// bfloat16) and keeps its device checks. Host code only, free of CPU-only and CUDA headers: g++ and nvcc both
// compile it.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <optional>

#include "checks.h"

namespace fastmnist {

inline void check_label_smoothing(const char* op, double label_smoothing) {
  TORCH_CHECK(label_smoothing >= 0.0 && label_smoothing <= 1.0, op, ": label_smoothing must be in [0, 1], got ",
              label_smoothing);
}

// Class-index targets: int64 of shape (rows,), on the device of `ref` (the logits, or x).
inline void check_index_target(const char* op, const at::Tensor& target, const at::Tensor& ref, int64_t rows) {
  TORCH_CHECK(target.scalar_type() == at::kLong, op, ": class-index targets must be int64, got ", target.scalar_type());
  TORCH_CHECK(target.device() == ref.device(), op, ": target is on ", target.device(), " but the logits are on ",
              ref.device(), "; they must be on the same device");
  TORCH_CHECK(target.dim() == 1 && target.size(0) == rows, op, ": class-index targets must have shape (", rows,
              ",), got ", target.sizes());
}

// The forward's saved per-row log-sum-exp, which the backwards read: float64 of shape (rows,).
inline void check_saved_lse(const char* op, const at::Tensor& lse, int64_t rows) {
  TORCH_CHECK(lse.scalar_type() == at::kDouble && lse.dim() == 1 && lse.size(0) == rows, op,
              ": lse must be float64 of shape (", rows, ",), got ", lse.scalar_type(), " ", lse.sizes());
}

// Optional class weights `name`: shape (classes,), with the dtype and device of `ref`. Returns them contiguous,
// or an undefined tensor when absent.
inline at::Tensor checked_class_weights(const char* op, const char* name, const std::optional<at::Tensor>& weight,
                                        const char* ref_name, const at::Tensor& ref, int64_t classes) {
  if (!weight.has_value() || !weight->defined()) return at::Tensor();
  check_same_dtype_device(op, name, *weight, ref_name, ref);
  TORCH_CHECK(weight->dim() == 1 && weight->size(0) == classes, op, ": ", name, " must have one entry per class (",
              classes, ",), got shape ", weight->sizes());
  return weight->contiguous();
}

struct SoftmaxCEArgs {
  at::Tensor x, target, weight;  // logits (rows, C), targets, class weights (C,) or undefined; contiguous
  bool prob;                     // probability targets (rows, C); else class indices (rows,)
  int64_t rows, C;
};

// softmax_cross_entropy and its backward.
inline SoftmaxCEArgs check_softmax_ce_args(const char* op, FloatCheck check_float, const at::Tensor& logits,
                                           const at::Tensor& target, const std::optional<at::Tensor>& weight,
                                           int64_t reduction, double label_smoothing) {
  check_float(op, "logits", logits);
  check_dim(op, "logits", logits, 2);
  check_reduction(op, reduction);
  check_label_smoothing(op, label_smoothing);
  SoftmaxCEArgs n;
  n.rows = logits.size(0);
  n.C = logits.size(1);
  n.prob = target.is_floating_point();
  if (n.prob) {
    check_same_dtype_device(op, "target", target, "logits", logits);
    TORCH_CHECK(target.sizes() == logits.sizes(), op, ": probability targets must have the shape of logits ",
                logits.sizes(), ", got ", target.sizes());
  } else {
    check_index_target(op, target, logits, n.rows);
  }
  n.weight = checked_class_weights(op, "weight", weight, "logits", logits, n.C);
  n.x = logits.contiguous();
  n.target = target.contiguous();
  return n;
}

// The backward ops' grad_loss (the loss's shape, as the reduction makes it: (rows,) for none, else a scalar) and
// the saved lse, for softmax_cross_entropy_backward (input "logits") and linear_cross_entropy_backward ("x").
inline void check_ce_grad_loss_args(const char* op, const at::Tensor& grad_loss, const at::Tensor& lse,
                                    const char* input_name, const at::Tensor& input, int64_t reduction,
                                    int64_t rows) {
  check_same_dtype_device(op, "grad_loss", grad_loss, input_name, input);
  check_saved_lse(op, lse, rows);
  if (reduction == kNone) {
    TORCH_CHECK(grad_loss.dim() == 1 && grad_loss.size(0) == rows, op, ": grad_loss must have shape (", rows,
                ",) for reduction none, got ", grad_loss.sizes());
  } else {
    TORCH_CHECK(grad_loss.numel() == 1, op, ": grad_loss must be a scalar for a reduced loss, got shape ",
                grad_loss.sizes());
  }
}

struct LinearCEArgs {
  at::Tensor x, w, b, target, class_weight;  // contiguous; b and class_weight undefined when absent
  bool prob;                                 // probability targets (N * D, C); else class indices (N * D,)
  int64_t N, C, D;  // x has N rows; weight (D * C, features) gives each row D rows of C logits
};

// linear_cross_entropy and its backward.
inline LinearCEArgs check_linear_ce_args(const char* op, FloatCheck check_float, const at::Tensor& x,
                                         const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                                         const at::Tensor& target, const std::optional<at::Tensor>& class_weight,
                                         int64_t num_classes, int64_t reduction, double label_smoothing) {
  check_float(op, "x", x);
  check_dim(op, "x", x, 2);
  check_dim(op, "weight", weight, 2);
  check_same_dtype_device(op, "weight", weight, "x", x);
  TORCH_CHECK(weight.size(1) == x.size(1), op, ": x has ", x.size(1), " features but weight has shape ",
              weight.sizes());
  TORCH_CHECK(num_classes >= 1 && weight.size(0) % num_classes == 0, op, ": weight has ", weight.size(0),
              " rows, not a multiple of num_classes = ", num_classes);
  check_reduction(op, reduction);
  check_label_smoothing(op, label_smoothing);
  LinearCEArgs a;
  a.N = x.size(0);
  a.C = num_classes;
  a.D = weight.size(0) / num_classes;
  const int64_t rows = a.N * a.D;
  if (bias.has_value() && bias->defined()) {
    check_same_dtype_device(op, "bias", *bias, "x", x);
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == weight.size(0), op, ": bias must have shape (", weight.size(0),
                ",), got ", bias->sizes());
    a.b = bias->contiguous();
  }
  a.prob = target.is_floating_point();
  if (a.prob) {
    check_same_dtype_device(op, "target", target, "x", x);
    TORCH_CHECK(target.dim() == 2 && target.size(0) == rows && target.size(1) == a.C, op,
                ": probability targets must have shape (", rows, ", ", a.C, "), got ", target.sizes());
  } else {
    check_index_target(op, target, x, rows);
  }
  a.class_weight = checked_class_weights(op, "class_weight", class_weight, "x", x, a.C);
  a.x = x.contiguous();
  a.w = weight.contiguous();
  a.target = target.contiguous();
  return a;
}

}  // namespace fastmnist
