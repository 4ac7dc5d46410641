// Argument checks shared by the kernels. Every message names the op and the argument, and says what was
// expected and what came in.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <optional>

namespace fastmnist {

// A floating-point tensor of a dtype the kernels are compiled for (float32, float64).
inline void check_float_tensor(const char* op, const char* name, const at::Tensor& t) {
  TORCH_CHECK(t.defined(), op, ": ", name, " is undefined");
  TORCH_CHECK(t.scalar_type() == at::kFloat || t.scalar_type() == at::kDouble, op, ": ", name,
              " must be float32 or float64, got ", t.scalar_type());
}

// `t` has the same dtype and device as the reference tensor `ref` (named `ref_name`).
inline void check_same_dtype_device(const char* op, const char* name, const at::Tensor& t, const char* ref_name,
                                    const at::Tensor& ref) {
  TORCH_CHECK(t.scalar_type() == ref.scalar_type(), op, ": ", name, " has dtype ", t.scalar_type(), " but ",
              ref_name, " has dtype ", ref.scalar_type(), "; they must match");
  TORCH_CHECK(t.device() == ref.device(), op, ": ", name, " is on ", t.device(), " but ", ref_name, " is on ",
              ref.device(), "; they must be on the same device");
}

inline void check_dim(const char* op, const char* name, const at::Tensor& t, int64_t dim) {
  TORCH_CHECK(t.dim() == dim, op, ": ", name, " must have ", dim, " dimensions, got shape ", t.sizes());
}

// A device's dtype check, which the per-op argument headers (*_args.h) take as a parameter: the CPU files pass
// check_float_tensor above, the CUDA files cuda::check_float_tensor (common.cuh), which also takes float16 and
// bfloat16.
using FloatCheck = void (*)(const char* op, const char* name, const at::Tensor& t);

// The optional bias of a layer whose weight is (out_features, ...): dtype and device of x, shape
// (out_features,). Returns it contiguous, or an undefined tensor when there is none.
inline at::Tensor checked_bias(const char* op, const std::optional<at::Tensor>& bias, const at::Tensor& x,
                               const at::Tensor& weight) {
  if (!bias.has_value() || !bias->defined()) return at::Tensor();
  check_same_dtype_device(op, "bias", *bias, "x", x);
  TORCH_CHECK(bias->dim() == 1 && bias->size(0) == weight.size(0), op, ": bias must have shape (", weight.size(0),
              ",) to match weight, got ", bias->sizes());
  return bias->contiguous();
}

// The `reduction` argument of the loss ops: an int, as in ATen.
enum Reduction : int64_t { kNone = 0, kMean = 1, kSum = 2 };

inline void check_reduction(const char* op, int64_t reduction) {
  TORCH_CHECK(reduction >= kNone && reduction <= kSum, op, ": reduction must be 0 (none), 1 (mean) or 2 (sum), got ",
              reduction);
}

}  // namespace fastmnist
