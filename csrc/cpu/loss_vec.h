// Vector helpers for the loss kernels (cross_entropy.cpp, sigmoid_bce.cpp): an exp that is exact at the
// edges the losses meet (underflow to 0, NaN in gives NaN out), log1p on [0, 1], and partial loads/stores for
// the tail of a row, so that short rows (10 classes) stay vectorised.
#pragma once

#include "cpu/simd.h"

#include <limits>

namespace fastmnist::cpu {

// exp(x), with exp(x) = 0 below the underflow limit (exp(-inf) = 0) and NaN kept: softmax rows with -inf
// logits and all-(-inf) rows then give eager's results (simd.h's vexp clamps, which is right for activations).
template <typename T>
FASTMNIST_INLINE Vec<T> vexp0(Vec<T> x) {
  constexpr T lo = sizeof(T) == 4 ? T(-87.0) : T(-708.0);
  Vec<T> r = vexp<T>(x);
  r = x < lo ? broadcast<T>(T(0)) : r;
  return x == x ? r : x;
}

// log1p(u) for u in [0, 1]: 2 atanh(f), f = u / (2 + u) in [0, 1/3], by its odd series (7 terms for float,
// 16 for double: truncation below half an ulp). Accurate in relative terms for tiny u, unlike log(1 + u).
template <typename T>
FASTMNIST_INLINE Vec<T> vlog1p_unit(Vec<T> u) {
  constexpr int terms = sizeof(T) == 4 ? 7 : 16;
  Vec<T> f = u / (T(2) + u);
  Vec<T> f2 = f * f;
  Vec<T> p = broadcast<T>(T(1) / T(2 * terms - 1));
  for (int k = terms - 2; k >= 0; --k) p = p * f2 + T(1) / T(2 * k + 1);
  return T(2) * f * p;
}

// softplus(z) = log(1 + e^z) = max(z, 0) + log1p(e^-|z|), finite for every finite z.
template <typename T>
FASTMNIST_INLINE Vec<T> vsoftplus(Vec<T> z) {
  Vec<T> a = z < T(0) ? -z : z;
  Vec<T> m = z > T(0) ? z : broadcast<T>(T(0));
  return m + vlog1p_unit<T>(vexp0<T>(-a));
}

// Lanes [0, n) true.
template <typename T>
FASTMNIST_INLINE IntVec<T> lane_mask(int64_t n) {
  IntVec<T> m;
  for (int i = 0; i < kWidth<T>; ++i) m[i] = i < n ? -1 : 0;
  return m;
}

// The first n < kWidth elements of p, the other lanes `fill`.
template <typename T>
FASTMNIST_INLINE Vec<T> load_partial(const T* p, int64_t n, T fill) {
  T buf[kWidth<T>];
  for (int i = 0; i < kWidth<T>; ++i) buf[i] = fill;
  std::memcpy(buf, p, n * sizeof(T));
  return load<T>(buf);
}

template <typename T>
FASTMNIST_INLINE void store_partial(T* p, Vec<T> v, int64_t n) {
  T buf[kWidth<T>];
  store<T>(buf, v);
  std::memcpy(p, buf, n * sizeof(T));
}

// Loads n elements (n == kWidth: a full vector) with `fill` in the unused lanes.
template <typename T>
FASTMNIST_INLINE Vec<T> load_n(const T* p, int64_t n, T fill) {
  return n == kWidth<T> ? load<T>(p) : load_partial<T>(p, n, fill);
}

template <typename T>
FASTMNIST_INLINE void store_n(T* p, Vec<T> v, int64_t n) {
  if (n == kWidth<T>) {
    store<T>(p, v);
  } else {
    store_partial<T>(p, v, n);
  }
}

template <typename T>
FASTMNIST_INLINE Vec<T> select(IntVec<T> mask, Vec<T> a, Vec<T> b) {
  return mask ? a : b;
}

}  // namespace fastmnist::cpu
