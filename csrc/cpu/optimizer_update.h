// The fused step's optimizer updates, vectorised: one pass over a parameter, its gradient and its state.
//
// The formulas are torch.optim's single-tensor SGD and Adam/AdamW, term for term in the same order, so a
// fused step matches an eager one to rounding (an eager step makes one pass per term; this makes one in all).
// A tail shorter than a vector goes through the same code on a padded copy, so every element sees one formula.
// Subnormal values are flushed to zero in the updates (FlushSubnormals, cpu/simd.h): the one place where the
// numbers may differ from eager's by more than rounding, and only below 1.2e-38 (float) or 2.2e-308 (double).
// Measured on an Intel Xeon (AVX-512), one thread: the classifier's batch-1 Adam step over MNIST took 850 us with
// subnormals (10% of its 784x200 first moments were subnormal after 10,000 steps) and 180 us without.
#pragma once

#include <algorithm>

#include "cpu/simd.h"

namespace fastmnist::cpu {
inline namespace FASTMNIST_VEC_NS {  // see simd.h

template <typename T>
struct SgdArgs {
  T lr, weight_decay, momentum, one_minus_dampening;
  bool nesterov;
  bool fresh;  // the momentum buffer is new: torch.optim sets it to the first gradient
};

template <typename T>
struct AdamArgs {
  T step_size;              // lr / (1 - beta1^t)
  T bias_correction2_sqrt;  // sqrt(1 - beta2^t)
  T one_minus_beta1, beta2, one_minus_beta2, eps, weight_decay;
  T decay;                  // AdamW: 1 - lr * weight_decay
  bool decoupled;           // AdamW's decoupled weight decay
};

// The gradient as the updates read it: element i of a parameter stored as rows of `cols` elements is
// g[i % cols] * scale[i / cols]. A plain gradient is one row (scale null: no product). A batch-1 linear layer's
// weight gradient, the outer product gz^T x, is rows of x scaled by gz: each element is the one product that a
// GEMM would form, so the numbers are the same, and the gradient is never written to memory.
template <typename T>
struct GradRows {
  const T* g;
  const T* scale;
  int64_t cols;
};

// Runs Block::apply on elements [i0, i1) of p and the arrays beside it (nullptr: absent), kWidth<T> elements at
// a time within each row; a row's tail goes through the same code on a padded copy.
template <typename T, typename Block, typename Args>
FASTMNIST_INLINE void update_blocks(T* p, GradRows<T> grad, T* s1, T* s2, int64_t i0, int64_t i1,
                                    const Args& args) {
  constexpr int W = kWidth<T>;
  for (int64_t i = i0; i < i1;) {
    const int64_t row = i / grad.cols, end = std::min(i1, (row + 1) * grad.cols);
    const T* g = grad.g + (i - row * grad.cols);
    auto gradient = [&](const T* gv) FASTMNIST_LAMBDA_INLINE {
      return grad.scale != nullptr ? load<T>(gv) * grad.scale[row] : load<T>(gv);
    };
    for (; i + W <= end; i += W, g += W)
      Block::apply(p + i, gradient(g), s1 ? s1 + i : nullptr, s2 ? s2 + i : nullptr, args);
    if (i == end) continue;
    const int64_t rest = end - i;
    T tp[W] = {}, tg[W] = {}, t1[W] = {}, t2[W] = {};
    for (int64_t j = 0; j < rest; ++j) {
      tp[j] = p[i + j], tg[j] = g[j];
      if (s1) t1[j] = s1[i + j];
      if (s2) t2[j] = s2[i + j];
    }
    Block::apply(tp, gradient(tg), s1 ? t1 : nullptr, s2 ? t2 : nullptr, args);
    for (int64_t j = 0; j < rest; ++j) {
      p[i + j] = tp[j];
      if (s1) s1[i + j] = t1[j];
      if (s2) s2[i + j] = t2[j];
    }
    i = end;
  }
}

// d = g + wd p; buf = fresh ? d : momentum buf + (1 - dampening) d; d = nesterov ? d + momentum buf : buf;
// p -= lr d. `buf` is nullptr without momentum.
template <typename T>
struct SgdBlock {
  static FASTMNIST_INLINE void apply(T* p, Vec<T> d, T* buf, T*, const SgdArgs<T>& a) {
    const Vec<T> param = load<T>(p);
    if (a.weight_decay != T(0)) d = d + param * a.weight_decay;
    if (buf != nullptr) {
      const Vec<T> b = a.fresh ? d : load<T>(buf) * a.momentum + d * a.one_minus_dampening;
      store<T>(buf, b);
      d = a.nesterov ? d + b * a.momentum : b;
    }
    store<T>(p, param - d * a.lr);
  }
};

// Adam (AdamW when decoupled): m = lerp(m, d, 1 - beta1); v = beta2 v + (1 - beta2) d^2;
// p -= step_size m / (sqrt(v) / sqrt(1 - beta2^t) + eps).
template <typename T>
struct AdamBlock {
  static FASTMNIST_INLINE void apply(T* p, Vec<T> d, T* m, T* v, const AdamArgs<T>& a) {
    Vec<T> param = load<T>(p);
    if (a.weight_decay != T(0)) {
      if (a.decoupled) param = param * a.decay;
      else d = d + param * a.weight_decay;
    }
    // lerp in ATen's two forms (chosen by the weight), so the rounding is eager's
    const Vec<T> m0 = load<T>(m);
    const Vec<T> m1 = a.one_minus_beta1 < T(0.5) ? m0 + (d - m0) * a.one_minus_beta1
                                                 : d - (d - m0) * (T(1) - a.one_minus_beta1);
    const Vec<T> v1 = load<T>(v) * a.beta2 + a.one_minus_beta2 * d * d;
    store<T>(m, m1);
    store<T>(v, v1);
    const Vec<T> denom = vsqrt<T>(v1) / a.bias_correction2_sqrt + a.eps;
    store<T>(p, param + (m1 / denom) * -a.step_size);
  }
};

template <typename T>
struct SgdUpdate {
  static FASTMNIST_INLINE void run(T* p, GradRows<T> g, T* buf, int64_t i0, int64_t i1, SgdArgs<T> args) {
    FlushSubnormals flush;
    update_blocks<T, SgdBlock<T>>(p, g, buf, nullptr, i0, i1, args);
  }
};

template <typename T>
struct AdamUpdate {
  static FASTMNIST_INLINE void run(T* p, GradRows<T> g, T* m, T* v, int64_t i0, int64_t i1, AdamArgs<T> args) {
    FlushSubnormals flush;
    update_blocks<T, AdamBlock<T>>(p, g, m, v, i0, i1, args);
  }
};

}  // namespace FASTMNIST_VEC_NS
}  // namespace fastmnist::cpu
