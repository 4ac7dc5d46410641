// Sigmoid followed by binary cross-entropy, fused, on CUDA: the same op as csrc/cpu/sigmoid_bce.cpp.
//
// With y the target, w the weight and pw the positive-class weight (1 when absent), and lw = 1 + (pw - 1) y:
//   loss = w ((1 - y) x + lw softplus(-x)),  softplus(z) = max(z, 0) + log1p(exp(-|z|))   (finite for all x)
//   dloss/dx = w (lw sigmoid(x) - pw y),     dloss/dy = w (pw - 1) softplus(-x) - w x,
//   sigmoid(x) = exp(-softplus(-x))   (one exp, exact in both tails).
// The op is element-wise, so the kernels are flat grid-stride loops over the (rows, C) elements (weight and
// pos_weight are (C,), indexed by the column, or (rows, C)); all arithmetic in float for float16/bfloat16/
// float32 and in double for float64.
// Forward: reduction none writes the loss once; mean/sum accumulate per thread in float64, each block sums its
// threads in a fixed tree order into one partial, and the partials are summed by ATen (a fixed-order
// reduction): the grid depends only on the element count, so the result is bitwise reproducible (no atomics).
// Nothing is saved for backward but the inputs; backward is one pass that writes each requested gradient once.

#include <torch/library.h>

#include "cuda/common.cuh"
#include "sigmoid_bce_args.h"

namespace fastmnist::cuda {
namespace {

constexpr int kThreads = 256;
constexpr int64_t kMaxBlocks = 1024;

template <typename T>
struct BCEParams {
  const T* x;
  const T* y;
  const T* w;       // weight, or null
  bool w_full;      // (rows, C) rather than (C,)
  const T* pw;      // pos_weight, or null
  bool pw_full;
  int64_t total, C;
  T* loss;          // element-wise loss (reduction none), or null
  double* partial;  // per-block loss sums (reductions mean/sum), or null
  const T* g;       // grad_loss: element-wise when g_full, else a scalar
  bool g_full;
  acc_t<T> gmul;
  T* grad_x;        // or null
  T* grad_y;        // or null
};

template <typename A>
__device__ __forceinline__ A softplus(A z) {
  const A a = z < A(0) ? -z : z;
  return (z > A(0) ? z : A(0)) + std::log1p(std::exp(-a));
}

template <typename T>
__global__ void __launch_bounds__(kThreads) sigmoid_bce_kernel(BCEParams<T> p) {
  using A = acc_t<T>;
  __shared__ double scratch[kThreads / kWarp];
  const bool forward = p.loss != nullptr || p.partial != nullptr;
  double acc = 0;
  for (int64_t i = int64_t(blockIdx.x) * kThreads + threadIdx.x; i < p.total; i += int64_t(gridDim.x) * kThreads) {
    const int64_t c = i % p.C;
    const A x = A(p.x[i]);
    const A y = A(p.y[i]);
    const A w = p.w != nullptr ? A(p.w[p.w_full ? i : c]) : A(1);
    const A pw = p.pw != nullptr ? A(p.pw[p.pw_full ? i : c]) : A(1);
    const A lw = A(1) + (pw - A(1)) * y;
    const A sp = softplus<A>(-x);  // softplus(-x) = -log sigmoid(x)
    if (forward) {
      const A l = ((A(1) - y) * x + lw * sp) * w;
      if (p.loss != nullptr) p.loss[i] = T(l);
      acc += double(l);
    } else {
      const A s = A(p.g[p.g_full ? i : 0]) * p.gmul * w;
      if (p.grad_x != nullptr) p.grad_x[i] = T(s * (lw * std::exp(-sp) - pw * y));
      if (p.grad_y != nullptr) p.grad_y[i] = T(s * ((pw - A(1)) * sp - x));
    }
  }
  if (p.partial == nullptr) return;
  const double total = block_sum_to_first<kThreads>(acc, scratch);
  if (threadIdx.x == 0) p.partial[blockIdx.x] = total;
}

int64_t grid_for(int64_t total) {
  return std::clamp<int64_t>(ceil_div(total, kThreads), 1, kMaxBlocks);
}

template <typename T>
void launch(const BCEParams<T>& p, int64_t blocks) {
  sigmoid_bce_kernel<T><<<unsigned(blocks), kThreads, 0, current_stream()>>>(p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename T>
BCEParams<T> make_params(const SigmoidBCEArgs& a) {
  BCEParams<T> p{};
  p.x = a.x.const_data_ptr<T>();
  p.y = a.y.const_data_ptr<T>();
  p.w = a.w.defined() ? a.w.const_data_ptr<T>() : nullptr;
  p.w_full = a.w_full;
  p.pw = a.pw.defined() ? a.pw.const_data_ptr<T>() : nullptr;
  p.pw_full = a.pw_full;
  p.total = a.rows * a.C;
  p.C = a.C;
  return p;
}

at::Tensor sigmoid_bce_cuda(const at::Tensor& logits, const at::Tensor& target, const std::optional<at::Tensor>& weight,
                            const std::optional<at::Tensor>& pos_weight, int64_t reduction) {
  constexpr const char* op = "sigmoid_bce";
  const SigmoidBCEArgs a =
      check_sigmoid_bce_args(op, check_float_tensor, logits, target, weight, pos_weight, reduction);
  check_cuda_tensor(op, "logits", logits);
  const c10::cuda::OptionalCUDAGuard guard(device_of(logits));
  const int64_t total = a.rows * a.C;
  const int64_t blocks = grid_for(total);
  at::Tensor out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "sigmoid_bce_cuda", [&] {
    BCEParams<scalar_t> p = make_params<scalar_t>(a);
    if (reduction == kNone) {
      out = at::empty({a.rows, a.C}, logits.options());
      p.loss = out.mutable_data_ptr<scalar_t>();
      if (total > 0) launch<scalar_t>(p, blocks);
      return;
    }
    at::Tensor partial = at::zeros({blocks}, logits.options().dtype(at::kDouble));
    p.partial = partial.mutable_data_ptr<double>();
    if (total > 0) launch<scalar_t>(p, blocks);
    at::Tensor sum = partial.sum();
    if (reduction == kMean) sum = sum / double(total);  // 0 / 0 = NaN for an empty input, as eager
    out = sum.to(logits.scalar_type());
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> sigmoid_bce_backward_cuda(const at::Tensor& grad_loss, const at::Tensor& logits,
                                                             const at::Tensor& target,
                                                             const std::optional<at::Tensor>& weight,
                                                             const std::optional<at::Tensor>& pos_weight,
                                                             int64_t reduction, std::array<bool, 2> output_mask) {
  constexpr const char* op = "sigmoid_bce_backward";
  const SigmoidBCEArgs a =
      check_sigmoid_bce_args(op, check_float_tensor, logits, target, weight, pos_weight, reduction);
  check_cuda_tensor(op, "logits", logits);
  check_sigmoid_bce_grad_loss(op, grad_loss, logits, reduction);
  const c10::cuda::OptionalCUDAGuard guard(device_of(logits));
  const auto opts = logits.options();
  at::Tensor grad_x = output_mask[0] ? at::empty({a.rows, a.C}, opts) : at::empty({0}, opts);
  at::Tensor grad_y = output_mask[1] ? at::empty({a.rows, a.C}, opts) : at::empty({0}, opts);
  const int64_t total = a.rows * a.C;
  if ((!output_mask[0] && !output_mask[1]) || total == 0) return {grad_x, grad_y};
  const at::Tensor g = grad_loss.contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "sigmoid_bce_backward_cuda", [&] {
    BCEParams<scalar_t> p = make_params<scalar_t>(a);
    p.g = g.const_data_ptr<scalar_t>();
    p.g_full = reduction == kNone;
    p.gmul = reduction == kMean ? acc_t<scalar_t>(1.0 / double(total)) : acc_t<scalar_t>(1);
    p.grad_x = output_mask[0] ? grad_x.mutable_data_ptr<scalar_t>() : nullptr;
    p.grad_y = output_mask[1] ? grad_y.mutable_data_ptr<scalar_t>() : nullptr;
    launch<scalar_t>(p, grid_for(total));
  });
  return {grad_x, grad_y};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastmnist, CUDA, m) {
  m.impl("sigmoid_bce", &sigmoid_bce_cuda);
  m.impl("sigmoid_bce_backward", &sigmoid_bce_backward_cuda);
}

}  // namespace fastmnist::cuda
