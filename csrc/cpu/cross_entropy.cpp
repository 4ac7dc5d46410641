// Softmax cross-entropy on the CPU, and the classifier head (linear + softmax cross-entropy) built on it.
//
// Logits come as (rows, C) row-major (the Python wrapper moves the class dimension last). Targets are class
// indices (rows,) or class probabilities (rows, C); class weights, ignore_index and label smoothing follow
// F.cross_entropy. Every row's loss and gradient is written through its target distribution t:
//   index targets:       t_c = (1 - eps) w_y [c == y] + (eps / C) w_c    (t = 0 for an ignored row)
//   probability targets: t_c = w_c ((1 - eps) q_c + eps / C)
//   loss = -sum_c t_c logp_c,   dloss/dx_c = p_c sum(t) - t_c,   logp = x - lse, p = exp(logp).
//
// Forward. One pass over each row keeps a running max and sum of exponentials per vector lane (rescaled when
// the max grows), giving the row's log-sum-exp; the loss then needs x[y] only, or, with label smoothing or
// probability targets, one more pass over the row while it is still in cache. Saved for backward: the
// per-row log-sum-exp only, in float64 (rows x 8 bytes), so that x - lse is exact even for logits of 1e4.
// Backward. One pass per row recomputes p from the logits and the saved lse and writes the gradient once,
// already scaled by grad_output and the reduction's divisor.
//
// linear_cross_entropy: the rows are processed in chunks; each chunk's logits come from one GEMM (ATen) into a
// chunk-sized buffer, the loss and the logit gradient are computed in place, and the chunk's contributions to
// grad_x (rows of G @ W) and grad_W (+= G^T x), grad_b are made at once. The (N, C) logits never exist: the
// buffer is chunk x C (about kChunkBytes, at least kMinChunkRows rows) where eager keeps N x C logits and their
// log-softmax for backward.
// With a reduced loss and gradients requested, the gradients for grad_output = 1 are computed during forward
// (three GEMMs in all, as eager) and backward only scales them; with reduction "none" the per-row
// grad_output is not known in forward, so backward recomputes each chunk's logits from x, W and the saved lse.
//
// The row kernel is built twice (see cpu/simd.h): here with 32-byte vectors (portable and AVX2 paths) and, through
// cpu/avx512/cross_entropy.cpp, with 64-byte vectors; cross_entropy_rows picks one per call by cpu_path(). The
// ops, the target check and the head are built once, in the 32-byte build.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "cpu/cross_entropy.h"
#include "cpu/loss_vec.h"
#include "cross_entropy_args.h"
#include "linear_cross_entropy_chunks.h"

#include <cmath>
#include <limits>

namespace fastmnist {
namespace {

using cpu::CERows;
using cpu::IntVec;
using cpu::kWidth;
using cpu::Vec;

constexpr int64_t kChunkBytes = int64_t(4) << 20;  // linear_cross_entropy: logits buffer per chunk, unless
constexpr int64_t kMinChunkRows = 256;             // fewer rows: a GEMM of fewer rows runs far below peak

// Row log-sum-exp in one pass. A row of at most four vectors (10 classes: two) is held in registers: its max,
// then the sum of exp(x - max). Longer rows keep per lane a running max M and sum S of exp(x - M), rescaled
// once per block of four vectors (the last block padded with -inf). A max of -inf shifts by 0 instead (so
// -inf - -inf never occurs); NaN anywhere in the row gives NaN, an all -inf row gives -inf (and NaN losses).
template <typename T>
FASTMNIST_INLINE double row_lse(const T* x, int64_t C, bool over, IntVec<T> tail) {
  constexpr int W = kWidth<T>;
  constexpr T ninf = -std::numeric_limits<T>::infinity();
  const Vec<T> zero = cpu::broadcast<T>(T(0));
  const Vec<T> minus_inf = cpu::broadcast<T>(ninf);
  auto load_block = [&](int64_t j, Vec<T> v[4]) FASTMNIST_LAMBDA_INLINE {
    if (j + 4 * W <= C) {
      for (int i = 0; i < 4; ++i) v[i] = cpu::load<T>(x + j + i * W);
    } else {
      for (int i = 0; i < 4; ++i) {
        const int64_t n = std::min<int64_t>(W, C - j - i * W);
        v[i] = n > 0 ? cpu::load_n<T>(x + j + i * W, n, ninf, over, tail) : minus_inf;
      }
    }
  };
  auto block_max = [](const Vec<T> v[4]) FASTMNIST_LAMBDA_INLINE {
    return cpu::vmax<T>(cpu::vmax<T>(v[0], v[1]), cpu::vmax<T>(v[2], v[3]));
  };
  // sum of exp(v - sh) over the vectors of the block that hold logits
  auto block_exp = [&](int64_t j, const Vec<T> v[4], Vec<T> sh) FASTMNIST_LAMBDA_INLINE {
    Vec<T> e = cpu::vexp0<T>(v[0] - sh);
    for (int i = 1; i < 4 && j + i * W < C; ++i) e += cpu::vexp0<T>(v[i] - sh);
    return e;
  };
  Vec<T> v[4];
  if (C <= 4 * W) {
    load_block(0, v);
    const T m = cpu::hmax<T>(block_max(v));
    const T sh = m == ninf ? T(0) : m;
    return double(m) + std::log(double(cpu::hsum<T>(block_exp(0, v, cpu::broadcast<T>(sh)))));
  }
  Vec<T> M = minus_inf, S = zero;
  for (int64_t j = 0; j < C; j += 4 * W) {
    load_block(j, v);
    const Vec<T> m = cpu::vmax<T>(M, block_max(v));
    const Vec<T> sh = m == ninf ? zero : m;
    const Vec<T> e = block_exp(j, v, sh);
    S = j == 0 ? e : S * cpu::vexp0<T>(M - sh) + e;
    M = m;
  }
  const T m = cpu::hmax<T>(M);
  const T sh = m == ninf ? T(0) : m;
  const T s = cpu::hsum<T>(S * cpu::vexp0<T>(M - sh));  // NaN lanes of M or S propagate
  return double(m) + std::log(double(s));
}

// Short rows with class-index targets (C <= kLanesMaxC: the tutorials' 10 classes), kWidth rows at a time:
// the block is transposed into one vector per class with one row per lane, so that the row max, the sum of
// exponentials and the log are vector operations across rows rather than horizontal reductions and a scalar
// log per row. Same formulas as the row-by-row loop below (logp = (x - hi) - lo, with hi = the row max and
// lo = log of the sum in forward); returns the first row of the last, partial block, which it leaves to that
// loop.
constexpr int64_t kLanesMaxC = 16;

template <typename T>
FASTMNIST_INLINE int64_t cross_entropy_lanes(const CERows<T>& p, int64_t r0, int64_t r1) {
  constexpr int W = kWidth<T>;
  constexpr T ninf = -std::numeric_limits<T>::infinity();
  using I = std::conditional_t<sizeof(T) == 4, int32_t, int64_t>;
  const int64_t C = p.C;
  const T uniform = p.eps / T(C);
  const Vec<T> zero = cpu::broadcast<T>(T(0));
  const bool smooth_loss = p.loss != nullptr && p.eps != T(0);
  Vec<T> xt[kLanesMaxC];  // xt[c][i] = x[r + i, c]; the gradient overwrites it
  int64_t r = r0;
  for (; r + W <= r1; r += W) {
    const T* x = p.x + r * C;
    for (int64_t c = 0; c < C; ++c) {
      for (int i = 0; i < W; ++i) xt[c][i] = x[i * C + c];
    }
    Vec<T> hi, lo;
    if (p.lse_in) {
      for (int i = 0; i < W; ++i) {
        const double lse = p.lse[r + i];
        hi[i] = T(lse);
        lo[i] = std::isfinite(hi[i]) ? T(lse - double(hi[i])) : T(0);
      }
    } else {
      Vec<T> m = xt[0];
      for (int64_t c = 1; c < C; ++c) m = cpu::vmax<T>(m, xt[c]);
      const Vec<T> sh = m == ninf ? zero : m;  // an all -inf row: exp(-inf - 0) = 0, lse = -inf
      Vec<T> sum = cpu::vexp0<T>(xt[0] - sh);
      for (int64_t c = 1; c < C; ++c) sum += cpu::vexp0<T>(xt[c] - sh);
      hi = m;
      lo = cpu::vlog_ge1<T>(sum);
      for (int i = 0; i < W; ++i) p.lse[r + i] = double(hi[i]) + double(lo[i]);
    }
    // per row (lane): the target's one-hot part of t, the smoothing part cu (t_c = cu w_c), and the gradient's
    // factors a = s sum(t) and su = s cu, hot = s t_y's one-hot part (s = grad_output)
    Vec<T> onehot, cu, a, su, hot, logp_y;
    IntVec<T> y_lane, kept;
    for (int i = 0; i < W; ++i) {
      const int64_t y = p.y[r + i];
      const bool ignored = y == p.ignore_index;
      const T s = p.gscale != nullptr ? p.gscale[(r + i) * p.gscale_stride] * p.gmul : T(0);
      const T wy = ignored ? T(0) : (p.w != nullptr ? p.w[y] : T(1));
      onehot[i] = ignored ? T(0) : (T(1) - p.eps) * wy;
      cu[i] = ignored ? T(0) : uniform;
      a[i] = ignored ? T(0) : s * (onehot[i] + cu[i] * p.w_sum);
      su[i] = ignored ? T(0) : s * cu[i];  // no 0 * inf: s is infinite for an all-ignored mean
      hot[i] = ignored ? T(0) : s * onehot[i];
      logp_y[i] = ignored ? T(0) : (x[i * C + y] - hi[i]) - lo[i];
      y_lane[i] = ignored ? I(-1) : I(y);
      kept[i] = ignored ? I(0) : I(-1);
    }
    if (p.loss != nullptr) {
      Vec<T> loss = zero - onehot * logp_y;  // +0, not -0, for an ignored row
      if (smooth_loss) {
        Vec<T> acc = zero;
        for (int64_t c = 0; c < C; ++c) acc += (p.w != nullptr ? p.w[c] : T(1)) * ((xt[c] - hi) - lo);
        loss = cpu::select<T>(kept, loss - uniform * acc, zero);
      }
      for (int i = 0; i < W; ++i) p.loss[r + i] = loss[i];
    }
    if (p.grad != nullptr) {
      for (int64_t c = 0; c < C; ++c) {
        const Vec<T> g = cpu::vexp0<T>((xt[c] - hi) - lo) * a - (p.w != nullptr ? p.w[c] : T(1)) * su;
        xt[c] = y_lane == I(c) ? g - hot : g;
      }
      T* g = p.grad + r * C;
      for (int64_t c = 0; c < C; ++c) {
        for (int i = 0; i < W; ++i) g[i * C + c] = xt[c][i];
      }
    }
  }
  return r;
}

// Loss and/or gradient for rows [r0, r1); see CERows.
template <typename T>
struct CrossEntropyRows {
  // Calls f(j, n, mask) for each vector of a row: n lanes valid (n == W except for the tail, whose lanes are
  // `tail`).
  template <typename F>
  static FASTMNIST_INLINE void each_vec(int64_t C, IntVec<T> tail, F&& f) {
    constexpr int W = kWidth<T>;
    const IntVec<T> all = cpu::lane_mask<T>(W);
    int64_t j = 0;
    for (; j + W <= C; j += W) f(j, int64_t(W), all);
    if (j < C) f(j, C - j, tail);
  }

  static FASTMNIST_INLINE void run(CERows<T> p, int64_t r0, int64_t r1) {
    constexpr T ninf = -std::numeric_limits<T>::infinity();
    const int64_t C = p.C;
    const T uniform = p.eps / T(C);
    const Vec<T> zero = cpu::broadcast<T>(T(0));
    const IntVec<T> tail = cpu::lane_mask<T>(C % kWidth<T>);
    const int64_t first = C <= kLanesMaxC && p.y != nullptr ? cross_entropy_lanes<T>(p, r0, r1) : r0;
    for (int64_t r = first; r < r1; ++r) {
      // A row's tail vector may read and write back (unchanged) elements past the row's end when they all lie
      // in the rows after it that this call handles later: (r1 - r - 1) * C of them, at least W - C % W needed.
      const bool over = (r1 - r - 1) * C >= kWidth<T> - C % kWidth<T>;
      const T* x = p.x + r * C;
      const double lse = p.lse_in ? p.lse[r] : row_lse<T>(x, C, over, tail);
      if (!p.lse_in) p.lse[r] = lse;
      // logp = (x - hi) - lo with hi + lo = lse: exact for the logits that matter (those near the max)
      const T hi = T(lse);
      const T lo = std::isfinite(hi) ? T(lse - double(hi)) : T(0);
      const Vec<T> hi_v = cpu::broadcast<T>(hi), lo_v = cpu::broadcast<T>(lo);
      const T s = p.gscale != nullptr ? p.gscale[r * p.gscale_stride] * p.gmul : T(0);
      T* g = p.grad != nullptr ? p.grad + r * C : nullptr;
      if (p.y != nullptr) {
        const int64_t y = p.y[r];
        const bool ignored = y == p.ignore_index;
        const T wy = ignored ? T(0) : (p.w != nullptr ? p.w[y] : T(1));
        const T onehot = ignored ? T(0) : (T(1) - p.eps) * wy;       // t_y's one-hot part
        const T cu = ignored ? T(0) : uniform;                        // t_c = cu w_c elsewhere
        const bool smooth_loss = p.loss != nullptr && !ignored && p.eps != T(0);
        const T logp_y = ignored ? T(0) : (x[y] - hi) - lo;           // read before g overwrites x
        const T a = ignored ? T(0) : s * (onehot + cu * p.w_sum);     // s sum(t)
        const T su = ignored ? T(0) : s * cu;
        const Vec<T> a_v = cpu::broadcast<T>(a), su_v = cpu::broadcast<T>(su);
        Vec<T> acc = zero;
        if (smooth_loss || g != nullptr) {
          each_vec(C, tail, [&](int64_t j, int64_t n, IntVec<T> mask) FASTMNIST_LAMBDA_INLINE {
            Vec<T> logp = (cpu::load_n<T>(x + j, n, ninf, over, mask) - hi_v) - lo_v;
            Vec<T> wv = p.w != nullptr ? cpu::load_n<T>(p.w + j, n, T(0), true, mask) : cpu::broadcast<T>(T(1));
            if (smooth_loss) acc += cpu::select<T>(mask, wv * logp, zero);
            if (g != nullptr) cpu::store_n<T>(g + j, cpu::vexp0<T>(logp) * a_v - wv * su_v, n, over, mask);
          });
        }
        if (g != nullptr && !ignored) g[y] -= s * onehot;
        if (p.loss != nullptr) {
          p.loss[r] = ignored ? T(0) : -onehot * logp_y - (smooth_loss ? uniform * cpu::hsum<T>(acc) : T(0));
        }
      } else {
        const T* q = p.q + r * C;
        const T keep = T(1) - p.eps;
        auto target = [&](int64_t j, int64_t n, IntVec<T> mask) FASTMNIST_LAMBDA_INLINE {
          Vec<T> t = cpu::load_n<T>(q + j, n, T(0), over, mask) * keep + uniform;
          return p.w != nullptr ? t * cpu::load_n<T>(p.w + j, n, T(0), true, mask) : t;
        };
        Vec<T> t_sum = zero, acc = zero;
        each_vec(C, tail, [&](int64_t j, int64_t n, IntVec<T> mask) FASTMNIST_LAMBDA_INLINE {
          Vec<T> t = target(j, n, mask);
          t_sum += cpu::select<T>(mask, t, zero);
          if (p.loss != nullptr) {
            Vec<T> logp = (cpu::load_n<T>(x + j, n, ninf, over, mask) - hi_v) - lo_v;
            acc += cpu::select<T>(mask, t * logp, zero);
          }
        });
        if (p.loss != nullptr) p.loss[r] = -cpu::hsum<T>(acc);
        if (g != nullptr || p.grad_q != nullptr) {
          const Vec<T> a_v = cpu::broadcast<T>(s * cpu::hsum<T>(t_sum)), s_v = cpu::broadcast<T>(s);
          const Vec<T> sq_v = cpu::broadcast<T>(-s * keep);
          T* gq = p.grad_q != nullptr ? p.grad_q + r * C : nullptr;
          each_vec(C, tail, [&](int64_t j, int64_t n, IntVec<T> mask) FASTMNIST_LAMBDA_INLINE {
            Vec<T> logp = (cpu::load_n<T>(x + j, n, ninf, over, mask) - hi_v) - lo_v;
            if (gq != nullptr) {
              Vec<T> wq = p.w != nullptr ? sq_v * cpu::load_n<T>(p.w + j, n, T(0), true, mask) : sq_v;
              cpu::store_n<T>(gq + j, wq * logp, n, over, mask);
            }
            if (g != nullptr) {
              cpu::store_n<T>(g + j, cpu::vexp0<T>(logp) * a_v - s_v * target(j, n, mask), n, over, mask);
            }
          });
        }
      }
    }
  }
};

// Rows per parallel task: about 4k logits (10-20 us of work; 1024 rows of 10 classes make two tasks).
int64_t row_grain(int64_t C) {
  return std::max<int64_t>(1, 4096 / std::max<int64_t>(C, 1));
}

}  // namespace

namespace cpu {
inline namespace FASTMNIST_VEC_NS {

// This build's row kernel over rows [0, rows), in parallel; cross_entropy_rows (below) picks a build per call.
template <typename T>
void cross_entropy_rows_at_width(const CERows<T>& p, int64_t rows) {
  at::parallel_for(0, rows, row_grain(p.C), [&](int64_t r0, int64_t r1) {
    run_kernel<CrossEntropyRows<T>>(p, r0, r1);
  });
}

template <typename T>
void cross_entropy_row_range_at_width(const CERows<T>& p, int64_t r0, int64_t r1) {
  run_kernel<CrossEntropyRows<T>>(p, r0, r1);
}

template void cross_entropy_rows_at_width<float>(const CERows<float>&, int64_t);
template void cross_entropy_rows_at_width<double>(const CERows<double>&, int64_t);
template void cross_entropy_row_range_at_width<float>(const CERows<float>&, int64_t, int64_t);
template void cross_entropy_row_range_at_width<double>(const CERows<double>&, int64_t, int64_t);

}  // namespace FASTMNIST_VEC_NS
}  // namespace cpu

// Everything below is built once, in the 32-byte build.
#if FASTMNIST_VEC_BYTES == 32
namespace cpu {

#if FASTMNIST_HAVE_X86_PATHS
namespace vec512 {  // cpu/avx512/cross_entropy.cpp
template <typename T>
void cross_entropy_rows_at_width(const CERows<T>& p, int64_t rows);
template <typename T>
void cross_entropy_row_range_at_width(const CERows<T>& p, int64_t r0, int64_t r1);
}  // namespace vec512
#endif

template <typename T>
void cross_entropy_rows(const CERows<T>& p, int64_t rows) {
#if FASTMNIST_HAVE_X86_PATHS
  if (cpu_path() == CpuPath::Avx512) return vec512::cross_entropy_rows_at_width<T>(p, rows);
#endif
  vec256::cross_entropy_rows_at_width<T>(p, rows);
}

template <typename T>
void cross_entropy_row_range(const CERows<T>& p, int64_t r0, int64_t r1) {
#if FASTMNIST_HAVE_X86_PATHS
  if (cpu_path() == CpuPath::Avx512) return vec512::cross_entropy_row_range_at_width<T>(p, r0, r1);
#endif
  vec256::cross_entropy_row_range_at_width<T>(p, r0, r1);
}

template void cross_entropy_rows<float>(const CERows<float>&, int64_t);
template void cross_entropy_rows<double>(const CERows<double>&, int64_t);
template void cross_entropy_row_range<float>(const CERows<float>&, int64_t, int64_t);
template void cross_entropy_row_range<double>(const CERows<double>&, int64_t, int64_t);

template <typename T>
double check_targets_and_weight_sum(const char* op, const int64_t* y, int64_t rows, int64_t C, const T* w,
                                    int64_t ignore_index) {
  double total = 0;
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t t = y[r];
    if (t == ignore_index) continue;
    TORCH_CHECK_INDEX(t >= 0 && t < C, op, ": target ", t, " is out of bounds: class-index targets must be in [0, ",
                      C, ") or equal ignore_index (", ignore_index, ")");
    total += w != nullptr ? double(w[t]) : 1.0;
  }
  return total;
}

template double check_targets_and_weight_sum<float>(const char*, const int64_t*, int64_t, int64_t, const float*,
                                                     int64_t);
template double check_targets_and_weight_sum<double>(const char*, const int64_t*, int64_t, int64_t, const double*,
                                                      int64_t);

}  // namespace cpu

namespace {

// Class weights padded with zeros to a multiple of 16 elements (64 bytes of floats, the widest vector): the
// kernels read them in whole vectors. Undefined (no class weights) stays undefined.
at::Tensor padded_class_weight(const at::Tensor& w) {
  if (!w.defined()) return w;
  const int64_t C = w.size(0);
  at::Tensor out = at::zeros({(C + 15) / 16 * 16}, w.options());
  out.narrow(0, 0, C).copy_(w);
  return out;
}

template <typename T>
CERows<T> make_rows(const SoftmaxCEArgs& n, int64_t ignore_index, double label_smoothing) {
  CERows<T> p{};
  p.x = n.x.const_data_ptr<T>();
  p.C = n.C;
  p.y = n.prob ? nullptr : n.target.const_data_ptr<int64_t>();
  p.q = n.prob ? n.target.const_data_ptr<T>() : nullptr;
  p.w = n.weight.defined() ? n.weight.const_data_ptr<T>() : nullptr;
  p.ignore_index = ignore_index;
  p.eps = T(label_smoothing);
  p.w_sum = T(n.C);
  if (p.w != nullptr) {
    double s = 0;
    for (int64_t c = 0; c < n.C; ++c) s += double(p.w[c]);
    p.w_sum = T(s);
  }
  return p;
}



// The mean's divisor: summed weights of the kept index targets, or the number of rows for probabilities.
template <typename T>
double mean_divisor(const char* op, const CERows<T>& p, int64_t rows) {
  if (p.y == nullptr) return double(rows);
  return cpu::check_targets_and_weight_sum<T>(op, p.y, rows, p.C, p.w, p.ignore_index);
}

template <typename T>
at::Tensor reduce_loss(const at::Tensor& loss_rows, int64_t reduction, double divisor) {
  if (reduction == kNone) return loss_rows;
  const T* l = loss_rows.const_data_ptr<T>();
  double total = 0;
  for (int64_t r = 0; r < loss_rows.numel(); ++r) total += double(l[r]);
  if (reduction == kMean) total /= divisor;
  return at::scalar_tensor(total, loss_rows.options());
}

std::tuple<at::Tensor, at::Tensor> softmax_cross_entropy_cpu(const at::Tensor& logits, const at::Tensor& target,
                                                             const std::optional<at::Tensor>& weight,
                                                             int64_t ignore_index, int64_t reduction,
                                                             double label_smoothing) {
  constexpr const char* op = "softmax_cross_entropy";
  SoftmaxCEArgs n = check_softmax_ce_args(op, check_float_tensor, logits, target, weight, reduction, label_smoothing);
  n.weight = padded_class_weight(n.weight);
  at::Tensor loss_rows = at::empty({n.rows}, logits.options());
  at::Tensor lse = at::empty({n.rows}, logits.options().dtype(at::kDouble));
  at::Tensor loss;
  AT_DISPATCH_FLOATING_TYPES(logits.scalar_type(), "softmax_cross_entropy_cpu", [&] {
    CERows<scalar_t> p = make_rows<scalar_t>(n, ignore_index, label_smoothing);
    const double divisor = mean_divisor<scalar_t>(op, p, n.rows);  // also checks the targets
    p.lse = lse.mutable_data_ptr<double>();
    p.loss = loss_rows.mutable_data_ptr<scalar_t>();
    cpu::cross_entropy_rows<scalar_t>(p, n.rows);
    loss = reduce_loss<scalar_t>(loss_rows, reduction, divisor);
  });
  return {loss, lse};
}

std::tuple<at::Tensor, at::Tensor> softmax_cross_entropy_backward_cpu(
    const at::Tensor& grad_loss, const at::Tensor& logits, const at::Tensor& target,
    const std::optional<at::Tensor>& weight, const at::Tensor& lse, int64_t ignore_index, int64_t reduction,
    double label_smoothing, std::array<bool, 2> output_mask) {
  constexpr const char* op = "softmax_cross_entropy_backward";
  SoftmaxCEArgs n = check_softmax_ce_args(op, check_float_tensor, logits, target, weight, reduction, label_smoothing);
  check_ce_grad_loss_args(op, grad_loss, lse, "logits", logits, reduction, n.rows);
  n.weight = padded_class_weight(n.weight);
  const bool want_q = output_mask[1] && n.prob;
  at::Tensor grad = output_mask[0] ? at::empty_like(n.x) : at::empty({0}, logits.options());
  at::Tensor grad_q = want_q ? at::empty_like(n.x) : at::empty({0}, logits.options());
  if (!output_mask[0] && !want_q) return {grad, grad_q};
  const at::Tensor g = grad_loss.contiguous();
  const at::Tensor lse_c = lse.contiguous();
  AT_DISPATCH_FLOATING_TYPES(logits.scalar_type(), "softmax_cross_entropy_backward_cpu", [&] {
    CERows<scalar_t> p = make_rows<scalar_t>(n, ignore_index, label_smoothing);
    const double divisor = mean_divisor<scalar_t>(op, p, n.rows);
    p.lse = const_cast<double*>(lse_c.const_data_ptr<double>());  // read only: lse_in
    p.lse_in = true;
    p.grad = output_mask[0] ? grad.mutable_data_ptr<scalar_t>() : nullptr;
    p.grad_q = want_q ? grad_q.mutable_data_ptr<scalar_t>() : nullptr;
    p.gscale = g.const_data_ptr<scalar_t>();
    p.gscale_stride = reduction == kNone ? 1 : 0;
    p.gmul = reduction == kMean ? scalar_t(1.0 / divisor) : scalar_t(1);
    cpu::cross_entropy_rows<scalar_t>(p, n.rows);
  });
  return {grad, grad_q};
}

// linear_cross_entropy_chunks.h with this file's row kernel
template <typename T>
void linear_ce_chunks(const LinearCEArgs& a, const CERows<T>& p, bool grads, LinearCEGrads& g) {
  const int64_t chunk = linear_ce_chunk_rows(a, sizeof(T), kChunkBytes, kMinChunkRows);
  fastmnist::linear_ce_chunks<T>(a, p, grads, chunk, g,
                                 [](const CERows<T>& c, int64_t rows) { cpu::cross_entropy_rows<T>(c, rows); });
}

template <typename T>
CERows<T> linear_rows(const LinearCEArgs& a, int64_t ignore_index, double label_smoothing) {
  SoftmaxCEArgs n;
  n.x = a.x;  // unused by make_rows beyond its pointer, replaced per chunk
  n.target = a.target;
  n.weight = a.class_weight;
  n.prob = a.prob;
  n.rows = a.N * a.D;
  n.C = a.C;
  return make_rows<T>(n, ignore_index, label_smoothing);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> linear_cross_entropy_cpu(
    const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias, const at::Tensor& target,
    const std::optional<at::Tensor>& class_weight, int64_t num_classes, int64_t ignore_index, int64_t reduction,
    double label_smoothing, std::array<bool, 3> grad_mask) {
  constexpr const char* op = "linear_cross_entropy";
  LinearCEArgs a = check_linear_ce_args(op, check_float_tensor, x, weight, bias, target, class_weight, num_classes,
                                        reduction, label_smoothing);
  a.class_weight = padded_class_weight(a.class_weight);
  const int64_t rows = a.N * a.D;
  const bool precompute = reduction != kNone && (grad_mask[0] || grad_mask[1] || (grad_mask[2] && a.b.defined()));
  LinearCEGrads grads = make_linear_ce_grads(
      a, x, weight, {precompute && grad_mask[0], precompute && grad_mask[1], precompute && grad_mask[2]});
  at::Tensor loss_rows = at::empty({rows}, x.options());
  at::Tensor lse = at::empty({rows}, x.options().dtype(at::kDouble));
  at::Tensor loss;
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "linear_cross_entropy_cpu", [&] {
    CERows<scalar_t> p = linear_rows<scalar_t>(a, ignore_index, label_smoothing);
    const double divisor = mean_divisor<scalar_t>(op, p, rows);
    const scalar_t one = 1;
    p.lse = lse.mutable_data_ptr<double>();
    p.loss = loss_rows.mutable_data_ptr<scalar_t>();
    if (precompute) {
      p.gscale = &one;
      p.gmul = reduction == kMean ? scalar_t(1.0 / divisor) : scalar_t(1);
    }
    linear_ce_chunks<scalar_t>(a, p, precompute, grads);
    loss = reduce_loss<scalar_t>(loss_rows, reduction, divisor);
  });
  return {loss, lse, grads.x, grads.w, grads.b};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> linear_cross_entropy_backward_cpu(
    const at::Tensor& grad_loss, const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
    const at::Tensor& target, const std::optional<at::Tensor>& class_weight, const at::Tensor& lse,
    int64_t num_classes, int64_t ignore_index, int64_t reduction, double label_smoothing,
    std::array<bool, 3> output_mask) {
  constexpr const char* op = "linear_cross_entropy_backward";
  LinearCEArgs a = check_linear_ce_args(op, check_float_tensor, x, weight, bias, target, class_weight, num_classes,
                                        reduction, label_smoothing);
  const int64_t rows = a.N * a.D;
  check_ce_grad_loss_args(op, grad_loss, lse, "x", x, reduction, rows);
  a.class_weight = padded_class_weight(a.class_weight);
  LinearCEGrads grads = make_linear_ce_grads(a, x, weight, output_mask);
  if (!(grads.mask[0] || grads.mask[1] || grads.mask[2])) return {grads.x, grads.w, grads.b};
  const at::Tensor g = grad_loss.contiguous();
  const at::Tensor lse_c = lse.contiguous();
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "linear_cross_entropy_backward_cpu", [&] {
    CERows<scalar_t> p = linear_rows<scalar_t>(a, ignore_index, label_smoothing);
    const double divisor = mean_divisor<scalar_t>(op, p, rows);
    p.lse = const_cast<double*>(lse_c.const_data_ptr<double>());  // read only: lse_in
    p.lse_in = true;
    p.gscale = g.const_data_ptr<scalar_t>();
    p.gscale_stride = reduction == kNone ? 1 : 0;
    p.gmul = reduction == kMean ? scalar_t(1.0 / divisor) : scalar_t(1);
    linear_ce_chunks<scalar_t>(a, p, true, grads);
  });
  return {grads.x, grads.w, grads.b};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastmnist, CPU, m) {
  m.impl("softmax_cross_entropy", &softmax_cross_entropy_cpu);
  m.impl("softmax_cross_entropy_backward", &softmax_cross_entropy_backward_cpu);
  m.impl("linear_cross_entropy", &linear_cross_entropy_cpu);
  m.impl("linear_cross_entropy_backward", &linear_cross_entropy_backward_cpu);
}

#endif  // FASTMNIST_VEC_BYTES == 32

}  // namespace fastmnist
