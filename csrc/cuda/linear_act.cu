// Fused linear + activation on CUDA: out = act(x @ W^T + b), the same op as csrc/cpu/linear_act.cpp.
//
// Forward. The GEMM goes through ATen (at::mm_out: cuBLAS, float32 accumulation for float16/bfloat16), then
// one element-wise kernel adds the bias and applies the activation in place, in the accumulation type
// (float for float16/bfloat16/float32, double for float64), so y is read and written once.
// Saved for backward: the output y only (plus x and W for the GEMMs); every activation's derivative is a
// function of y (see activation.h).
//
// Backward. One kernel computes g_z = grad_out * f'(y) and, in the same pass, the bias gradient: each block
// owns 32 columns x kRowsPerChunk rows, its 8 row-threads per column are summed in shared memory in a fixed
// order into one partial per (row chunk, column); a second small kernel adds the partials of each column in
// chunk order. The chunking depends only on the shape, so grad_bias is bitwise reproducible (no atomics).
// Then grad_x = g_z @ W and grad_W = g_z^T @ x through ATen, each only when requested. For the identity,
// g_z is grad_out itself and only the bias reduction runs.

#include <torch/library.h>

#include "activation.h"
#include "cuda/common.cuh"
#include "linear_act_args.h"

namespace fastmnist::cuda {
namespace {

constexpr int kThreads = 256;
constexpr int kMaxBlocks = 65535;
constexpr int kColsPerBlock = 32;       // backward: columns per block (one warp wide)
constexpr int kRowThreads = 8;          // backward: threads along the rows per column
constexpr int64_t kRowsPerChunk = 256;  // backward: rows per block, and per bias partial

// y[i] = act(y[i] + b[i % n]) over the (m, n) row-major output; I is the index type (32-bit when it fits).
template <typename T, Activation A, typename I>
__global__ void bias_act_kernel(T* __restrict__ y, const T* __restrict__ bias, I total, I n, acc_t<T> slope) {
  using Acc = acc_t<T>;
  for (I i = I(blockIdx.x) * blockDim.x + threadIdx.x; i < total; i += I(gridDim.x) * blockDim.x) {
    Acc z = static_cast<Acc>(y[i]);
    if (bias != nullptr) z += static_cast<Acc>(bias[i % n]);
    y[i] = static_cast<T>(activate<A, Acc>(z, slope));
  }
}

// gz = g * f'(y) (when gz is not null) and partial[chunk, col] = sum of gz over the chunk's rows (when partial is
// not null). Block (kColsPerBlock, kRowThreads); grid (column tiles, row chunks).
template <typename T, Activation A>
__global__ void act_grad_bias_kernel(const T* __restrict__ g, const T* __restrict__ y, T* __restrict__ gz,
                                     acc_t<T>* __restrict__ partial, int64_t m, int64_t n, acc_t<T> slope) {
  using Acc = acc_t<T>;
  __shared__ Acc tile[kRowThreads][kColsPerBlock + 1];
  const int64_t col = int64_t(blockIdx.x) * kColsPerBlock + threadIdx.x;
  const int64_t r0 = int64_t(blockIdx.y) * kRowsPerChunk;
  const int64_t r1 = r0 + kRowsPerChunk < m ? r0 + kRowsPerChunk : m;
  Acc acc = Acc(0);
  if (col < n) {
    for (int64_t r = r0 + threadIdx.y; r < r1; r += kRowThreads) {
      const int64_t i = r * n + col;
      const Acc v = static_cast<Acc>(g[i]) * activation_grad_from_output<Acc>(A, static_cast<Acc>(y[i]), slope);
      if (gz != nullptr) gz[i] = static_cast<T>(v);
      acc += v;
    }
  }
  if (partial == nullptr) return;
  tile[threadIdx.y][threadIdx.x] = acc;
  __syncthreads();
  if (threadIdx.y == 0 && col < n) {
    Acc s = tile[0][threadIdx.x];
#pragma unroll
    for (int t = 1; t < kRowThreads; ++t) s += tile[t][threadIdx.x];
    partial[int64_t(blockIdx.y) * n + col] = s;
  }
}

// grad_bias[col] = sum over chunks, in chunk order, of partial[chunk, col].
template <typename T>
__global__ void sum_partials_kernel(const acc_t<T>* __restrict__ partial, T* __restrict__ grad_bias, int64_t chunks,
                                    int64_t n) {
  const int64_t col = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (col >= n) return;
  acc_t<T> s = 0;
  for (int64_t c = 0; c < chunks; ++c) s += partial[c * n + col];
  grad_bias[col] = static_cast<T>(s);
}

template <typename T, Activation A, typename I>
void launch_bias_act(T* y, const T* bias, int64_t total, int64_t n, double negative_slope) {
  const int blocks = int(std::min<int64_t>(ceil_div(total, kThreads), kMaxBlocks));
  bias_act_kernel<T, A, I><<<blocks, kThreads, 0, current_stream()>>>(y, bias, I(total), I(n),
                                                                      acc_t<T>(negative_slope));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

at::Tensor linear_act_cuda(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                           c10::string_view activation, double negative_slope) {
  constexpr const char* op = "linear_act";
  const LinearActForwardArgs args =
      check_linear_act_args(op, check_float_tensor, x, weight, bias, activation, negative_slope);
  check_cuda_tensor(op, "x", x);
  const c10::cuda::OptionalCUDAGuard guard(device_of(x));
  const int64_t n = args.n;
  const bool has_bias = args.bias.defined();
  at::Tensor y = at::empty({args.x2d.size(0), n}, x.options());
  at::mm_out(y, args.x2d, weight.t());
  const int64_t total = y.numel();
  if (total > 0 && (has_bias || args.act != Activation::Identity)) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, y.scalar_type(), "linear_act_cuda", [&] {
      scalar_t* y_ptr = y.mutable_data_ptr<scalar_t>();
      const scalar_t* b_ptr = has_bias ? args.bias.const_data_ptr<scalar_t>() : nullptr;
      with_activation(args.act, [&](auto a) {
        constexpr Activation A = decltype(a)::value;
        if (total <= std::numeric_limits<int32_t>::max() / 2) {
          launch_bias_act<scalar_t, A, uint32_t>(y_ptr, b_ptr, total, n, negative_slope);
        } else {
          launch_bias_act<scalar_t, A, uint64_t>(y_ptr, b_ptr, total, n, negative_slope);
        }
      });
    });
  }
  return y.view(args.out_shape);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> linear_act_backward_cuda(
    const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& weight, const at::Tensor& out,
    c10::string_view activation, double negative_slope, std::array<bool, 3> output_mask) {
  constexpr const char* op = "linear_act_backward";
  const LinearActBackwardArgs args =
      check_linear_act_backward_args(op, check_float_tensor, grad_out, x, weight, out, activation, negative_slope);
  check_cuda_tensor(op, "x", x);
  const c10::cuda::OptionalCUDAGuard guard(device_of(x));
  const int64_t n = args.n;
  const int64_t m = args.y.size(0);
  const bool need_input_grads = output_mask[0] || output_mask[1];
  const bool need_bias = output_mask[2];
  const bool write_gz = need_input_grads && args.act != Activation::Identity;

  // g_z = g * f'(y); for the identity, g_z is g itself.
  at::Tensor gz = args.act == Activation::Identity ? args.g : (write_gz ? at::empty_like(args.g) : at::Tensor());
  at::Tensor grad_bias = need_bias ? at::empty({n}, x.options()) : at::empty({0}, x.options());
  if (need_bias && m == 0) grad_bias.zero_();
  if ((write_gz || need_bias) && m > 0 && n > 0) {
    const int64_t chunks = ceil_div(m, kRowsPerChunk);
    TORCH_CHECK(chunks <= kMaxBlocks, op, ": ", m, " rows is more than this kernel's grid allows (",
                kMaxBlocks * kRowsPerChunk, ")");
    const auto acc_dtype = at::toOpMathType(x.scalar_type());
    at::Tensor partials = need_bias ? at::empty({chunks, n}, x.options().dtype(acc_dtype)) : at::Tensor();
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "linear_act_backward_cuda", [&] {
      using Acc = acc_t<scalar_t>;
      const auto stream = current_stream();
      Acc* partial_ptr = need_bias ? partials.mutable_data_ptr<Acc>() : nullptr;
      scalar_t* gz_ptr = write_gz ? gz.mutable_data_ptr<scalar_t>() : nullptr;
      with_activation(args.act, [&](auto a) {
        constexpr Activation A = decltype(a)::value;
        const dim3 grid(unsigned(ceil_div(n, kColsPerBlock)), unsigned(chunks));
        const dim3 block(kColsPerBlock, kRowThreads);
        act_grad_bias_kernel<scalar_t, A><<<grid, block, 0, stream>>>(
            args.g.const_data_ptr<scalar_t>(), args.y.const_data_ptr<scalar_t>(), gz_ptr, partial_ptr, m, n,
            Acc(negative_slope));
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
      if (need_bias) {
        sum_partials_kernel<scalar_t><<<unsigned(ceil_div(n, kThreads)), kThreads, 0, stream>>>(
            partial_ptr, grad_bias.mutable_data_ptr<scalar_t>(), chunks, n);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      }
    });
  }
  at::Tensor grad_x = at::empty({0}, x.options());
  at::Tensor grad_w = at::empty({0}, x.options());
  if (output_mask[0]) grad_x = at::mm(gz, weight).view(x.sizes());
  if (output_mask[1]) grad_w = at::mm(gz.t(), x.reshape({-1, weight.size(1)}));
  return {grad_x, grad_w, grad_bias};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastmnist, CUDA, m) {
  m.impl("linear_act", &linear_act_cuda);
  m.impl("linear_act_backward", &linear_act_backward_cuda);
}

}  // namespace fastmnist::cuda
