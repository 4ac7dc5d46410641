// Shared by the CUDA kernels: the dtypes they take, the accumulation type, warp and block reductions, and the
// launch helpers.
//
// Only c10/cuda headers are included (CUDAStream, CUDAGuard, CUDAException), not ATen/cuda/CUDAContext.h:
// that one pulls in the cuBLAS/cuSPARSE/cuSOLVER headers, which these kernels do not use (GEMMs go through
// ATen) and which a CUDA toolkit without the math libraries lacks; c10::cuda::getCurrentCUDAStream and
// c10::cuda::OptionalCUDAGuard are the functions that at::cuda:: re-exports.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <cuda_runtime.h>

#include <cstdint>
#include <limits>

namespace fastmnist::cuda {

// float32, float64, float16, bfloat16; the 16-bit types compute in float (acc_t), the others in themselves.
inline void check_float_tensor(const char* op, const char* name, const at::Tensor& t) {
  TORCH_CHECK(t.defined(), op, ": ", name, " is undefined");
  const auto s = t.scalar_type();
  TORCH_CHECK(s == at::kFloat || s == at::kDouble || s == at::kHalf || s == at::kBFloat16, op, ": ", name,
              " must be float32, float64, float16 or bfloat16, got ", s);
}

// The CUDA ops' own device check; the argument headers (*_args.h) check that the other tensors are on x's device.
inline void check_cuda_tensor(const char* op, const char* name, const at::Tensor& t) {
  TORCH_CHECK(t.is_cuda(), op, ": ", name, " must be a CUDA tensor here, got one on ", t.device());
}

template <typename T>
using acc_t = at::opmath_type<T>;

constexpr int kWarp = 32;

inline int64_t ceil_div(int64_t a, int64_t b) {
  return (a + b - 1) / b;
}

template <typename T>
__device__ __forceinline__ T warp_sum(T v) {
#pragma unroll
  for (int o = kWarp / 2; o > 0; o /= 2) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

// Online softmax state: running max m and sum s of exp(x - m). A state whose max is -inf has s = 0 and is
// shifted by 0 instead of -inf, so that -inf - -inf never occurs.
template <typename A>
struct MaxSum {
  A m, s;
};

template <typename A>
__device__ __forceinline__ MaxSum<A> maxsum_merge(MaxSum<A> a, MaxSum<A> b) {
  constexpr A ninf = -std::numeric_limits<A>::infinity();
  const A m = a.m > b.m ? a.m : b.m;  // NaN in either: m may drop it, but s keeps it (NaN * anything)
  const A sh = m == ninf ? A(0) : m;
  return {m, a.s * std::exp(a.m - sh) + b.s * std::exp(b.m - sh)};
}

// One more element: one exp (a rescale only when the max grows). NaN x gives s = NaN.
template <typename A>
__device__ __forceinline__ MaxSum<A> maxsum_add(MaxSum<A> st, A x) {
  constexpr A ninf = -std::numeric_limits<A>::infinity();
  if (x > st.m) return {x, st.s * std::exp(st.m - x) + A(1)};
  return {st.m, st.s + std::exp(x - (st.m == ninf ? A(0) : st.m))};
}

template <typename A>
__device__ __forceinline__ MaxSum<A> warp_maxsum(MaxSum<A> v) {
#pragma unroll
  for (int o = kWarp / 2; o > 0; o /= 2) {
    MaxSum<A> other{__shfl_xor_sync(0xffffffffu, v.m, o), __shfl_xor_sync(0xffffffffu, v.s, o)};
    v = maxsum_merge<A>(v, other);
  }
  return v;
}

// Reductions over a group of threads that works on one row: a warp (kWarp threads, no shared memory) or a
// whole block of kThreads (warp results through shared memory, combined by every thread in warp order, so
// that all threads get the same, deterministic value). Every thread of the group must call them.
struct WarpGroup {
  __device__ __forceinline__ int lane() const { return threadIdx.x % kWarp; }
  static constexpr int size = kWarp;
  template <typename T>
  __device__ __forceinline__ T sum(T v) const {
    return warp_sum(v);
  }
  template <typename A>
  __device__ __forceinline__ MaxSum<A> maxsum(MaxSum<A> v) const {
    return warp_maxsum(v);
  }
};

template <int kThreads>
struct BlockGroup {
  static_assert(kThreads % kWarp == 0 && kThreads <= 1024, "block size");
  static constexpr int kWarps = kThreads / kWarp;
  static constexpr int size = kThreads;
  double* scratch;  // shared memory, 2 * kWarps doubles
  __device__ __forceinline__ int lane() const { return threadIdx.x; }
  template <typename T>
  __device__ __forceinline__ T sum(T v) const {
    v = warp_sum(v);
    __syncthreads();  // scratch may still be read by a previous reduction
    if (threadIdx.x % kWarp == 0) scratch[threadIdx.x / kWarp] = double(v);
    __syncthreads();
    T total = T(0);
#pragma unroll
    for (int w = 0; w < kWarps; ++w) total += T(scratch[w]);
    return total;
  }
  template <typename A>
  __device__ __forceinline__ MaxSum<A> maxsum(MaxSum<A> v) const {
    v = warp_maxsum(v);
    __syncthreads();
    if (threadIdx.x % kWarp == 0) {
      scratch[2 * (threadIdx.x / kWarp)] = double(v.m);
      scratch[2 * (threadIdx.x / kWarp) + 1] = double(v.s);
    }
    __syncthreads();
    MaxSum<A> total{A(scratch[0]), A(scratch[1])};
#pragma unroll
    for (int w = 1; w < kWarps; ++w) total = maxsum_merge<A>(total, {A(scratch[2 * w]), A(scratch[2 * w + 1])});
    return total;
  }
};

// Deterministic sum of `n` values into one double per block: each block reduces its fixed slice
// [blockIdx.x * per_block, ...) in a fixed tree order; the caller sums the per-block results (at::sum over a
// small tensor, itself a fixed-order reduction).
template <int kThreads>
__device__ __forceinline__ double block_sum_to_first(double v, double* scratch) {
  v = warp_sum(v);
  if (threadIdx.x % kWarp == 0) scratch[threadIdx.x / kWarp] = v;
  __syncthreads();
  double total = 0;
  if (threadIdx.x == 0) {
#pragma unroll
    for (int w = 0; w < kThreads / kWarp; ++w) total += scratch[w];
  }
  return total;  // valid in thread 0 only
}

inline cudaStream_t current_stream() {
  return c10::cuda::getCurrentCUDAStream().stream();
}

}  // namespace fastmnist::cuda
