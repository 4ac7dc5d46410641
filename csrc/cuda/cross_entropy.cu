// Softmax cross-entropy on CUDA, and the classifier head (linear + softmax cross-entropy) built on it: the same
// ops as csrc/cpu/cross_entropy.cpp, with the same math. Each row's loss and gradient are written through its
// target distribution t:
//   index targets:       t_c = (1 - eps) w_y [c == y] + (eps / C) w_c    (t = 0 for an ignored row)
//   probability targets: t_c = w_c ((1 - eps) q_c + eps / C)
//   loss = -sum_c t_c logp_c,   dloss/dx_c = p_c sum(t) - t_c,   logp = x - lse, p = exp(logp).
//
// Layout. One warp per row when C <= kWarpMaxClasses (lanes stride the row, warp shuffles reduce, no shared
// memory), else one block of kBlockThreads per row. Both keep per thread a running max and sum of exponentials
// (online softmax, one exp per element) and merge them across the group, giving the row's log-sum-exp in one
// read of the row; the loss then needs x[y] only, or, with label smoothing, probability targets or a gradient
// to write, a second pass over the row (from L1/L2). All arithmetic is in float for float16/bfloat16/float32
// and in double for float64.
// Stability as the CPU op: logp = (x - hi) - lo with hi + lo = lse (saved in float64), exp underflows to 0,
// a -inf logit gets p = 0, an all -inf row gives lse = -inf and NaN (as eager); logits of +-1e4 are exact.
// Out-of-range class-index targets: checked ON THE DEVICE with CUDA_KERNEL_ASSERT_MSG (as ATen's nll_loss: no
// host synchronisation; a failed check is a device-side assert, which makes the CUDA context unusable and
// surfaces as a RuntimeError at the next synchronisation). The row is then treated as ignored, so nothing is
// ever read out of bounds.
// Saved for backward: the per-row log-sum-exp only, in float64. Backward recomputes p from the logits and lse
// and writes each gradient once, already scaled by grad_output and the reduction's divisor. The mean's divisor
// (summed weights of the kept targets) and the summed class weights are computed on the device (fixed-order
// reductions) and read by the kernels through pointers, so nothing synchronises with the host.
//
// linear_cross_entropy: as on the CPU, rows in chunks: logits of a chunk by one GEMM (ATen, cuBLAS) into a
// chunk-sized buffer, the row kernel computes loss and logit gradient in place, then the chunk's gradient GEMMs
// (grad_x rows, grad_W += G^T x, grad_b += column sums). The (N, C) logits never exist in full.

#include <torch/library.h>

#include "cross_entropy_args.h"
#include "linear_cross_entropy_chunks.h"
#include "cuda/common.cuh"

#include <cmath>

namespace fastmnist::cuda {
namespace {

constexpr int64_t kWarpMaxClasses = 1024;
constexpr int kWarpKernelThreads = 256;  // 8 rows per block
constexpr int kBlockThreads = 512;
constexpr int64_t kMaxGrid = int64_t(1) << 20;
constexpr int64_t kChunkBytes = int64_t(64) << 20;  // linear_cross_entropy: logits buffer per chunk
constexpr int64_t kMinChunkRows = 16;                // ... but at least this many rows

template <typename T>
struct CEParams {
  using A = acc_t<T>;
  const T* x;               // (rows, C) logits
  int64_t rows, C;
  const int64_t* y;         // class-index targets (rows,), or null
  const T* q;               // probability targets (rows, C), or null
  const T* w;               // class weights (C,), or null
  const double* w_sum;      // sum of the class weights (device scalar), or null: C
  int64_t ignore_index;
  A eps;                    // label smoothing
  double* lse;              // per-row log-sum-exp: written, or read when lse_in
  bool lse_in;
  A* loss;                  // per-row loss, or null
  T* grad;                  // (rows, C) logit gradient, or null; may alias x
  const T* gscale;          // grad_output per row (stride gscale_stride; 0: a scalar); null: 1
  int64_t gscale_stride;
  A gmul;                   // times this ...
  const double* divisor;    // ... or, when not null, divided by this device scalar (the mean's divisor)
  T* grad_q;                // gradient of the probability targets, or null
};

// One row's loss / gradient, by the threads of group `grp` (all of which call it, for the same row).
template <typename T, typename G>
__device__ __forceinline__ void ce_row(const CEParams<T>& p, int64_t r, const G& grp) {
  using A = acc_t<T>;
  constexpr A ninf = -std::numeric_limits<A>::infinity();
  const int64_t C = p.C;
  const int lane = grp.lane();
  const T* x = p.x + r * C;
  const A w_sum = p.w_sum != nullptr ? A(*p.w_sum) : A(C);
  const A uniform = p.eps / A(C);
  const A keep = A(1) - p.eps;
  const T* q = p.q != nullptr ? p.q + r * C : nullptr;
  auto prob_target = [&](int64_t c) {
    const A t = A(q[c]) * keep + uniform;
    return p.w != nullptr ? t * A(p.w[c]) : t;
  };
  const bool want_grads = p.grad != nullptr || p.grad_q != nullptr;

  // pass 1: log-sum-exp (unless given) and, for probability targets with gradients, sum(t)
  double lse = 0;
  A t_sum = A(0);
  if (!p.lse_in || (q != nullptr && want_grads)) {
    MaxSum<A> st{ninf, A(0)};
    for (int64_t c = lane; c < C; c += G::size) {
      if (!p.lse_in) st = maxsum_add<A>(st, A(x[c]));
      if (q != nullptr && want_grads) t_sum += prob_target(c);
    }
    if (!p.lse_in) {
      st = grp.maxsum(st);
      lse = double(st.m) + std::log(double(st.s));
    }
    if (q != nullptr && want_grads) t_sum = grp.sum(t_sum);
  }
  if (p.lse_in) {
    lse = p.lse[r];
  } else if (lane == 0) {
    p.lse[r] = lse;
  }
  const A hi = A(lse);
  const A lo = std::isfinite(hi) ? A(lse - double(hi)) : A(0);
  const A s = (p.gscale != nullptr ? A(p.gscale[r * p.gscale_stride]) : A(1)) *
              (p.divisor != nullptr ? A(1.0 / *p.divisor) : p.gmul);
  T* g = p.grad != nullptr ? p.grad + r * C : nullptr;

  if (p.y != nullptr) {
    const int64_t y = p.y[r];
    bool ignored = y == p.ignore_index;
    const bool in_range = y >= 0 && y < C;
    if (lane == 0) {
      CUDA_KERNEL_ASSERT_MSG(ignored || in_range,
                             "fastmnist softmax_cross_entropy: class-index target out of bounds [0, C) and not "
                             "ignore_index");
    }
    ignored = ignored || !in_range;  // never read out of bounds
    const A wy = ignored ? A(0) : (p.w != nullptr ? A(p.w[y]) : A(1));
    const A onehot = ignored ? A(0) : keep * wy;       // t_y's one-hot part
    const A cu = ignored ? A(0) : uniform;             // t_c = cu w_c elsewhere
    const bool smooth_loss = p.loss != nullptr && !ignored && p.eps != A(0);
    const A a = ignored ? A(0) : s * (onehot + cu * w_sum);  // s sum(t)
    const A su = ignored ? A(0) : s * cu;
    const A sy = ignored ? A(0) : s * onehot;
    if (smooth_loss || g != nullptr) {
      A acc = A(0);  // sum of t_c logp_c over this thread's columns
      for (int64_t c = lane; c < C; c += G::size) {
        const A logp = (A(x[c]) - hi) - lo;  // read before g (which may alias x) is written, by this thread
        const A wc = p.w != nullptr ? A(p.w[c]) : A(1);
        if (p.loss != nullptr && !ignored) {
          if (c == y) acc += onehot * logp;
          if (smooth_loss) acc += cu * wc * logp;
        }
        if (g != nullptr) g[c] = T(std::exp(logp) * a - wc * su - (c == y ? sy : A(0)));
      }
      if (p.loss != nullptr) {
        acc = grp.sum(acc);
        if (lane == 0) p.loss[r] = ignored ? A(0) : -acc;
      }
    } else if (p.loss != nullptr && lane == 0) {
      p.loss[r] = ignored ? A(0) : -onehot * ((A(x[y]) - hi) - lo);
    }
  } else {
    T* gq = p.grad_q != nullptr ? p.grad_q + r * C : nullptr;
    const A a = s * t_sum;
    A acc = A(0);
    if (p.loss != nullptr || want_grads) {
      for (int64_t c = lane; c < C; c += G::size) {
        const A logp = (A(x[c]) - hi) - lo;
        const A t = prob_target(c);
        if (p.loss != nullptr) acc += t * logp;
        if (gq != nullptr) gq[c] = T(-s * keep * (p.w != nullptr ? A(p.w[c]) : A(1)) * logp);
        if (g != nullptr) g[c] = T(std::exp(logp) * a - s * t);
      }
    }
    if (p.loss != nullptr) {
      acc = grp.sum(acc);
      if (lane == 0) p.loss[r] = -acc;
    }
  }
}

template <typename T>
__global__ void __launch_bounds__(kWarpKernelThreads) ce_warp_kernel(CEParams<T> p) {
  constexpr int kWarpsPerBlock = kWarpKernelThreads / kWarp;
  const int64_t first = int64_t(blockIdx.x) * kWarpsPerBlock + threadIdx.x / kWarp;
  for (int64_t r = first; r < p.rows; r += int64_t(gridDim.x) * kWarpsPerBlock) ce_row<T>(p, r, WarpGroup{});
}

template <typename T>
__global__ void __launch_bounds__(kBlockThreads) ce_block_kernel(CEParams<T> p) {
  __shared__ double scratch[2 * (kBlockThreads / kWarp)];
  for (int64_t r = blockIdx.x; r < p.rows; r += gridDim.x) ce_row<T>(p, r, BlockGroup<kBlockThreads>{scratch});
}

template <typename T>
void launch_rows(const CEParams<T>& p) {
  if (p.rows == 0) return;
  const auto stream = current_stream();
  if (p.C <= kWarpMaxClasses) {
    const int64_t blocks = std::min(ceil_div(p.rows, kWarpKernelThreads / kWarp), kMaxGrid);
    ce_warp_kernel<T><<<unsigned(blocks), kWarpKernelThreads, 0, stream>>>(p);
  } else {
    ce_block_kernel<T><<<unsigned(std::min(p.rows, kMaxGrid)), kBlockThreads, 0, stream>>>(p);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// out[r] = the class weight of row r's target (1 without weights), 0 for an ignored row; checks the range.
template <typename T>
__global__ void target_weight_kernel(const int64_t* __restrict__ y, const T* __restrict__ w, int64_t rows, int64_t C,
                                     int64_t ignore_index, double* __restrict__ out) {
  for (int64_t r = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; r < rows; r += int64_t(gridDim.x) * blockDim.x) {
    const int64_t t = y[r];
    const bool in_range = t >= 0 && t < C;
    CUDA_KERNEL_ASSERT_MSG(t == ignore_index || in_range,
                           "fastmnist softmax_cross_entropy: class-index target out of bounds [0, C) and not "
                           "ignore_index");
    out[r] = (t == ignore_index || !in_range) ? 0.0 : (w != nullptr ? double(w[t]) : 1.0);
  }
}

// The mean's divisor as a float64 device scalar: summed weights of the kept index targets.
template <typename T>
at::Tensor index_divisor(const at::Tensor& target, const at::Tensor& weight, int64_t C, int64_t ignore_index) {
  const int64_t rows = target.numel();
  at::Tensor kept = at::empty({rows}, target.options().dtype(at::kDouble));
  if (rows > 0) {
    target_weight_kernel<T><<<unsigned(std::min(ceil_div(rows, 256), kMaxGrid)), 256, 0, current_stream()>>>(
        target.const_data_ptr<int64_t>(), weight.defined() ? weight.const_data_ptr<T>() : nullptr, rows, C,
        ignore_index, kept.mutable_data_ptr<double>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  return kept.sum();
}

// Device scalars the kernels read: summed class weights (only needed with label smoothing) and the mean's
// divisor for index targets. Kept alive by the caller while the kernels run (stream-ordered allocator).
struct Scalars {
  at::Tensor w_sum, divisor;
};

template <typename T>
CEParams<T> make_params(const at::Tensor& target, const at::Tensor& weight, bool prob, int64_t rows, int64_t C,
                        int64_t ignore_index, double label_smoothing, int64_t reduction, Scalars& sc) {
  CEParams<T> p{};
  p.rows = rows;
  p.C = C;
  p.y = prob ? nullptr : target.const_data_ptr<int64_t>();
  p.q = prob ? target.const_data_ptr<T>() : nullptr;
  p.w = weight.defined() ? weight.const_data_ptr<T>() : nullptr;
  p.ignore_index = ignore_index;
  p.eps = acc_t<T>(label_smoothing);
  if (weight.defined() && label_smoothing != 0.0) {
    sc.w_sum = weight.sum(at::kDouble);
    p.w_sum = sc.w_sum.const_data_ptr<double>();
  }
  p.gmul = acc_t<T>(1);
  if (reduction == kMean) {
    if (prob) {
      p.gmul = acc_t<T>(1.0 / double(rows));
    } else {
      sc.divisor = index_divisor<T>(target, weight, C, ignore_index);
      p.divisor = sc.divisor.const_data_ptr<double>();
    }
  }
  return p;
}

// The loss from per-row losses (accumulation dtype): as is, or their float64 sum, divided for the mean.
at::Tensor reduce_loss(const at::Tensor& loss_rows, int64_t reduction, const Scalars& sc, int64_t rows,
                       at::ScalarType dtype) {
  if (reduction == kNone) return loss_rows.to(dtype);
  at::Tensor total = loss_rows.sum(at::kDouble);
  if (reduction == kMean) total = sc.divisor.defined() ? total / sc.divisor : total / double(rows);
  return total.to(dtype);
}

std::tuple<at::Tensor, at::Tensor> softmax_cross_entropy_cuda(const at::Tensor& logits, const at::Tensor& target,
                                                              const std::optional<at::Tensor>& weight,
                                                              int64_t ignore_index, int64_t reduction,
                                                              double label_smoothing) {
  constexpr const char* op = "softmax_cross_entropy";
  const SoftmaxCEArgs n =
      check_softmax_ce_args(op, check_float_tensor, logits, target, weight, reduction, label_smoothing);
  check_cuda_tensor(op, "logits", logits);
  const c10::cuda::OptionalCUDAGuard guard(device_of(logits));
  at::Tensor loss_rows = at::empty({n.rows}, logits.options().dtype(at::toOpMathType(logits.scalar_type())));
  at::Tensor lse = at::empty({n.rows}, logits.options().dtype(at::kDouble));
  Scalars sc;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "softmax_cross_entropy_cuda", [&] {
    CEParams<scalar_t> p = make_params<scalar_t>(n.target, n.weight, n.prob, n.rows, n.C, ignore_index,
                                                 label_smoothing, reduction, sc);
    p.x = n.x.const_data_ptr<scalar_t>();
    p.lse = lse.mutable_data_ptr<double>();
    p.loss = loss_rows.mutable_data_ptr<acc_t<scalar_t>>();
    launch_rows<scalar_t>(p);
  });
  return {reduce_loss(loss_rows, reduction, sc, n.rows, logits.scalar_type()), lse};
}

std::tuple<at::Tensor, at::Tensor> softmax_cross_entropy_backward_cuda(
    const at::Tensor& grad_loss, const at::Tensor& logits, const at::Tensor& target,
    const std::optional<at::Tensor>& weight, const at::Tensor& lse, int64_t ignore_index, int64_t reduction,
    double label_smoothing, std::array<bool, 2> output_mask) {
  constexpr const char* op = "softmax_cross_entropy_backward";
  const SoftmaxCEArgs n =
      check_softmax_ce_args(op, check_float_tensor, logits, target, weight, reduction, label_smoothing);
  check_cuda_tensor(op, "logits", logits);
  check_ce_grad_loss_args(op, grad_loss, lse, "logits", logits, reduction, n.rows);
  TORCH_CHECK(lse.device() == logits.device(), op, ": lse is on ", lse.device(), " but logits are on ",
              logits.device());
  const c10::cuda::OptionalCUDAGuard guard(device_of(logits));
  const bool want_q = output_mask[1] && n.prob;
  at::Tensor grad = output_mask[0] ? at::empty_like(n.x) : at::empty({0}, logits.options());
  at::Tensor grad_q = want_q ? at::empty_like(n.x) : at::empty({0}, logits.options());
  if (!output_mask[0] && !want_q) return {grad, grad_q};
  const at::Tensor g = grad_loss.contiguous();
  const at::Tensor lse_c = lse.contiguous();
  Scalars sc;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "softmax_cross_entropy_backward_cuda",
                                  [&] {
    CEParams<scalar_t> p = make_params<scalar_t>(n.target, n.weight, n.prob, n.rows, n.C, ignore_index,
                                                 label_smoothing, reduction, sc);
    p.x = n.x.const_data_ptr<scalar_t>();
    p.lse = const_cast<double*>(lse_c.const_data_ptr<double>());  // read only: lse_in
    p.lse_in = true;
    p.grad = output_mask[0] ? grad.mutable_data_ptr<scalar_t>() : nullptr;
    p.grad_q = want_q ? grad_q.mutable_data_ptr<scalar_t>() : nullptr;
    p.gscale = g.const_data_ptr<scalar_t>();
    p.gscale_stride = reduction == kNone ? 1 : 0;
    launch_rows<scalar_t>(p);
  });
  return {grad, grad_q};
}

// linear_cross_entropy_chunks.h with this file's row kernel
template <typename T>
void linear_ce_chunks(const LinearCEArgs& a, const CEParams<T>& p, bool grads, LinearCEGrads& g) {
  const int64_t chunk = linear_ce_chunk_rows(a, sizeof(T), kChunkBytes, kMinChunkRows);
  fastmnist::linear_ce_chunks<T>(a, p, grads, chunk, g, [](CEParams<T> c, int64_t rows) {
    c.rows = rows;
    launch_rows<T>(c);
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> linear_cross_entropy_cuda(
    const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias, const at::Tensor& target,
    const std::optional<at::Tensor>& class_weight, int64_t num_classes, int64_t ignore_index, int64_t reduction,
    double label_smoothing, std::array<bool, 3> grad_mask) {
  constexpr const char* op = "linear_cross_entropy";
  const LinearCEArgs a = check_linear_ce_args(op, check_float_tensor, x, weight, bias, target, class_weight,
                                              num_classes, reduction, label_smoothing);
  check_cuda_tensor(op, "x", x);
  const c10::cuda::OptionalCUDAGuard guard(device_of(x));
  const int64_t rows = a.N * a.D;
  const bool precompute = reduction != kNone && (grad_mask[0] || grad_mask[1] || (grad_mask[2] && a.b.defined()));
  LinearCEGrads grads = make_linear_ce_grads(
      a, x, weight, {precompute && grad_mask[0], precompute && grad_mask[1], precompute && grad_mask[2]});
  at::Tensor loss_rows = at::empty({rows}, x.options().dtype(at::toOpMathType(x.scalar_type())));
  at::Tensor lse = at::empty({rows}, x.options().dtype(at::kDouble));
  Scalars sc;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "linear_cross_entropy_cuda", [&] {
    CEParams<scalar_t> p = make_params<scalar_t>(a.target, a.class_weight, a.prob, rows, a.C, ignore_index,
                                                 label_smoothing, reduction, sc);
    p.lse = lse.mutable_data_ptr<double>();
    p.loss = loss_rows.mutable_data_ptr<acc_t<scalar_t>>();
    linear_ce_chunks<scalar_t>(a, p, precompute, grads);  // gscale null: grad_output 1
  });
  return {reduce_loss(loss_rows, reduction, sc, rows, x.scalar_type()), lse, grads.x, grads.w, grads.b};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> linear_cross_entropy_backward_cuda(
    const at::Tensor& grad_loss, const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
    const at::Tensor& target, const std::optional<at::Tensor>& class_weight, const at::Tensor& lse,
    int64_t num_classes, int64_t ignore_index, int64_t reduction, double label_smoothing,
    std::array<bool, 3> output_mask) {
  constexpr const char* op = "linear_cross_entropy_backward";
  const LinearCEArgs a = check_linear_ce_args(op, check_float_tensor, x, weight, bias, target, class_weight,
                                              num_classes, reduction, label_smoothing);
  check_cuda_tensor(op, "x", x);
  const int64_t rows = a.N * a.D;
  check_ce_grad_loss_args(op, grad_loss, lse, "x", x, reduction, rows);
  TORCH_CHECK(lse.device() == x.device(), op, ": lse is on ", lse.device(), " but x is on ", x.device());
  const c10::cuda::OptionalCUDAGuard guard(device_of(x));
  LinearCEGrads grads = make_linear_ce_grads(a, x, weight, output_mask);
  if (!(grads.mask[0] || grads.mask[1] || grads.mask[2])) return {grads.x, grads.w, grads.b};
  const at::Tensor g = grad_loss.contiguous();
  const at::Tensor lse_c = lse.contiguous();
  Scalars sc;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "linear_cross_entropy_backward_cuda",
                                  [&] {
    CEParams<scalar_t> p = make_params<scalar_t>(a.target, a.class_weight, a.prob, rows, a.C, ignore_index,
                                                 label_smoothing, reduction, sc);
    p.lse = const_cast<double*>(lse_c.const_data_ptr<double>());  // read only: lse_in
    p.lse_in = true;
    p.gscale = g.const_data_ptr<scalar_t>();
    p.gscale_stride = reduction == kNone ? 1 : 0;
    linear_ce_chunks<scalar_t>(a, p, true, grads);
  });
  return {grads.x, grads.w, grads.b};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastmnist, CUDA, m) {
  m.impl("softmax_cross_entropy", &softmax_cross_entropy_cuda);
  m.impl("softmax_cross_entropy_backward", &softmax_cross_entropy_backward_cuda);
  m.impl("linear_cross_entropy", &linear_cross_entropy_cuda);
  m.impl("linear_cross_entropy_backward", &linear_cross_entropy_backward_cuda);
}

}  // namespace fastmnist::cuda
