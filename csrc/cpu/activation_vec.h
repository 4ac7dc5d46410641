// Vectorised activations (forward) and the activation-derivative product (backward), for the CPU kernels.
// The derivative is taken from the output y, as in csrc/activation.h.
#pragma once

#include "activation.h"
#include "cpu/simd.h"

namespace fastmnist::cpu {
inline namespace FASTMNIST_VEC_NS {  // see simd.h

// act(z) for every lane of U vectors, in place; sigmoid and tanh take their exps U vectors at a time
// (simd.h's vexp_n), so kernels that have several vectors ready pass them together.
//   sigmoid(z) = 1 / (1 + e^-z): e^-z saturates at large |z|, so the result tends to 0 or 1 without NaN.
//   tanh(z) = sign(z) (1 - t) / (1 + t), t = e^{-2|z|} in (0, 1]: no overflow for any z.
// A NaN z gives NaN, as in PyTorch: relu's test lets it through, and vexp keeps it for sigmoid and tanh.
template <Activation A, typename T, int U>
FASTMNIST_INLINE void vactivate_n(Vec<T> (&z)[U], T slope) {
  if constexpr (A == Activation::Sigmoid || A == Activation::Tanh) {
    Vec<T> e[U];
#pragma GCC unroll 16
    for (int u = 0; u < U; ++u) e[u] = A == Activation::Sigmoid ? -z[u] : T(-2) * (z[u] < T(0) ? -z[u] : z[u]);
    vexp_n<T, U>(e);
#pragma GCC unroll 16
    for (int u = 0; u < U; ++u) {
      if constexpr (A == Activation::Sigmoid) {
        z[u] = T(1) / (T(1) + e[u]);
      } else {
        const Vec<T> m = (T(1) - e[u]) / (T(1) + e[u]);
        z[u] = z[u] < T(0) ? -m : m;
      }
    }
  } else {
#pragma GCC unroll 16
    for (int u = 0; u < U; ++u) {
      if constexpr (A == Activation::Relu) z[u] = z[u] < T(0) ? broadcast<T>(T(0)) : z[u];
      if constexpr (A == Activation::LeakyRelu) z[u] = z[u] > T(0) ? z[u] : z[u] * slope;
    }
  }
}

template <Activation A, typename T>
FASTMNIST_INLINE Vec<T> vactivate(Vec<T> z, T slope) {
  Vec<T> v[1] = {z};
  vactivate_n<A, T, 1>(v, slope);
  return v[0];
}

// The scalar twin of vactivate, for loop tails; same formulas, so tails match the vector lanes.
template <Activation A, typename T>
FASTMNIST_INLINE T activate(T z, T slope) {
  Vec<T> v = broadcast<T>(z);
  return vactivate<A, T>(v, slope)[0];
}

template <Activation A, typename T>
FASTMNIST_INLINE Vec<T> vgrad_from_output(Vec<T> y, T slope) {
  if constexpr (A == Activation::Identity) return broadcast<T>(T(1));
  if constexpr (A == Activation::Relu) return y <= T(0) ? broadcast<T>(T(0)) : broadcast<T>(T(1));
  if constexpr (A == Activation::LeakyRelu) return y > T(0) ? broadcast<T>(T(1)) : broadcast<T>(slope);
  if constexpr (A == Activation::Sigmoid) return y * (T(1) - y);
  if constexpr (A == Activation::Tanh) return T(1) - y * y;
}

// The compile-time activation dispatch lives in activation.h, shared with the CUDA kernels.
using fastmnist::ActivationConstant;
using fastmnist::with_activation;

}  // namespace FASTMNIST_VEC_NS
}  // namespace fastmnist::cpu
