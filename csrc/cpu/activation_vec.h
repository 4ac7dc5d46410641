// Vectorised activations (forward) and the activation-derivative product (backward), for the CPU kernels.
// The derivative is taken from the output y, as in csrc/activation.h.
#pragma once

#include "activation.h"
#include "cpu/simd.h"

namespace fastmnist::cpu {

// sigmoid(z) = 1 / (1 + e^-z): e^-z saturates at large |z|, so the result tends to 0 or 1 without NaN.
template <typename T>
FASTMNIST_INLINE Vec<T> vsigmoid(Vec<T> z) {
  return T(1) / (T(1) + vexp<T>(-z));
}

// tanh(z) = sign(z) (1 - t) / (1 + t), t = e^{-2|z|} in (0, 1]: no overflow for any z.
template <typename T>
FASTMNIST_INLINE Vec<T> vtanh(Vec<T> z) {
  Vec<T> a = z < T(0) ? -z : z;
  Vec<T> t = vexp<T>(T(-2) * a);
  Vec<T> m = (T(1) - t) / (T(1) + t);
  return z < T(0) ? -m : m;
}

template <Activation A, typename T>
FASTMNIST_INLINE Vec<T> vactivate(Vec<T> z, T slope) {
  if constexpr (A == Activation::Identity) return z;
  if constexpr (A == Activation::Relu) return z > T(0) ? z : broadcast<T>(T(0));
  if constexpr (A == Activation::LeakyRelu) return z > T(0) ? z : z * slope;
  if constexpr (A == Activation::Sigmoid) return vsigmoid<T>(z);
  if constexpr (A == Activation::Tanh) return vtanh<T>(z);
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
  if constexpr (A == Activation::Relu) return y > T(0) ? broadcast<T>(T(1)) : broadcast<T>(T(0));
  if constexpr (A == Activation::LeakyRelu) return y > T(0) ? broadcast<T>(T(1)) : broadcast<T>(slope);
  if constexpr (A == Activation::Sigmoid) return y * (T(1) - y);
  if constexpr (A == Activation::Tanh) return T(1) - y * y;
}

// The compile-time activation dispatch lives in activation.h, shared with the CUDA kernels.
using fastmnist::ActivationConstant;
using fastmnist::with_activation;

}  // namespace fastmnist::cpu
