// Portable SIMD for the CPU kernels, with the vectorised paths chosen at run time.
//
// Kernels are written once as structs with an always-inline static `run`, templates over `Vec<T>` (GCC/Clang
// vector extensions of FASTMNIST_VEC_BYTES bytes), dispatched by run_kernel<K>() below. A translation unit is
// built at one width:
//   32 bytes (8 floats, 4 doubles), the default: each entry point is compiled twice, once for baseline x86-64
//     (the vector ops become SSE2 pairs) and once with target("avx2,fma");
//   64 bytes (16 floats, 8 doubles): a kernel file included again by a file in cpu/avx512/, which defines
//     FASTMNIST_VEC_BYTES 64 first; its entry points are compiled with the AVX-512 target only, and the op's
//     registration (in the 32-byte build) calls them where cpu_path() is Avx512.
// A build made on one machine therefore runs on any x86-64 CPU and uses the widest vectors it has. The paths
// compute the same function; they differ only in rounding (FMA contraction, and the order of lane sums).
// Everything whose definition depends on the width lives in the inline namespace FASTMNIST_VEC_NS (vec256 or
// vec512), so that the two builds of a template never share a mangled name.
#pragma once

#include <c10/util/Exception.h>

#include <bit>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <string>
#include <type_traits>
#include <utility>

#ifndef FASTMNIST_VEC_BYTES
#define FASTMNIST_VEC_BYTES 32
#endif
#if FASTMNIST_VEC_BYTES == 32
#define FASTMNIST_VEC_NS vec256
#elif FASTMNIST_VEC_BYTES == 64
#define FASTMNIST_VEC_NS vec512
#else
#error "FASTMNIST_VEC_BYTES must be 32 or 64"
#endif

#if defined(__x86_64__) || defined(__i386__)
#define FASTMNIST_HAVE_X86_PATHS 1
#define FASTMNIST_TARGET_AVX2 __attribute__((target("avx2,fma")))
#define FASTMNIST_TARGET_AVX512 __attribute__((target("avx512f,avx512dq,avx512bw,avx512vl,avx2,fma")))
#else
#define FASTMNIST_HAVE_X86_PATHS 0
#endif
#if FASTMNIST_HAVE_X86_PATHS
#include <xmmintrin.h>
#endif
#if FASTMNIST_VEC_BYTES == 64 && !FASTMNIST_HAVE_X86_PATHS
#error "the 64-byte kernels are built for x86-64 (AVX-512) only"
#endif

// Kernel-level functions (always inlined into run_kernel's entry points). In the 64-byte build they are AVX-512
// functions, so that they may use AVX-512 intrinsics where the generic vector code compiles badly; the compiler
// then refuses any call to them from code compiled for the baseline.
// For lambdas inside kernels, FASTMNIST_LAMBDA_INLINE: they must be inlined into the caller compiled for the
// path (a lambda is compiled for the baseline target, and passing 32-byte vectors between the two would not even
// agree on the ABI).
#if FASTMNIST_VEC_BYTES == 64
#define FASTMNIST_INLINE inline __attribute__((always_inline)) FASTMNIST_TARGET_AVX512
#define FASTMNIST_LAMBDA_INLINE __attribute__((always_inline)) FASTMNIST_TARGET_AVX512
#else
#define FASTMNIST_INLINE inline __attribute__((always_inline))
#define FASTMNIST_LAMBDA_INLINE __attribute__((always_inline))
#endif

namespace fastmnist::cpu {

// While in scope, this thread flushes subnormal floats to zero, as inputs (DAZ) and as results (FTZ); the
// previous mode comes back at the end of the scope. On x86 a subnormal operand or result costs a microcode
// assist (~100 cycles on Intel cores), and some state crosses that range in bulk: Adam's first moment decays
// by beta1 per step where the gradient is 0, as for the border pixels of MNIST. A no-op elsewhere.
class FlushSubnormals {
 public:
#if FASTMNIST_HAVE_X86_PATHS
  FlushSubnormals() : saved_(_mm_getcsr()) { _mm_setcsr(saved_ | kFlushToZero | kDenormalsAreZero); }
  ~FlushSubnormals() { _mm_setcsr(saved_); }

 private:
  static constexpr unsigned kFlushToZero = 0x8000, kDenormalsAreZero = 0x0040;  // MXCSR bits
  unsigned saved_;
#endif
};

// The compiled path the kernels take, ordered: Avx512 runs the 64-byte builds where an op has one, and the AVX2
// path elsewhere. Set by set_cpu_path(); by default the best this CPU has.
enum class CpuPath : int { Portable = 0, Avx2 = 1, Avx512 = 2 };
CpuPath cpu_path();
// "auto", "avx512", "avx2" or "portable"; returns the path in use afterwards. A path the CPU lacks is an error.
std::string set_cpu_path(const std::string& path);

inline namespace FASTMNIST_VEC_NS {

template <typename T>
struct VecType {
  typedef T type __attribute__((vector_size(FASTMNIST_VEC_BYTES)));
};
template <typename T>
using Vec = typename VecType<T>::type;
template <typename T>
using IntVec = typename VecType<std::conditional_t<sizeof(T) == 4, int32_t, int64_t>>::type;

template <typename T>
constexpr int kWidth = FASTMNIST_VEC_BYTES / sizeof(T);

template <typename T>
FASTMNIST_INLINE Vec<T> load(const T* p) {
  Vec<T> v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}
template <typename T>
FASTMNIST_INLINE void store(T* p, Vec<T> v) {
  std::memcpy(p, &v, sizeof(v));
}
template <typename T>
FASTMNIST_INLINE Vec<T> broadcast(T x) {
  return Vec<T>{} + x;
}
// Lanes [0, n) true.
template <typename T>
FASTMNIST_INLINE IntVec<T> lane_mask(int64_t n) {
  IntVec<T> m;
  for (int i = 0; i < kWidth<T>; ++i) m[i] = i < n ? -1 : 0;
  return m;
}

// Sum of the lanes as a tree: the upper half is added to the lower half until two lanes are left, in a fixed order
// (deterministic). For 16 floats: 4 dependent adds and 4 shuffles, where a lane-by-lane sum compiled to a chain of
// 16 dependent scalar adds and 15 lane extractions (linear_act's small-output forward tile takes 24 such sums).
template <typename T, typename V, std::size_t... I>
FASTMNIST_INLINE T reduce_halves(V v, std::index_sequence<I...>) {
  constexpr std::size_t half = sizeof...(I);
  if constexpr (half == 1) {
    return v[0] + v[1];
  } else {
    const auto sum = __builtin_shufflevector(v, v, I...) + __builtin_shufflevector(v, v, (I + half)...);
    return reduce_halves<T>(sum, std::make_index_sequence<half / 2>{});
  }
}
template <typename T>
FASTMNIST_INLINE T reduce_add(Vec<T> v) {
  return reduce_halves<T>(v, std::make_index_sequence<kWidth<T> / 2>{});
}
template <typename T>
FASTMNIST_INLINE Vec<T> vmax(Vec<T> a, Vec<T> b) {
  return a > b ? a : b;
}
template <typename T>
FASTMNIST_INLINE Vec<T> vmin(Vec<T> a, Vec<T> b) {
  return a < b ? a : b;
}

// sqrt of every lane (GCC turns the lane loop into one vsqrtps/vsqrtpd; correctly rounded, as std::sqrt).
template <typename T>
FASTMNIST_INLINE Vec<T> vsqrt(Vec<T> v) {
  for (int i = 0; i < kWidth<T>; ++i) v[i] = std::sqrt(v[i]);
  return v;
}

// The range where exp(x) is a finite normal number: vexp clamps its input to it.
template <typename T>
struct ExpRange {
  static constexpr T lo = sizeof(T) == 4 ? T(-87.0) : T(-708.0);
  static constexpr T hi = sizeof(T) == 4 ? T(88.0) : T(709.0);
};

// exp(x) for every lane of U vectors: x = n*ln2 + r with |r| <= ln2/2, exp(r) by its Taylor polynomial (degree
// 7 for float, 12 for double: truncation below half an ulp) in Horner form with the coefficients 1/k!
// precomputed, then scaled by 2^n through the exponent bits.
// Inputs are clamped to ExpRange first, so the result saturates (to ~0 or ~max) instead of producing garbage;
// callers use it where saturation is the right limit (sigmoid, tanh), or patch the edges (loss_vec.h's vexp0).
// A NaN stays NaN: the clamp takes x as the second operand of vmax and vmin (a > b ? a : b keeps b when a test
// with NaN fails), and 2^n is built from the bits of n + magic, never by converting a NaN to an integer (which
// C++ leaves undefined); NaN times any scale is NaN.
// One exp is a chain of ~20 dependent operations, too long for the out-of-order window to overlap with the
// next one: each step is therefore taken for all U vectors before the next step, so that U independent chains
// interleave in program order (sigmoid on Zen 1: ~34 cycles per vector alone, ~25 four at a time).
template <typename T, int U>
FASTMNIST_INLINE void vexp_n(Vec<T> (&x)[U]) {
  constexpr bool is_float = sizeof(T) == 4;
  constexpr T log2e = T(1.44269504088896341);
  constexpr T ln2_hi = is_float ? T(0.693359375) : T(0.693147180369123816490);
  constexpr T ln2_lo = is_float ? T(-2.12194440e-4) : T(1.90821492927058770002e-10);
  constexpr T magic = is_float ? T(12582912.0) : T(6755399441055744.0);  // 1.5 * 2^mantissa: rounds
  constexpr int degree = is_float ? 7 : 12;
  T c[degree + 1];
  c[0] = T(1);
  for (int k = 1; k <= degree; ++k) c[k] = c[k - 1] / T(k);
  // shifted = n + magic, n = round(x log2e): adding magic rounds to an integer and leaves n, at most 1023 in
  // magnitude, in the low mantissa bits as a two's-complement integer: bits(shifted) - bits(magic) = n.
  Vec<T> shifted[U], r[U], p[U];
#pragma GCC unroll 16
  for (int u = 0; u < U; ++u)
    x[u] = vmin<T>(broadcast<T>(ExpRange<T>::hi), vmax<T>(broadcast<T>(ExpRange<T>::lo), x[u]));
#pragma GCC unroll 16
  for (int u = 0; u < U; ++u) shifted[u] = x[u] * log2e + magic;
#pragma GCC unroll 16
  for (int u = 0; u < U; ++u) {
    const Vec<T> n = shifted[u] - magic;
    r[u] = x[u] - n * ln2_hi - n * ln2_lo;
  }
#pragma GCC unroll 16
  for (int u = 0; u < U; ++u) p[u] = broadcast<T>(c[degree]);
#pragma GCC unroll 16
  for (int k = degree - 1; k >= 0; --k)
#pragma GCC unroll 16
    for (int u = 0; u < U; ++u) p[u] = p[u] * r[u] + c[k];
  using I = std::conditional_t<is_float, int32_t, int64_t>;
  constexpr int mantissa = is_float ? 23 : 52;
  constexpr I bias = is_float ? 127 : 1023;
  constexpr I magic_bits = std::bit_cast<I>(magic);
#pragma GCC unroll 16
  for (int u = 0; u < U; ++u) {
    IntVec<T> n_bits;
    std::memcpy(&n_bits, &shifted[u], sizeof(n_bits));
    const IntVec<T> e = (n_bits - (magic_bits - bias)) << mantissa;
    Vec<T> scale;
    std::memcpy(&scale, &e, sizeof(scale));
    x[u] = p[u] * scale;
  }
}

template <typename T>
FASTMNIST_INLINE Vec<T> vexp(Vec<T> x) {
  Vec<T> v[1] = {x};
  vexp_n<T, 1>(v);
  return v[0];
}

// run_kernel<K>(args...) calls K::run(args...), an always-inline static function. In the 32-byte build it is
// compiled for AVX2+FMA when the path allows (the CPU has it and it is not forced to portable), else for
// baseline x86-64; in the 64-byte build always for AVX-512 (its callers check cpu_path() first). Call it per
// chunk of work inside at::parallel_for: the lambda given to parallel_for is compiled for the baseline.
#if FASTMNIST_VEC_BYTES == 64
template <typename K, typename... Args>
FASTMNIST_TARGET_AVX512 void run_kernel_avx512(Args... args) {
  K::run(args...);
}
template <typename K, typename... Args>
inline void run_kernel(Args... args) {
  run_kernel_avx512<K>(args...);
}
#else
#if FASTMNIST_HAVE_X86_PATHS
template <typename K, typename... Args>
FASTMNIST_TARGET_AVX2 void run_kernel_avx2(Args... args) {
  K::run(args...);
}
#endif
template <typename K, typename... Args>
void run_kernel_portable(Args... args) {
  K::run(args...);
}
template <typename K, typename... Args>
inline void run_kernel(Args... args) {
#if FASTMNIST_HAVE_X86_PATHS
  if (cpu_path() >= CpuPath::Avx2) return run_kernel_avx2<K>(args...);
#endif
  run_kernel_portable<K>(args...);
}
#endif

}  // namespace FASTMNIST_VEC_NS
}  // namespace fastmnist::cpu
