// Vector helpers for the loss kernels (cross_entropy.cpp, sigmoid_bce.cpp): an exp that is exact at the
// edges the losses meet (underflow to 0, NaN in gives NaN out), log1p on [0, 1], and partial loads/stores for
// the tail of a row, so that short rows (10 classes) stay vectorised.
#pragma once

#include "cpu/simd.h"

#include <limits>
#include <utility>

namespace fastmnist::cpu {
inline namespace FASTMNIST_VEC_NS {  // see simd.h

// exp(x) that is exact at the low edge the losses meet: 0 below the underflow limit (exp(-inf) = 0, where vexp
// saturates); NaN in gives NaN out, as vexp's. Softmax rows with -inf logits and all-(-inf) rows then give
// eager's results.
template <typename T>
FASTMNIST_INLINE Vec<T> vexp0(Vec<T> x) {
  return x < ExpRange<T>::lo ? broadcast<T>(T(0)) : vexp<T>(x);
}

// sigmoid(x) with one exp and one division, accurate in relative terms in both tails: with e = exp(-|x|) in
// (0, 1], sigmoid(x) = 1 / (1 + e) for x >= 0 and e / (1 + e) for x < 0 (no 1 - tiny cancellation), and
// exactly 0 or 1 at -inf and +inf, as vexp0's edges give.
template <typename T>
FASTMNIST_INLINE Vec<T> vsigmoid0(Vec<T> x) {
  const Vec<T> e = vexp0<T>(x < T(0) ? x : -x);
  return (x < T(0) ? e : broadcast<T>(T(1))) / (T(1) + e);
}

// Horizontal max and sum of the lanes, by halving shuffles: each step combines lane i with lane i ^ H, for
// H = W/2, W/4, ..., 1 (the sum's order is therefore fixed per width).
template <typename T, int H, std::size_t... I>
FASTMNIST_INLINE Vec<T> swap_lanes(Vec<T> v, std::index_sequence<I...>) {
  return __builtin_shufflevector(v, v, (I ^ H)...);
}

template <typename T, int H = kWidth<T> / 2>
FASTMNIST_INLINE T hmax(Vec<T> v) {
  if constexpr (H == 0) {
    return v[0];
  } else {
    return hmax<T, H / 2>(vmax<T>(v, swap_lanes<T, H>(v, std::make_index_sequence<kWidth<T>>{})));
  }
}

template <typename T, int H = kWidth<T> / 2>
FASTMNIST_INLINE T hsum(Vec<T> v) {
  if constexpr (H == 0) {
    return v[0];
  } else {
    return hsum<T, H / 2>(v + swap_lanes<T, H>(v, std::make_index_sequence<kWidth<T>>{}));
  }
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

// log(s) for s >= 1 (or 0, or NaN): s = 2^e f with f in [1, 2), log(s) = e ln2 + log1p(f - 1). log(0) = -inf
// and NaN stays NaN, as std::log.
template <typename T>
FASTMNIST_INLINE Vec<T> vlog_ge1(Vec<T> s) {
  constexpr bool is_float = sizeof(T) == 4;
  using I = std::conditional_t<is_float, int32_t, int64_t>;
  constexpr int mantissa = is_float ? 23 : 52;
  constexpr I bias = is_float ? 127 : 1023;
  constexpr I mantissa_bits = (I(1) << mantissa) - 1;
  constexpr T ln2_hi = is_float ? T(0.693359375) : T(0.693147180369123816490);
  constexpr T ln2_lo = is_float ? T(-2.12194440e-4) : T(1.90821492927058770002e-10);
  IntVec<T> bits;
  std::memcpy(&bits, &s, sizeof(bits));
  const Vec<T> e = __builtin_convertvector((bits >> mantissa) - bias, Vec<T>);
  bits = (bits & mantissa_bits) | (bias << mantissa);
  Vec<T> f;
  std::memcpy(&f, &bits, sizeof(f));
  const Vec<T> out = e * ln2_hi + (e * ln2_lo + vlog1p_unit<T>(f - T(1)));
  const Vec<T> zero_case = s == T(0) ? broadcast<T>(-std::numeric_limits<T>::infinity()) : out;
  return s == s ? zero_case : s;
}

// softplus(z) = log(1 + e^z) = max(z, 0) + log1p(e^-|z|), finite for every finite z.
template <typename T>
FASTMNIST_INLINE Vec<T> vsoftplus(Vec<T> z) {
  Vec<T> a = z < T(0) ? -z : z;
  Vec<T> m = z > T(0) ? z : broadcast<T>(T(0));
  return m + vlog1p_unit<T>(vexp0<T>(-a));
}

// The first n < kWidth elements of p, the other lanes `fill`.
template <typename T>
FASTMNIST_INLINE Vec<T> load_partial(const T* p, int64_t n, T fill) {
  T buf[kWidth<T>];
  for (int i = 0; i < kWidth<T>; ++i) buf[i] = i < n ? p[i] : fill;
  return load<T>(buf);
}

template <typename T>
FASTMNIST_INLINE void store_partial(T* p, Vec<T> v, int64_t n) {
  T buf[kWidth<T>];
  store<T>(buf, v);
  for (int i = 0; i < n; ++i) p[i] = buf[i];
}

// Loads n <= kWidth elements (n == kWidth: a full vector) with `fill` in the unused lanes. With `overread` the
// caller guarantees that a whole vector at p may be read (the row is not the last one it touches): the tail is
// then one load blended with `mask` (lanes < n), instead of a lane-by-lane copy and its store-forwarding stall.
template <typename T>
FASTMNIST_INLINE Vec<T> load_n(const T* p, int64_t n, T fill, bool overread, IntVec<T> mask) {
  if (n == kWidth<T>) return load<T>(p);
  if (overread) return mask ? load<T>(p) : broadcast<T>(fill);
  return load_partial<T>(p, n, fill);
}

// Stores the first n lanes of v. With `overread` the caller guarantees that the elements past n belong to rows
// only it touches later: they are written back unchanged in one blended store.
template <typename T>
FASTMNIST_INLINE void store_n(T* p, Vec<T> v, int64_t n, bool overread, IntVec<T> mask) {
  if (n == kWidth<T>) {
    store<T>(p, v);
  } else if (overread) {
    store<T>(p, mask ? v : load<T>(p));
  } else {
    store_partial<T>(p, v, n);
  }
}

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

}  // namespace FASTMNIST_VEC_NS
}  // namespace fastmnist::cpu
