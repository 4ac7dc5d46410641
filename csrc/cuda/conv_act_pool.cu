// The LeNet block on CUDA: out = avg_pool2d(act(conv2d(x, W, b, stride 1, padding P)), 2), one op; the same op
// as csrc/cpu/conv_act_pool.cpp (same checks, in conv_act_pool_args.h; same saved tensor).
//
// Forward. A block owns one (sample, output channel) and a tile of kTile x kTile pooled outputs, i.e. a
// 2kTile x 2kTile tile of conv outputs; per input channel it stages the (2kTile + k - 1)^2 input patch (zero
// where the padding or the image edge is) and the channel's k x k weights in shared memory, and each thread
// accumulates its 2x2 conv window in registers. The epilogue adds the bias, applies the activation, stores the
// four activations (only when save_act) and writes their mean: the conv output never reaches global memory.
// Arithmetic in float for float16/bfloat16/float32, double for float64.
// Saved for backward: `act`, the activation output at the conv positions the pooling reads,
// (N, C_out, 2 H_out, 2 W_out); the derivative is a function of it (activation.h).
//
// Backward. One element-wise kernel forms dz = 0.25 upsample(grad_out) act'(act) (accumulation dtype). Then
//   grad_b[o]             = sum_{n,i,j} dz[n, o, i, j]
//   grad_W[o, c, ky, kx]  = sum_{n,i,j} dz[n, o, i, j] x[n, c, i + ky - P, j + kx - P]
//   grad_x[n, c, h, w]    = sum_{o,ky,kx} dz[n, o, h + P - ky, w + P - kx] W[o, c, ky, kx]
// grad_x: one thread per input element (no reduction across threads). grad_b and grad_W: a block per
// (output, chunk of kSamplesPerChunk samples) reduces its positions in a fixed tree order into a partial, and a
// final kernel adds the partials in chunk order. Chunking depends only on the shape: bitwise reproducible, no
// atomics. Each gradient only when asked.

#include <torch/library.h>

#include "activation.h"
#include "conv_act_pool_args.h"
#include "cuda/common.cuh"

namespace fastmnist::cuda {
namespace {

constexpr int kTile = 16;                  // pooled outputs per block side (forward): 256 threads
constexpr int kThreads = 256;
constexpr int64_t kSamplesPerChunk = 16;   // backward: samples per grad_W / grad_b partial
constexpr int64_t kMaxGridY = 65535;
constexpr int64_t kMaxSharedBytes = 48 * 1024;

using Shape = ConvActPoolShape;  // the sizes of one call, passed to every kernel

template <typename T, Activation A>
__global__ void __launch_bounds__(kTile * kTile)
    conv_act_pool_kernel(const T* __restrict__ x, const T* __restrict__ w, const T* __restrict__ bias,
                         T* __restrict__ out, T* __restrict__ act, Shape s, int64_t tiles_x) {
  using Acc = acc_t<T>;
  extern __shared__ unsigned char smem_raw[];
  const int64_t side = 2 * kTile + s.k - 1;  // input patch side
  Acc* patch = reinterpret_cast<Acc*>(smem_raw);
  Acc* wsh = patch + side * side;
  const int64_t n = blockIdx.x / s.o, o = blockIdx.x % s.o;
  const int64_t ty0 = (blockIdx.y / tiles_x) * kTile, tx0 = (blockIdx.y % tiles_x) * kTile;
  const int64_t py = ty0 + threadIdx.y, px = tx0 + threadIdx.x;
  const bool valid = py < s.ho && px < s.wo;
  const int tid = threadIdx.y * kTile + threadIdx.x;
  const int64_t kk = s.k * s.k;
  Acc acc[2][2] = {{Acc(0), Acc(0)}, {Acc(0), Acc(0)}};
  for (int64_t c = 0; c < s.c; ++c) {
    __syncthreads();  // the previous channel's patch has been used by every thread
    const T* xc = x + (n * s.c + c) * s.h * s.w;
    for (int64_t i = tid; i < side * side; i += kTile * kTile) {
      const int64_t yy = 2 * ty0 - s.pad + i / side, xx = 2 * tx0 - s.pad + i % side;
      patch[i] = (yy >= 0 && yy < s.h && xx >= 0 && xx < s.w) ? Acc(xc[yy * s.w + xx]) : Acc(0);
    }
    for (int64_t i = tid; i < kk; i += kTile * kTile) wsh[i] = Acc(w[(o * s.c + c) * kk + i]);
    __syncthreads();
    if (valid) {
      const Acc* base = patch + (2 * threadIdx.y) * side + 2 * threadIdx.x;
      for (int64_t ky = 0; ky < s.k; ++ky) {
        for (int64_t kx = 0; kx < s.k; ++kx) {
          const Acc wv = wsh[ky * s.k + kx];
          const Acc* p = base + ky * side + kx;
          acc[0][0] += p[0] * wv;
          acc[0][1] += p[1] * wv;
          acc[1][0] += p[side] * wv;
          acc[1][1] += p[side + 1] * wv;
        }
      }
    }
  }
  if (!valid) return;
  const Acc b = bias != nullptr ? Acc(bias[o]) : Acc(0);
  Acc sum = Acc(0);
#pragma unroll
  for (int dy = 0; dy < 2; ++dy) {
#pragma unroll
    for (int dx = 0; dx < 2; ++dx) {
      const Acc a = activate<A, Acc>(acc[dy][dx] + b, Acc(0));
      if (act != nullptr) act[((n * s.o + o) * 2 * s.ho + 2 * py + dy) * 2 * s.wo + 2 * px + dx] = T(a);
      sum += a;
    }
  }
  out[((n * s.o + o) * s.ho + py) * s.wo + px] = T(Acc(0.25) * sum);
}

// dz[n, o, i, j] = 0.25 grad_out[n, o, i / 2, j / 2] act'(act[n, o, i, j]) over the (N, C_out, 2 H_out, 2 W_out)
// conv positions the pooling reads.
template <typename T, Activation A>
__global__ void dz_kernel(const T* __restrict__ g, const T* __restrict__ act, acc_t<T>* __restrict__ dz, Shape s) {
  using Acc = acc_t<T>;
  const int64_t total = s.n * s.o * 4 * s.ho * s.wo, w2 = 2 * s.wo, h2 = 2 * s.ho;
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < total; i += int64_t(gridDim.x) * blockDim.x) {
    const int64_t j = i % w2, r = (i / w2) % h2, plane = i / (w2 * h2);
    Acc v = Acc(0.25) * Acc(g[(plane * s.ho + r / 2) * s.wo + j / 2]);
    if constexpr (A != Activation::Identity) v *= activation_grad_from_output<Acc>(A, Acc(act[i]), Acc(0));
    dz[i] = v;
  }
}

// partial[chunk, o] = sum of dz over the chunk's samples and all positions of channel o. Grid (C_out, chunks).
template <typename T>
__global__ void __launch_bounds__(kThreads) bias_partial_kernel(const acc_t<T>* __restrict__ dz,
                                                                acc_t<T>* __restrict__ partial, Shape s) {
  using Acc = acc_t<T>;
  __shared__ double scratch[2 * (kThreads / kWarp)];
  const int64_t o = blockIdx.x, chunk = blockIdx.y;
  const int64_t n0 = chunk * kSamplesPerChunk, n1 = n0 + kSamplesPerChunk < s.n ? n0 + kSamplesPerChunk : s.n;
  const int64_t plane = 4 * s.ho * s.wo;
  Acc acc = Acc(0);
  for (int64_t i = threadIdx.x; i < (n1 - n0) * plane; i += kThreads) {
    const int64_t n = n0 + i / plane;
    acc += dz[(n * s.o + o) * plane + i % plane];
  }
  acc = BlockGroup<kThreads>{scratch}.sum(acc);
  if (threadIdx.x == 0) partial[chunk * s.o + o] = acc;
}

// partial[chunk, o, c, ky, kx] = sum over the chunk's samples and the conv positions of dz * shifted x.
// Grid (C_out * C_in, chunks); the k x k taps one after the other, each a fixed-order block reduction.
template <typename T>
__global__ void __launch_bounds__(kThreads) weight_partial_kernel(const T* __restrict__ x,
                                                                  const acc_t<T>* __restrict__ dz,
                                                                  acc_t<T>* __restrict__ partial, Shape s) {
  using Acc = acc_t<T>;
  __shared__ double scratch[2 * (kThreads / kWarp)];
  const int64_t o = blockIdx.x / s.c, c = blockIdx.x % s.c, chunk = blockIdx.y;
  const int64_t n0 = chunk * kSamplesPerChunk, n1 = n0 + kSamplesPerChunk < s.n ? n0 + kSamplesPerChunk : s.n;
  const int64_t w2 = 2 * s.wo, plane = 4 * s.ho * s.wo, kk = s.k * s.k;
  const BlockGroup<kThreads> grp{scratch};
  for (int64_t t = 0; t < kk; ++t) {
    const int64_t ky = t / s.k, kx = t % s.k;
    Acc acc = Acc(0);
    for (int64_t i = threadIdx.x; i < (n1 - n0) * plane; i += kThreads) {
      const int64_t n = n0 + i / plane, p = i % plane;
      const int64_t yy = p / w2 + ky - s.pad, xx = p % w2 + kx - s.pad;
      if (yy >= 0 && yy < s.h && xx >= 0 && xx < s.w) {
        acc += dz[(n * s.o + o) * plane + p] * Acc(x[((n * s.c + c) * s.h + yy) * s.w + xx]);
      }
    }
    acc = grp.sum(acc);
    if (threadIdx.x == 0) partial[(chunk * s.o * s.c + blockIdx.x) * kk + t] = acc;
  }
}

// out[i] = sum over chunks, in chunk order, of partial[chunk, i].
template <typename T>
__global__ void sum_partials_kernel(const acc_t<T>* __restrict__ partial, T* __restrict__ out, int64_t chunks,
                                    int64_t count) {
  const int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= count) return;
  acc_t<T> s = 0;
  for (int64_t c = 0; c < chunks; ++c) s += partial[c * count + i];
  out[i] = T(s);
}

// grad_x[n, c, h, w] = sum over o, ky, kx of dz[n, o, h + P - ky, w + P - kx] W[o, c, ky, kx] (valid positions).
template <typename T>
__global__ void grad_x_kernel(const acc_t<T>* __restrict__ dz, const T* __restrict__ w, T* __restrict__ gx, Shape s) {
  using Acc = acc_t<T>;
  const int64_t total = s.n * s.c * s.h * s.w, h2 = 2 * s.ho, w2 = 2 * s.wo;
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < total; i += int64_t(gridDim.x) * blockDim.x) {
    const int64_t xw = i % s.w, xh = (i / s.w) % s.h, c = (i / (s.w * s.h)) % s.c, n = i / (s.w * s.h * s.c);
    Acc acc = Acc(0);
    for (int64_t o = 0; o < s.o; ++o) {
      const Acc* dzo = dz + (n * s.o + o) * h2 * w2;
      const T* wo = w + (o * s.c + c) * s.k * s.k;
      for (int64_t ky = 0; ky < s.k; ++ky) {
        const int64_t r = xh + s.pad - ky;
        if (r < 0 || r >= h2) continue;
        for (int64_t kx = 0; kx < s.k; ++kx) {
          const int64_t q = xw + s.pad - kx;
          if (q >= 0 && q < w2) acc += dzo[r * w2 + q] * Acc(wo[ky * s.k + kx]);
        }
      }
    }
    gx[i] = T(acc);
  }
}

int64_t shared_bytes(int64_t k, at::ScalarType dtype) {
  const int64_t side = 2 * kTile + k - 1;
  return (side * side + k * k) * (at::toOpMathType(dtype) == at::kDouble ? 8 : 4);
}

// What only the CUDA kernels need: x on CUDA, and a kernel size whose forward tile fits in shared memory.
void check_cuda_limits(const char* op, const at::Tensor& x, int64_t k) {
  check_cuda_tensor(op, "x", x);
  TORCH_CHECK(shared_bytes(k, x.scalar_type()) <= kMaxSharedBytes, op, ": kernel size ", k,
              " is too large for the CUDA kernel's shared-memory tile (at most ", kMaxSharedBytes, " bytes)");
}

unsigned flat_grid(int64_t total) {
  return unsigned(std::clamp<int64_t>(ceil_div(total, kThreads), 1, int64_t(1) << 20));
}

std::tuple<at::Tensor, at::Tensor> conv_act_pool_cuda(const at::Tensor& x, const at::Tensor& weight,
                                                      const std::optional<at::Tensor>& bias, int64_t padding,
                                                      c10::string_view activation, bool save_act) {
  constexpr const char* op = "conv_act_pool";
  const ConvActPoolArgs args = check_conv_act_pool_args(op, check_float_tensor, x, weight, padding, activation);
  const Shape& s = args.shape;
  check_cuda_limits(op, x, s.k);
  const at::Tensor b = checked_bias(op, bias, x, weight);
  const c10::cuda::OptionalCUDAGuard guard(device_of(x));
  const at::Tensor x4 = args.x4.contiguous();
  const at::Tensor w = weight.contiguous();
  at::Tensor out = at::empty({s.n, s.o, s.ho, s.wo}, x.options());
  at::Tensor saved = save_act ? at::empty({s.n, s.o, 2 * s.ho, 2 * s.wo}, x.options()) : at::empty({0}, x.options());
  if (out.numel() > 0) {
    const int64_t tiles_x = ceil_div(s.wo, kTile), tiles = tiles_x * ceil_div(s.ho, kTile);
    TORCH_CHECK(tiles <= kMaxGridY, op, ": the output (", s.ho, " x ", s.wo, ") is too large for the CUDA kernel");
    const dim3 grid(unsigned(s.n * s.o), unsigned(tiles));
    const dim3 block(kTile, kTile);
    const size_t smem = size_t(shared_bytes(s.k, x.scalar_type()));
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "conv_act_pool_cuda", [&] {
      with_activation(args.act, [&](auto a) {
        constexpr Activation A = decltype(a)::value;
        conv_act_pool_kernel<scalar_t, A><<<grid, block, smem, current_stream()>>>(
            x4.const_data_ptr<scalar_t>(), w.const_data_ptr<scalar_t>(),
            b.defined() ? b.const_data_ptr<scalar_t>() : nullptr, out.mutable_data_ptr<scalar_t>(),
            save_act ? saved.mutable_data_ptr<scalar_t>() : nullptr, s, tiles_x);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
    });
  }
  if (!args.batched) {
    out = out.squeeze(0);
    if (save_act) saved = saved.squeeze(0);
  }
  return {out, saved};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> conv_act_pool_backward_cuda(
    const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& weight, const at::Tensor& act_out,
    int64_t padding, c10::string_view activation, std::array<bool, 3> output_mask) {
  constexpr const char* op = "conv_act_pool_backward";
  const ConvActPoolArgs args = check_conv_act_pool_args(op, check_float_tensor, x, weight, padding, activation);
  const Shape& s = args.shape;
  check_cuda_limits(op, x, s.k);
  const ConvActPoolBackwardInputs in = check_conv_act_pool_backward_inputs(op, grad_out, act_out, x, args);
  const c10::cuda::OptionalCUDAGuard guard(device_of(x));
  const at::Tensor x4 = args.x4.contiguous();
  const at::Tensor w = weight.contiguous();
  const bool need_x = output_mask[0], need_w = output_mask[1], need_b = output_mask[2];
  at::Tensor grad_x = need_x ? at::empty(x4.sizes(), x.options()) : at::empty({0}, x.options());
  at::Tensor grad_w = need_w ? at::empty(weight.sizes(), x.options()) : at::empty({0}, x.options());
  at::Tensor grad_b = need_b ? at::empty({s.o}, x.options()) : at::empty({0}, x.options());
  if (need_x || need_w || need_b) {
    const auto acc_opts = x.options().dtype(at::toOpMathType(x.scalar_type()));
    const int64_t chunks = ceil_div(s.n, kSamplesPerChunk);
    TORCH_CHECK(chunks <= kMaxGridY, op, ": batch of ", s.n, " is too large for the CUDA kernel (at most ",
                kMaxGridY * kSamplesPerChunk, ")");
    const int64_t dz_total = s.n * s.o * 4 * s.ho * s.wo;
    at::Tensor dz = at::empty({s.n, s.o, 2 * s.ho, 2 * s.wo}, acc_opts);
    const int64_t wcount = s.o * s.c * s.k * s.k;
    at::Tensor w_partial = need_w ? at::empty({chunks, wcount}, acc_opts) : at::Tensor();
    at::Tensor b_partial = need_b ? at::empty({chunks, s.o}, acc_opts) : at::Tensor();
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "conv_act_pool_backward_cuda", [&] {
      using Acc = acc_t<scalar_t>;
      const auto stream = current_stream();
      Acc* dz_ptr = dz.mutable_data_ptr<Acc>();
      if (dz_total > 0) {
        with_activation(args.act, [&](auto a) {
          constexpr Activation A = decltype(a)::value;
          dz_kernel<scalar_t, A><<<flat_grid(dz_total), kThreads, 0, stream>>>(
              in.grad_out.const_data_ptr<scalar_t>(), in.act.defined() ? in.act.const_data_ptr<scalar_t>() : nullptr,
              dz_ptr, s);
          C10_CUDA_KERNEL_LAUNCH_CHECK();
        });
      }
      if (need_b) {
        if (s.n > 0 && s.o > 0) {
          bias_partial_kernel<scalar_t><<<dim3(unsigned(s.o), unsigned(chunks)), kThreads, 0, stream>>>(
              dz_ptr, b_partial.mutable_data_ptr<Acc>(), s);
          C10_CUDA_KERNEL_LAUNCH_CHECK();
        }
        sum_partials_kernel<scalar_t><<<flat_grid(s.o), kThreads, 0, stream>>>(
            need_b && s.n > 0 ? b_partial.const_data_ptr<Acc>() : nullptr, grad_b.mutable_data_ptr<scalar_t>(),
            s.n > 0 ? chunks : 0, s.o);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      }
      if (need_w) {
        if (s.n > 0 && wcount > 0) {
          weight_partial_kernel<scalar_t><<<dim3(unsigned(s.o * s.c), unsigned(chunks)), kThreads, 0, stream>>>(
              x4.const_data_ptr<scalar_t>(), dz_ptr, w_partial.mutable_data_ptr<Acc>(), s);
          C10_CUDA_KERNEL_LAUNCH_CHECK();
        }
        sum_partials_kernel<scalar_t><<<flat_grid(wcount), kThreads, 0, stream>>>(
            s.n > 0 ? w_partial.const_data_ptr<Acc>() : nullptr, grad_w.mutable_data_ptr<scalar_t>(),
            s.n > 0 ? chunks : 0, wcount);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      }
      if (need_x && grad_x.numel() > 0) {
        grad_x_kernel<scalar_t><<<flat_grid(grad_x.numel()), kThreads, 0, stream>>>(
            dz_ptr, w.const_data_ptr<scalar_t>(), grad_x.mutable_data_ptr<scalar_t>(), s);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      }
    });
  }
  if (need_x && !args.batched) grad_x = grad_x.squeeze(0);
  return {grad_x, grad_w, grad_b};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastmnist, CUDA, m) {
  m.impl("conv_act_pool", &conv_act_pool_cuda);
  m.impl("conv_act_pool_backward", &conv_act_pool_backward_cuda);
}

}  // namespace fastmnist::cuda
