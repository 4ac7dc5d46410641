// The LeNet block on the CPU: out = avg_pool2d(act(conv2d(x, W, b, stride 1, padding P)), 2), one op.
//
// Forward. Per sample (parallel over the batch), the input planes are copied once into a zero-bordered
// scratch buffer (this is the padding; any input strides are read directly, so channels_last or sliced
// inputs cost no extra copy), sized so that every vector load of the kernel stays inside it. A direct
// convolution then computes tiles of 2 conv rows x 2 vectors of conv columns x up to 3 output channels in
// registers, vectorised along the columns; bias and activation are applied to the tile in registers, the
// two rows are added, neighbouring columns are added by an even/odd lane shuffle, and only then is the
// pooled tile written. Conv rows and columns dropped by the floor pooling (odd sizes) are never computed.
//
// Saved for backward: `act`, the activation output act(z) at the conv positions that the pooling reads,
// shape (N, C_out, 2*H_out, 2*W_out). Every activation's derivative is a function of its output (see
// activation.h), so backward needs act plus the inputs x and W; recomputing the convolution instead would
// double the cost of a training step. The op writes act only when asked (`save_act`): the Python wrapper
// asks when a gradient will be needed and the activation is not the identity (whose derivative is 1);
// otherwise act comes back empty and inference writes nothing but the pooled output.
//
// Backward. dz = 0.25 * upsample(grad_out) * act'(act) is formed per sample, in vector registers, into a
// zero-bordered scratch plane (with the bias-gradient sums taken in the same pass). From it, direct kernels:
//   grad_W[o, c, ky, kx] = sum_{i,j} dz[o, i, j] * x_pad[c, i + ky, j + kx]   (column path: tiles of 3 out
//            channels x K taps; channel path: dz transposed to channels last in registers, tiles of 2 kernel
//            rows x K taps x channel vectors)
//   grad_x = full correlation of dz with the flipped, transposed kernel       (the forward conv tile, 2 rows
//            where the registers allow; kernel rows that fall on the zero border of dz are skipped, as are the
//            forward's on the padding)
// grad_W and grad_b are accumulated per fixed chunk of kChunk samples (independent of the thread count),
// and the chunk partials are added in chunk order: results are deterministic run to run.
// grad_x is computed only when asked (LeNet's first block never needs it).

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <utility>
#include <vector>

#include "activation.h"
#include "conv_act_pool_args.h"
#include "cpu/activation_vec.h"

#if FASTMNIST_VEC_BYTES == 64
#include <immintrin.h>
#endif

namespace fastmnist {

// The op's CPU entry points. This file is built twice (see simd.h): with 32-byte vectors (portable and AVX2
// paths) and, through cpu/avx512/conv_act_pool.cpp, with 64-byte vectors (AVX-512, x86-64 only). Each build
// defines its entry points in its own namespace; the registration at the end (32-byte build) picks one per call.
using ConvActPoolFn = std::tuple<at::Tensor, at::Tensor>(const at::Tensor& x, const at::Tensor& weight,
                                                         const std::optional<at::Tensor>& bias, int64_t padding,
                                                         c10::string_view activation, bool save_act);
using ConvActPoolBackwardFn = std::tuple<at::Tensor, at::Tensor, at::Tensor>(
    const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& weight, const at::Tensor& act_out,
    int64_t padding, c10::string_view activation, std::array<bool, 3> output_mask);
namespace cpu::vec256 {
ConvActPoolFn conv_act_pool_cpu;
ConvActPoolBackwardFn conv_act_pool_backward_cpu;
}  // namespace cpu::vec256
namespace cpu::vec512 {
ConvActPoolFn conv_act_pool_cpu;
ConvActPoolBackwardFn conv_act_pool_backward_cpu;
}  // namespace cpu::vec512

namespace {

using cpu::IntVec;
using cpu::Vec;
using cpu::kWidth;

constexpr int kVectorRegisters = FASTMNIST_VEC_BYTES == 64 ? 32 : 16;  // x86-64: zmm0-31 (AVX-512), ymm0-15
constexpr int kConvBlock = 3;     // forward tile: output channels
constexpr int kInGradBlock = 6;   // grad_x tile: input channels
// grad_W column-path tile: output channels. Its registers: OB x K accumulators, OB dz vectors and 3 row vectors
// (two loads, one shifted), 21 for OB = 3 and K = 5: with 16 (AVX2) the accumulators spilled to the stack, and
// OB = 2 (15) ran the first LeNet block's grad_W 10-20% faster on a Zen 3 (b = 1, 64, 256).
constexpr int kWGradBlock = kVectorRegisters == 32 ? 3 : 2;
constexpr int kColVecs = 2;       // column vectors per conv tile (2 vectors of conv columns -> 1 pooled vector)
constexpr int64_t kChunk = 8;     // samples per backward partial sum (fixed: deterministic reduction)

int64_t round_up(int64_t a, int64_t b) { return (a + b - 1) / b * b; }
// Elements past the end of the backward's padded input that weight_grad_tile's second row load may read.
template <typename T>
constexpr int64_t kRowSlack = kWidth<T>;

// Products with a scalar (a weight, an input value, a bias) are written `v * s`, not as a product with a vector
// of copies of s: GCC 12 then loads s with one vbroadcast from memory (or folds it into the FMA) at either width.
// A helper returning the broadcast vector came out as a scalar load plus a register broadcast on an FP pipe with
// 32-byte vectors (on Zen 3 the second block's grad_x took 1.37x and grad_W 1.28x as long), and the generic
// forms did worse with 64-byte ones, where only the set1 intrinsic matched what `v * s` gives.

// conv_tile's weight layout, and (one block of all output channels, padded) conv_tile_cl's. The tiles take the
// weights' `blocked` channels (output channels for the forward, input channels for grad_x) in blocks of `block`,
// the last one smaller unless `padded`; block b starting at channel c0 is stored from c0 * other * k * k on, laid
// out (other, k, k, b), so that the b channels' weights of each tap are adjacent and each weight of a tile is at a
// constant offset from one pointer per `other` channel (with the forward's weights read in place, GCC spent more
// instructions on their addresses than on the multiply-adds). `padded`: every block is `block` wide, the last
// one's missing channels left as dst holds them (zeros: the channel path's padding to op channels).
// src[i * blocked_stride + j * other_stride + tap] is weight (blocked i, other j, tap); `flip` reverses the taps
// (both spatial dimensions): grad_x is the forward conv of dz with W flipped, input and output channels swapped.
template <typename T>
void pack_weights(const T* src, int64_t blocked, int64_t blocked_stride, int64_t other, int64_t other_stride,
                  int64_t kk, int64_t block, bool flip, bool padded, T* dst) {
  for (int64_t c0 = 0; c0 < blocked; c0 += block) {
    const int64_t b = std::min(block, blocked - c0), width = padded ? block : b;
    T* d = dst + c0 * other * kk;
    for (int64_t j = 0; j < other; ++j)
      for (int64_t t = 0; t < kk; ++t)
        for (int64_t i = 0; i < b; ++i)
          d[(j * kk + t) * width + i] = src[(c0 + i) * blocked_stride + j * other_stride + (flip ? kk - 1 - t : t)];
  }
}

// Shapes and scratch-buffer geometry of one call, computed once on the host. All row lengths of the
// scratch buffers include the slack that the vector loads of the last column tile read (zeros).
struct Geometry {
  int64_t n;              // batch size
  int64_t c, h, w;        // input channels and size
  int64_t o, k, pad;      // output channels, kernel size, padding
  int64_t ho, wo;         // pooled output size (conv output 2*ho x 2*wo is what is computed)
  int64_t sxc, sxh, sxw;  // input strides (per sample: sxn)
  int64_t sxn;
  // padded input: (c, xh, xw); conv row i, column j reads x_pad[i + ky][j + kx]
  int64_t xh, xw, tiles;  // tiles: column tiles of the forward (kColVecs vectors of conv columns each)
  // dz plane: (o, dh, dw), dz[i][j] stored at [q + i][q + j], q = k - 1, zero elsewhere
  int64_t dh, dw, dcols;  // dcols: dz columns read by grad_W
  // grad_x tiles: in_vecs (1 where one vector spans the input row, else kColVecs) vectors of columns each
  int64_t in_vecs, in_tiles;
  // channel path (forward and grad_W vectorised over output channels, padded to op = round_up(o, W)): taken
  // when it wastes fewer lanes than the column path, whose tiles compute tiles * 2W columns per conv row
  int64_t op;
  bool chan;
};

template <typename T>
Geometry make_geometry(const at::Tensor& x4, const ConvActPoolShape& s) {
  constexpr int W = kWidth<T>;
  Geometry g;
  g.n = s.n;
  g.c = s.c, g.h = s.h, g.w = s.w;
  g.o = s.o, g.k = s.k, g.pad = s.pad;
  g.ho = s.ho, g.wo = s.wo;
  g.sxn = x4.stride(0), g.sxc = x4.stride(1), g.sxh = x4.stride(2), g.sxw = x4.stride(3);
  g.tiles = (2 * g.wo + kColVecs * W - 1) / (kColVecs * W);
  g.dcols = round_up(2 * g.wo, W);
  g.xh = 2 * g.ho + g.k - 1;
  g.xw = std::max(g.tiles * kColVecs * W, g.dcols) + g.k - 1;
  const int64_t q = g.k - 1;
  g.in_vecs = g.w <= W ? 1 : kColVecs;
  g.in_tiles = (g.w + g.in_vecs * W - 1) / (g.in_vecs * W);
  g.dh = std::max(q + 2 * g.ho, g.pad + g.h + g.k - 1);
  g.dw = std::max(q + g.dcols, g.pad + g.in_tiles * g.in_vecs * W + g.k - 1);
  g.op = round_up(g.o, W);
  g.chan = g.op * 2 * g.wo <= g.o * g.tiles * kColVecs * W;
  return g;
}

#if FASTMNIST_VEC_BYTES == 64
// The AVX-512 mask of lanes 0 .. n - 1 (n < W; for doubles the low 8 bits are used).
FASTMNIST_INLINE __mmask16 first_lanes(int64_t n) { return static_cast<__mmask16>((1u << n) - 1); }

// The first n (< W) values at p in lanes 0 .. n - 1, the other lanes zero: one masked load, which reads nothing
// past p[n - 1].
template <typename T>
FASTMNIST_INLINE Vec<T> load_first(const T* p, int64_t n) {
  if constexpr (sizeof(T) == 4) {
    return reinterpret_cast<Vec<T>>(_mm512_maskz_loadu_ps(first_lanes(n), p));
  } else {
    return reinterpret_cast<Vec<T>>(_mm512_maskz_loadu_pd(static_cast<__mmask8>(first_lanes(n)), p));
  }
}
#endif

// Stores the first n (<= W) lanes of v. With 64-byte vectors one masked store: the lane-by-lane loop went
// through a copy of v on the stack, read back in 8-byte pieces that stalled on the vector store (on an Intel
// Xeon, a quarter of the first LeNet block's forward, where every act and output row ends in a partial vector).
template <typename T>
FASTMNIST_INLINE void store_first(T* p, Vec<T> v, int64_t n) {
  if (n == kWidth<T>) {
    cpu::store(p, v);
    return;
  }
#if FASTMNIST_VEC_BYTES == 64
  if constexpr (sizeof(T) == 4) {
    _mm512_mask_storeu_ps(p, first_lanes(n), reinterpret_cast<__m512>(v));
  } else {
    _mm512_mask_storeu_pd(p, static_cast<__mmask8>(first_lanes(n)), reinterpret_cast<__m512d>(v));
  }
#else
  for (int64_t i = 0; i < n; ++i) p[i] = v[i];
#endif
}

// dst[0 .. n) = src[0 .. n). With 64-byte vectors in vector pieces, the last one masked: a row of a small image
// is too short for memmove's call to pay (7% of the first LeNet block's forward went to it).
template <typename T>
FASTMNIST_INLINE void copy_row(T* dst, const T* src, int64_t n) {
#if FASTMNIST_VEC_BYTES == 64
  constexpr int W = kWidth<T>;
  int64_t j = 0;
  for (; j + W <= n; j += W) cpu::store(dst + j, cpu::load<T>(src + j));
  if (j < n) store_first<T>(dst + j, load_first<T>(src + j, n - j), n - j);
#else
  std::copy(src, src + n, dst);
#endif
}

// Copies sample x (strided) into the interior of the zero-bordered buffer (c, xh, xw). Input rows and
// columns that no kept conv output reads (cut by the floor pooling) are skipped. Borders stay zero.
template <typename T>
FASTMNIST_INLINE void fill_padded(const T* x, const Geometry& g, T* buf) {
  const int64_t r1 = std::min(g.xh, g.pad + g.h), c1 = std::min(g.xw, g.pad + g.w);
  for (int64_t c = 0; c < g.c; ++c) {
    for (int64_t r = g.pad; r < r1; ++r) {
      const T* src = x + c * g.sxc + (r - g.pad) * g.sxh;
      T* dst = buf + (c * g.xh + r) * g.xw;
      if (g.sxw == 1) {
        copy_row<T>(dst + g.pad, src, c1 - g.pad);
      } else {
        for (int64_t col = g.pad; col < c1; ++col) dst[col] = src[(col - g.pad) * g.sxw];
      }
    }
  }
}

// acc[r][o][v] = sum_{c, ky, kx} in[c][r + ky][v*W + kx] * w[o][c][ky][kx] for R consecutive output rows,
// OB output channels and CB vectors of output columns. `in` points at the tile's first input row and column;
// `ld` is the input row length, `in_cstride` its channel stride; `w` points at the tile's block of weights in
// pack_weights' layout (channels, k, k, OB). Each weight is broadcast from its scalar (one vbroadcast from
// memory, or an FMA's embedded broadcast): LeNet's second block reads 2400 weights per tile, which stay in L1 as
// scalars but not as vectors of W copies (150 KB at W = 16, and the tile then ran at L2 speed). Only the tile's
// input rows [t0, t1) are read: the caller passes the rows that are not all zero (padding). KS > 0 fixes the
// kernel size at compile time (fully unrolled), 0 reads `k_rt`.
template <typename T, int KS, int R, int OB, int CB>
FASTMNIST_INLINE void conv_tile(const T* in, int64_t in_cstride, int64_t ld, const T* w, int64_t channels,
                                int64_t k_rt, int64_t t0, int64_t t1, Vec<T> (&acc)[R][OB][CB]) {
  constexpr int W = kWidth<T>;
  const int64_t k = KS > 0 ? KS : k_rt;
  // The loops over r, o and v are unrolled completely so that acc lives in registers.
#pragma GCC unroll 16
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 16
    for (int o = 0; o < OB; ++o)
#pragma GCC unroll 16
      for (int v = 0; v < CB; ++v) acc[r][o][v] = Vec<T>{};
  for (int64_t c = 0; c < channels; ++c) {
    const T* ic = in + c * in_cstride;
    const T* wc = w + c * k * k * OB;
    // input row t feeds output row r through kernel row ky = t - r: each loaded vector serves R*OB products
    auto input_row = [&](int64_t t) FASTMNIST_LAMBDA_INLINE {
      const T* row = ic + t * ld;
#pragma GCC unroll 8
      for (int64_t kx = 0; kx < k; ++kx) {
        Vec<T> xv[CB];
#pragma GCC unroll 16
        for (int v = 0; v < CB; ++v) xv[v] = cpu::load<T>(row + kx + v * W);
#pragma GCC unroll 16
        for (int r = 0; r < R; ++r) {
          const int64_t ky = t - r;
          if (ky < 0 || ky >= k) continue;
#pragma GCC unroll 16
          for (int o = 0; o < OB; ++o) {
            const T wk = wc[(ky * k + kx) * OB + o];
#pragma GCC unroll 16
            for (int v = 0; v < CB; ++v) acc[r][o][v] += xv[v] * wk;
          }
        }
      }
    };
    if constexpr (KS > 0) {
      // unrolled over t as well: every weight offset is then a constant, and no ky test is left at run time
#pragma GCC unroll 16
      for (int t = 0; t < KS + R - 1; ++t)
        if (t >= t0 && t < t1) input_row(t);
    } else {
      for (int64_t t = std::max<int64_t>(t0, 0); t < std::min<int64_t>(t1, k + R - 1); ++t) input_row(t);
    }
  }
}

// Sums of neighbouring lanes of the 2W values (a, b): {a0+a1, a2+a3, ..., b_{W-2}+b_{W-1}}.
template <typename T, std::size_t... I>
FASTMNIST_INLINE Vec<T> pair_sums(Vec<T> a, Vec<T> b, std::index_sequence<I...>) {
  return __builtin_shufflevector(a, b, (2 * I)...) + __builtin_shufflevector(a, b, (2 * I + 1)...);
}
template <typename T>
FASTMNIST_INLINE Vec<T> pair_sums(Vec<T> a, Vec<T> b) {
  return pair_sums<T>(a, b, std::make_index_sequence<kWidth<T>>{});
}

// The first W/2 values at p, each repeated twice: {p0, p0, p1, p1, ...} (the 2x upsampling of a pooled row).
// Loaded as a half-width vector: a partial copy into a full-width one goes through the stack.
template <typename T, std::size_t... I>
FASTMNIST_INLINE Vec<T> load_doubled(const T* p, std::index_sequence<I...>) {
  typedef T Half __attribute__((vector_size(sizeof(Vec<T>) / 2)));
  Half half;
  std::memcpy(&half, p, sizeof(half));
  return __builtin_shufflevector(half, half, (I / 2)...);
}

// Channel path tile: conv rows 2 pi, 2 pi + 1 and columns 2 pj .. 2 pj + 2 PC - 1 (PC pooling windows) for OB
// vectors of output channels, acc[r][col][v] = sum_{c, ky, kx} x_pad[c][2 pi + r + ky][2 pj + col + kx] *
// wcl[c][ky][kx][v*W ..]. `in` points at x_pad[0][2 pi][2 pj], `wcl` at the tile's first output channel of the
// weights laid out (C_in, k, k, op): every input value is broadcast and multiplies whole channel vectors.
template <typename T, int KS, int PC, int OB>
FASTMNIST_INLINE void conv_tile_cl(const T* in, const Geometry& g, const T* wcl, Vec<T> (&acc)[2][2 * PC][OB]) {
  constexpr int W = kWidth<T>;
  const int64_t k = KS > 0 ? KS : g.k;
#pragma GCC unroll 16
  for (int r = 0; r < 2; ++r)
#pragma GCC unroll 16
    for (int col = 0; col < 2 * PC; ++col)
#pragma GCC unroll 16
      for (int v = 0; v < OB; ++v) acc[r][col][v] = Vec<T>{};
  for (int64_t c = 0; c < g.c; ++c) {
    for (int64_t ky = 0; ky < k; ++ky) {
      const T* r0 = in + (c * g.xh + ky) * g.xw;
      const T* wr = wcl + (c * k + ky) * k * g.op;
#pragma GCC unroll 8
      for (int64_t kx = 0; kx < k; ++kx) {
        Vec<T> wv[OB];
#pragma GCC unroll 16
        for (int v = 0; v < OB; ++v) wv[v] = cpu::load<T>(wr + kx * g.op + v * W);
#pragma GCC unroll 16
        for (int r = 0; r < 2; ++r)
#pragma GCC unroll 16
          for (int col = 0; col < 2 * PC; ++col) {
            const T xk = r0[r * g.xw + col + kx];
#pragma GCC unroll 16
            for (int v = 0; v < OB; ++v) acc[r][col][v] += wv[v] * xk;
          }
      }
    }
  }
}

// Forward for samples [n0, n1). `buf` is this task's zeroed padded-input buffer; `act` may be null.
template <typename T, Activation A, int KS>
struct ConvActPoolForward {
  template <int OB>
  static FASTMNIST_INLINE void channel_block(const T* xpad, const Geometry& g, const T* w, const T* bias,
                                             int64_t o0, T* out, T* act) {
    constexpr int W = kWidth<T>;
    const int64_t conv_w = 2 * g.wo;
    for (int64_t pi = 0; pi < g.ho; ++pi) {
      for (int64_t tile = 0; tile < g.tiles; ++tile) {
        const int64_t col0 = tile * kColVecs * W;
        Vec<T> acc[2][OB][kColVecs];
        conv_tile<T, KS, 2, OB, kColVecs>(xpad + 2 * pi * g.xw + col0, g.xh * g.xw, g.xw, w + o0 * g.c * g.k * g.k,
                                          g.c, g.k, g.pad - 2 * pi, g.pad + g.h - 2 * pi, acc);
        const int64_t ncols = std::min<int64_t>(kColVecs * W, conv_w - col0);  // conv columns kept, even
#pragma GCC unroll 16
        for (int o = 0; o < OB; ++o) {
          const T b = bias != nullptr ? bias[o0 + o] : T(0);
          Vec<T> y[2 * kColVecs];  // y[r * kColVecs + v]: conv row r, column vector v
#pragma GCC unroll 16
          for (int r = 0; r < 2; ++r)
#pragma GCC unroll 16
            for (int v = 0; v < kColVecs; ++v) y[r * kColVecs + v] = acc[r][o][v] + b;
          cpu::vactivate_n<A, T, 2 * kColVecs>(y, T(0));
          if (act != nullptr) {
#pragma GCC unroll 16
            for (int r = 0; r < 2; ++r) {
              T* arow = act + ((o0 + o) * 2 * g.ho + 2 * pi + r) * conv_w + col0;
#pragma GCC unroll 16
              for (int v = 0; v < kColVecs; ++v)
                store_first<T>(arow + v * W, y[r * kColVecs + v], std::clamp<int64_t>(ncols - v * W, 0, W));
            }
          }
          const Vec<T> pooled = pair_sums<T>(y[0] + y[kColVecs], y[1] + y[kColVecs + 1]) * T(0.25);
          store_first<T>(out + ((o0 + o) * g.ho + pi) * g.wo + tile * W, pooled, ncols / 2);
        }
      }
    }
  }
  template <int OB>
  static FASTMNIST_INLINE void channel_blocks(int64_t o, const T* xpad, const Geometry& g, const T* w,
                                              const T* bias, T* out, T* act) {
    for (; o + OB <= g.o; o += OB) channel_block<OB>(xpad, g, w, bias, o, out, act);
    if constexpr (OB > 1) {
      if (o < g.o) channel_blocks<OB - 1>(o, xpad, g, w, bias, out, act);
    }
  }
  // Channel path: PC pooling windows x OB channel vectors from output channel o0 (bcl: bias padded to op).
  // Lanes of padded channels (o >= g.o) are computed and dropped.
  template <int PC, int OB>
  static FASTMNIST_INLINE void window_tile(const T* xpad, const Geometry& g, const T* wcl, const T* bcl, int64_t o0,
                                           int64_t pi, int64_t pj, T* out, T* act) {
    constexpr int W = kWidth<T>;
    Vec<T> acc[2][2 * PC][OB];
    conv_tile_cl<T, KS, PC, OB>(xpad + 2 * pi * g.xw + 2 * pj, g, wcl + o0, acc);
#pragma GCC unroll 16
    for (int v = 0; v < OB; ++v) {
      const Vec<T> b = cpu::load<T>(bcl + o0 + v * W);
      const int64_t ob = o0 + v * W, lanes = std::min<int64_t>(W, g.o - ob);
#pragma GCC unroll 16
      for (int p = 0; p < PC; ++p) {
        Vec<T> y[4];  // y[2 r + cc]: the window's conv row r, column cc
#pragma GCC unroll 16
        for (int r = 0; r < 2; ++r)
#pragma GCC unroll 16
          for (int cc = 0; cc < 2; ++cc) y[2 * r + cc] = acc[r][2 * p + cc][v] + b;
        cpu::vactivate_n<A, T, 4>(y, T(0));
        Vec<T> pooled{};
#pragma GCC unroll 16
        for (int r = 0; r < 2; ++r)
#pragma GCC unroll 16
          for (int cc = 0; cc < 2; ++cc) {
            pooled += y[2 * r + cc];
            if (act != nullptr) {
              T* a = act + (ob * 2 * g.ho + 2 * pi + r) * 2 * g.wo + 2 * (pj + p) + cc;
              for (int64_t l = 0; l < lanes; ++l) a[l * 4 * g.ho * g.wo] = y[2 * r + cc][l];
            }
          }
        pooled *= T(0.25);
        T* o = out + (ob * g.ho + pi) * g.wo + pj + p;
        for (int64_t l = 0; l < lanes; ++l) o[l * g.ho * g.wo] = pooled[l];
      }
    }
  }
  // Channel path for one sample: pairs of channel vectors, one window at a time (8 accumulators for T = float);
  // a last single vector two windows at a time.
  static FASTMNIST_INLINE void channel_path(const T* xpad, const Geometry& g, const T* wcl, const T* bcl, T* out,
                                            T* act) {
    constexpr int W = kWidth<T>;
    for (int64_t pi = 0; pi < g.ho; ++pi) {
      int64_t o0 = 0;
      for (; o0 + 2 * W <= g.op; o0 += 2 * W)
        for (int64_t pj = 0; pj < g.wo; ++pj) window_tile<1, 2>(xpad, g, wcl, bcl, o0, pi, pj, out, act);
      if (o0 < g.op) {
        int64_t pj = 0;
        for (; pj + 2 <= g.wo; pj += 2) window_tile<2, 1>(xpad, g, wcl, bcl, o0, pi, pj, out, act);
        if (pj < g.wo) window_tile<1, 1>(xpad, g, wcl, bcl, o0, pi, pj, out, act);
      }
    }
  }
  // w: the packed weights (column path) or channels-last weights (channel path); bias: the channel path's padded
  // bias (never null there).
  static FASTMNIST_INLINE void run(const T* x, Geometry g, const T* w, const T* bias, T* out, T* act, T* buf,
                                   int64_t n0, int64_t n1) {
    for (int64_t n = n0; n < n1; ++n) {
      fill_padded<T>(x + n * g.sxn, g, buf);
      T* out_n = out + n * g.o * g.ho * g.wo;
      T* act_n = act != nullptr ? act + n * g.o * 4 * g.ho * g.wo : nullptr;
      if (g.chan) {
        channel_path(buf, g, w, bias, out_n, act_n);
      } else {
        channel_blocks<kConvBlock>(0, buf, g, w, bias, out_n, act_n);
      }
    }
  }
};

// dz for one sample into the dz plane, and the per-channel sums of dz added to gb (if not null). A row's tail
// (conv_w % W columns) is one vector whose loads run past the row, where that stays inside the tensors (gout_end,
// act_end: one past their last element), with the lanes past the row zeroed (they are dz's border); else it is
// done element by element.
template <typename T, Activation A>
FASTMNIST_INLINE void form_dz(const T* gout, const T* act, const Geometry& g, T* dz, T* gb, const T* gout_end,
                              const T* act_end) {
  constexpr int W = kWidth<T>;
  const int64_t q = g.k - 1, conv_w = 2 * g.wo, tail = conv_w % W;
  const IntVec<T> tail_lanes = cpu::lane_mask<T>(tail);
  const Vec<T> zero{};
  for (int64_t o = 0; o < g.o; ++o) {
    Vec<T> vsum{};
    T ssum = 0;
    for (int64_t i = 0; i < 2 * g.ho; ++i) {
      const T* grow = gout + (o * g.ho + i / 2) * g.wo;
      const T* arow = A == Activation::Identity ? nullptr : act + (o * 2 * g.ho + i) * conv_w;
      T* drow = dz + (o * g.dh + q + i) * g.dw + q;
      auto dz_vector = [&](int64_t j) FASTMNIST_LAMBDA_INLINE {
        Vec<T> gv = load_doubled<T>(grow + j / 2, std::make_index_sequence<W>{}) * T(0.25);
        if constexpr (A != Activation::Identity) gv *= cpu::vgrad_from_output<A, T>(cpu::load<T>(arow + j), T(0));
        return gv;
      };
      int64_t j = 0;
      for (; j + W <= conv_w; j += W) {
        const Vec<T> gv = dz_vector(j);
        cpu::store(drow + j, gv);
        vsum += gv;
      }
      if (tail > 0 && grow + j / 2 + W / 2 <= gout_end && (arow == nullptr || arow + j + W <= act_end)) {
        const Vec<T> gv = tail_lanes ? dz_vector(j) : zero;
        cpu::store(drow + j, gv);  // inside the dz row: dw >= q + dcols
        vsum += gv;
        j = conv_w;
      }
      for (; j < conv_w; ++j) {
        T d = T(0.25) * grow[j / 2];
        if constexpr (A != Activation::Identity) d *= activation_grad_from_output<T>(A, arow[j], T(0));
        drow[j] = d;
        ssum += d;
      }
    }
    if (gb != nullptr) gb[o] += cpu::reduce_add<T>(vsum) + ssum;
  }
}

// form_dz for the op's activation, chosen at run time: the activation enters backward only here, so the
// backward kernels are built once per dtype and kernel size, not once per activation as well.
template <typename T>
FASTMNIST_INLINE void form_dz_for(Activation act, const T* gout, const T* act_out, const Geometry& g, T* dz, T* gb,
                                  const T* gout_end, const T* act_end) {
  switch (act) {
    case Activation::Identity:
      return form_dz<T, Activation::Identity>(gout, act_out, g, dz, gb, gout_end, act_end);
    case Activation::Relu:
      return form_dz<T, Activation::Relu>(gout, act_out, g, dz, gb, gout_end, act_end);
    case Activation::Sigmoid:
      return form_dz<T, Activation::Sigmoid>(gout, act_out, g, dz, gb, gout_end, act_end);
    default:  // Tanh (check_conv_act_pool_args rejects leaky_relu)
      return form_dz<T, Activation::Tanh>(gout, act_out, g, dz, gb, gout_end, act_end);
  }
}

// Lanes S .. S + W - 1 of the 2W values (lo, hi): the row vector starting S elements after lo's (one valignd
// at 64 bytes).
template <typename T, int S, std::size_t... I>
FASTMNIST_INLINE Vec<T> shifted(Vec<T> lo, Vec<T> hi, std::index_sequence<I...>) {
  return __builtin_shufflevector(lo, hi, (I + S)...);
}

// acc[o][B] += dv[o] * (the x row shifted by B taps), for one tap B and for all the taps B...
template <typename T, int OB, int KB, int B>
FASTMNIST_INLINE void tap_product(Vec<T> (&acc)[OB][KB], const Vec<T> (&dv)[OB], Vec<T> lo, Vec<T> hi) {
  const Vec<T> xv = shifted<T, B>(lo, hi, std::make_index_sequence<kWidth<T>>{});
#pragma GCC unroll 16
  for (int o = 0; o < OB; ++o) acc[o][B] += dv[o] * xv;
}
template <typename T, int OB, int KB, int... B>
FASTMNIST_INLINE void tap_products(Vec<T> (&acc)[OB][KB], const Vec<T> (&dv)[OB], Vec<T> lo, Vec<T> hi,
                                   std::integer_sequence<int, B...>) {
  (tap_product<T, OB, KB, B>(acc, dv, lo, hi), ...);
}

// gwv[o][c][ky][kx][:] += lane sums over i, j of dz[o][i][j] * x_pad[c][i + ky][j + kx] for OB output channels
// and KB taps (the W lanes of each weight's vector partial are added up once per chunk, not per sample)
// kx0 .. kx0 + KB - 1 of one (c, ky). With several taps (KB <= W + 1) the row vectors x[j + b] are lane shifts of
// two loads, x[j .. j + W) and x[j + W .. j + 2W): one load per tap, unaligned and so split across two cache lines
// at 64 bytes, was the tile's bottleneck, and GCC folded each into every FMA that used it (OB loads per tap).
// The second load reads up to W elements past the row's last tap: the buffer has that slack (kRowSlack).
template <typename T, int OB, int KB>
FASTMNIST_INLINE void weight_grad_tile(const T* dz, const T* xpad, const Geometry& g, int64_t o0, int64_t c,
                                       int64_t ky, int64_t kx0, T* gwv) {
  constexpr int W = kWidth<T>;
  static_assert(KB == 1 || KB <= W + 1, "taps are lane shifts of two vectors");
  const int64_t q = g.k - 1;
  Vec<T> acc[OB][KB] = {};
  for (int64_t i = 0; i < 2 * g.ho; ++i) {
    const T* xr = xpad + (c * g.xh + i + ky) * g.xw + kx0;
    const T* dr[OB];
#pragma GCC unroll 16
    for (int o = 0; o < OB; ++o) dr[o] = dz + ((o0 + o) * g.dh + q + i) * g.dw + q;
    for (int64_t j = 0; j < g.dcols; j += W) {
      Vec<T> dv[OB];
#pragma GCC unroll 16
      for (int o = 0; o < OB; ++o) dv[o] = cpu::load<T>(dr[o] + j);
      if constexpr (KB == 1) {
        const Vec<T> xv = cpu::load<T>(xr + j);
#pragma GCC unroll 16
        for (int o = 0; o < OB; ++o) acc[o][0] += dv[o] * xv;
      } else {
        tap_products<T, OB, KB>(acc, dv, cpu::load<T>(xr + j), cpu::load<T>(xr + j + W),
                                std::make_integer_sequence<int, KB>{});
      }
    }
  }
#pragma GCC unroll 16
  for (int o = 0; o < OB; ++o)
#pragma GCC unroll 16
    for (int b = 0; b < KB; ++b) {
      T* p = gwv + ((((o0 + o) * g.c + c) * g.k + ky) * g.k + kx0 + b) * W;
      cpu::store(p, cpu::load<T>(p) + acc[o][b]);
    }
}

// One step of weight_grad_tile_cl: dz columns j .. j + JB - 1 of dz row i. Input value x[y][j + m] (kernel row
// ky + y) multiplies dz column j + jj for tap b = m - jj: one broadcast serves every tap of the JB columns
// that reads it, so loads stay below the FMAs (one broadcast per FMA made the tile load-bound).
template <typename T, int RY, int KB, int OB, int JB>
FASTMNIST_INLINE void weight_grad_step_cl(const T* dr, const T* xr, int64_t ldx, int64_t op,
                                          Vec<T> (&acc)[RY][KB][OB]) {
  constexpr int W = kWidth<T>;
  Vec<T> dv[JB][OB];
#pragma GCC unroll 16
  for (int jj = 0; jj < JB; ++jj)
#pragma GCC unroll 16
    for (int v = 0; v < OB; ++v) dv[jj][v] = cpu::load<T>(dr + jj * op + v * W);
#pragma GCC unroll 32
  for (int m = 0; m < JB + KB - 1; ++m)
#pragma GCC unroll 16
    for (int y = 0; y < RY; ++y) {
      const T xk = xr[y * ldx + m];
#pragma GCC unroll 16
      for (int jj = 0; jj < JB; ++jj) {
        const int b = m - jj;
        if (b < 0 || b >= KB) continue;
#pragma GCC unroll 16
        for (int v = 0; v < OB; ++v) acc[y][b][v] += dv[jj][v] * xk;
      }
    }
}

// The W x W matrix m[row][lane] transposed in place, as log2(W) rounds that each swap one bit of the row index
// with the same bit of the lane index: rows r and r + H (bit H of r clear) exchange their lanes with bit H set
// and clear respectively (two-source shuffles; W log2 W of them in all).
template <typename T, int H, std::size_t... I>
FASTMNIST_INLINE void swap_index_bit(Vec<T> (&m)[kWidth<T>], std::index_sequence<I...>) {
  constexpr int W = kWidth<T>;
#pragma GCC unroll 16
  for (int r = 0; r < W; ++r) {
    if (r & H) continue;
    const Vec<T> a = m[r], b = m[r + H];
    m[r] = __builtin_shufflevector(a, b, ((I & H) ? W + I - H : I)...);
    m[r + H] = __builtin_shufflevector(a, b, ((I & H) ? W + I : I + H)...);
  }
}
template <typename T, int H = kWidth<T> / 2>
FASTMNIST_INLINE void transpose(Vec<T> (&m)[kWidth<T>]) {
  swap_index_bit<T, H>(m, std::make_index_sequence<kWidth<T>>{});
  if constexpr (H > 1) transpose<T, H / 2>(m);
}

// dz columns per step of weight_grad_tile_cl (their OB vectors each stay in registers for the step). With 16
// vector registers a 2-vector tile keeps one column: with two, its 10 accumulators, 4 dz vectors and a broadcast
// left no register free, and the second LeNet block's grad_W ran 2-8% slower on a Zen 3.
template <int OB>
constexpr int kDzColumns = OB == 1 ? 4 : kVectorRegisters == 32 ? 2 : 1;

// Channel path: gwcl[c][ky + y][kx0 + b][v*W ..] += sum_{i, j} x_pad[c][i + ky + y][j + kx0 + b] *
// dzcl[i][j][v*W ..] for RY kernel rows, KB taps and OB channel vectors (gwcl, dzcl pointing at the first output
// channel). dzcl is dz laid out channels last, (2 ho, 2 wo, op), padded channels zero. RY * KB * OB independent
// accumulators (10 for LeNet's second block in float): fewer would leave the FMA units waiting on their latency.
template <typename T, int RY, int KB, int OB>
FASTMNIST_INLINE void weight_grad_tile_cl(const T* dzcl, const T* xpad, const Geometry& g, int64_t c, int64_t ky,
                                          int64_t kx0, T* gwcl) {
  constexpr int W = kWidth<T>;
  constexpr int J = kDzColumns<OB>;
  const int64_t conv_w = 2 * g.wo;
  Vec<T> acc[RY][KB][OB] = {};
  for (int64_t i = 0; i < 2 * g.ho; ++i) {
    const T* xr = xpad + (c * g.xh + i + ky) * g.xw + kx0;
    const T* dr = dzcl + i * conv_w * g.op;
    int64_t j = 0;
    for (; j + J <= conv_w; j += J) weight_grad_step_cl<T, RY, KB, OB, J>(dr + j * g.op, xr + j, g.xw, g.op, acc);
    for (; j < conv_w; ++j) weight_grad_step_cl<T, RY, KB, OB, 1>(dr + j * g.op, xr + j, g.xw, g.op, acc);
  }
#pragma GCC unroll 16
  for (int y = 0; y < RY; ++y)
#pragma GCC unroll 16
    for (int b = 0; b < KB; ++b)
#pragma GCC unroll 16
      for (int v = 0; v < OB; ++v) {
        T* p = gwcl + ((c * g.k + ky + y) * g.k + kx0 + b) * g.op + v * W;
        cpu::store(p, cpu::load<T>(p) + acc[y][b][v]);
      }
}

// Backward for one chunk of samples [n0, n1): grad_x rows of those samples (if gx), and this chunk's partial
// sums of grad_W (gw) and grad_b (gb), zeroed here (either may be null). xbuf, dz and dzcl (channel path) are
// this task's zeroed scratch buffers, gwv (weights x vector width) its scratch for the vector partials of grad_W
// (column path) or for grad_W laid out (C_in, k, k, op) (channel path); wflip is W flipped in both spatial
// dimensions, input and output channels swapped, and packed for grad_x's tiles (pack_weights; only for gx).
template <typename T, int KS>
struct ConvActPoolBackward {
  // grad_W partials of one sample, output channels from o on in blocks of OB (then smaller blocks).
  template <int OB>
  static FASTMNIST_INLINE void weight_grad(int64_t o, const T* dz, const T* xpad, const Geometry& g, T* gw) {
    for (; o + OB <= g.o; o += OB) {
      for (int64_t c = 0; c < g.c; ++c) {
        for (int64_t ky = 0; ky < g.k; ++ky) {
          if constexpr (KS > 0) {
            weight_grad_tile<T, OB, KS>(dz, xpad, g, o, c, ky, 0, gw);
          } else {
            for (int64_t kx = 0; kx < g.k; ++kx) weight_grad_tile<T, OB, 1>(dz, xpad, g, o, c, ky, kx, gw);
          }
        }
      }
    }
    if constexpr (OB > 1) {
      if (o < g.o) weight_grad<OB - 1>(o, dz, xpad, g, gw);
    }
  }
  // Channel path: dz transposed to channels last, then tiles of kernel rows x K taps x channel vectors.
  static FASTMNIST_INLINE void weight_grad_cl(const T* dz, T* dzcl, const T* xpad, const Geometry& g, T* gwcl) {
    constexpr int W = kWidth<T>;
    const int64_t q = g.k - 1, conv_w = 2 * g.wo;
    // W x W blocks (channels x columns) transposed in registers; padded channels get zeros
    for (int64_t o0 = 0; o0 < g.op; o0 += W)
      for (int64_t i = 0; i < 2 * g.ho; ++i)
        for (int64_t j0 = 0; j0 < conv_w; j0 += W) {
          Vec<T> block[W];
#pragma GCC unroll 16
          for (int oo = 0; oo < W; ++oo)
            block[oo] = o0 + oo < g.o ? cpu::load<T>(dz + ((o0 + oo) * g.dh + q + i) * g.dw + q + j0) : Vec<T>{};
          transpose<T>(block);
          const int64_t ncols = std::min<int64_t>(W, conv_w - j0);
          for (int64_t jj = 0; jj < ncols; ++jj) cpu::store(dzcl + (i * conv_w + j0 + jj) * g.op + o0, block[jj]);
        }
    for (int64_t c = 0; c < g.c; ++c) {
      int64_t o0 = 0;
      for (; o0 + 2 * W <= g.op; o0 += 2 * W) weight_grad_rows<2>(dzcl + o0, xpad, g, c, gwcl + o0);
      if (o0 < g.op) weight_grad_rows<1>(dzcl + o0, xpad, g, c, gwcl + o0);
    }
  }
  // All kernel rows of input channel c for OB channel vectors: in pairs of rows where the accumulators of two
  // fit in the vector registers (32 with 64-byte vectors, 16 with 32-byte ones) next to the dz vectors.
  template <int OB>
  static FASTMNIST_INLINE void weight_grad_rows(const T* dzcl, const T* xpad, const Geometry& g, int64_t c,
                                                T* gwcl) {
    constexpr int KB = KS > 0 ? KS : 1;
    constexpr int RY = 2 * KB * OB + kDzColumns<OB> * OB + 2 <= kVectorRegisters ? 2 : 1;
    int64_t ky = 0;
    for (; ky + RY <= g.k; ky += RY) weight_grad_taps<RY, OB>(dzcl, xpad, g, c, ky, gwcl);
    if (ky < g.k) weight_grad_taps<1, OB>(dzcl, xpad, g, c, ky, gwcl);
  }
  template <int RY, int OB>
  static FASTMNIST_INLINE void weight_grad_taps(const T* dzcl, const T* xpad, const Geometry& g, int64_t c,
                                                int64_t ky, T* gwcl) {
    if constexpr (KS > 0) {
      weight_grad_tile_cl<T, RY, KS, OB>(dzcl, xpad, g, c, ky, 0, gwcl);
    } else {
      for (int64_t kx = 0; kx < g.k; ++kx) weight_grad_tile_cl<T, RY, 1, OB>(dzcl, xpad, g, c, ky, kx, gwcl);
    }
  }

  // grad_x rows h .. h + R - 1 of input channels c0 .. c0 + OB - 1.
  template <int R, int OB, int CB>
  static FASTMNIST_INLINE void input_grad_rows(const T* dz, const Geometry& g, const T* wflip, int64_t c0, int64_t h,
                                               T* gx) {
    constexpr int W = kWidth<T>;
    const T* base = dz + g.pad * g.dw + g.pad;
    const int64_t q = g.k - 1;
    for (int64_t tile = 0; tile < g.in_tiles; ++tile) {
      const int64_t col0 = tile * CB * W;
      Vec<T> acc[R][OB][CB];
      // dz rows q .. q + 2 ho - 1 of the plane are the nonzero ones; this tile reads plane rows pad + h + t
      conv_tile<T, KS, R, OB, CB>(base + h * g.dw + col0, g.dh * g.dw, g.dw, wflip + c0 * g.o * g.k * g.k, g.o, g.k,
                                  q - g.pad - h, q + 2 * g.ho - g.pad - h, acc);
      const int64_t ncols = std::min<int64_t>(CB * W, g.w - col0);
#pragma GCC unroll 16
      for (int r = 0; r < R; ++r)
#pragma GCC unroll 16
        for (int o = 0; o < OB; ++o) {
          T* row = gx + ((c0 + o) * g.h + h + r) * g.w + col0;
#pragma GCC unroll 16
          for (int v = 0; v < CB; ++v)
            store_first<T>(row + v * W, acc[r][o][v], std::clamp<int64_t>(ncols - v * W, 0, W));
        }
    }
  }
  // Pairs of rows where their accumulators fit in the vector registers: each dz vector loaded then serves both.
  template <int OB, int CB>
  static FASTMNIST_INLINE void input_grad_block(const T* dz, const Geometry& g, const T* wflip, int64_t c0, T* gx) {
    constexpr int R = 2 * OB * CB + CB + 2 <= kVectorRegisters ? 2 : 1;
    int64_t h = 0;
    for (; h + R <= g.h; h += R) input_grad_rows<R, OB, CB>(dz, g, wflip, c0, h, gx);
    if (h < g.h) input_grad_rows<1, OB, CB>(dz, g, wflip, c0, h, gx);
  }
  template <int OB, int CB>
  static FASTMNIST_INLINE void input_grad_blocks(int64_t c, const T* dz, const Geometry& g, const T* wflip, T* gx) {
    for (; c + OB <= g.c; c += OB) input_grad_block<OB, CB>(dz, g, wflip, c, gx);
    if constexpr (OB > 1) {
      if (c < g.c) input_grad_blocks<OB - 1, CB>(c, dz, g, wflip, gx);
    }
  }

  static FASTMNIST_INLINE void run(const T* x, Geometry g, Activation a, const T* wflip, const T* gout, const T* act,
                                   T* gx, T* gw, T* gb, T* xbuf, T* dz, T* dzcl, T* gwv, int64_t n0, int64_t n1) {
    constexpr int W = kWidth<T>;
    const int64_t wsize = g.o * g.c * g.k * g.k, kk = g.k * g.k;
    if (gw != nullptr) std::fill(gwv, gwv + (g.chan ? g.c * kk * g.op : wsize * W), T(0));
    if (gb != nullptr) std::fill(gb, gb + g.o, T(0));
    const int64_t out_numel = g.o * g.ho * g.wo;
    for (int64_t n = n0; n < n1; ++n) {
      form_dz_for<T>(a, gout + n * out_numel, act != nullptr ? act + n * 4 * out_numel : nullptr, g, dz, gb,
                     gout + g.n * out_numel, act != nullptr ? act + g.n * 4 * out_numel : nullptr);
      if (gw != nullptr) {
        fill_padded<T>(x + n * g.sxn, g, xbuf);
        if (g.chan) {
          weight_grad_cl(dz, dzcl, xbuf, g, gwv);
        } else {
          weight_grad<kWGradBlock>(0, dz, xbuf, g, gwv);
        }
      }
      if (gx != nullptr) {
        T* gx_n = gx + n * g.c * g.h * g.w;
        if (g.in_vecs == 1) {
          input_grad_blocks<kInGradBlock, 1>(0, dz, g, wflip, gx_n);
        } else {
          input_grad_blocks<kInGradBlock, kColVecs>(0, dz, g, wflip, gx_n);
        }
      }
    }
    if (gw != nullptr && g.chan) {
      for (int64_t o = 0; o < g.o; ++o)
        for (int64_t i = 0; i < g.c * kk; ++i) gw[o * g.c * kk + i] = gwv[i * g.op + o];
    } else if (gw != nullptr) {
      for (int64_t i = 0; i < wsize; ++i) gw[i] = cpu::reduce_add<T>(cpu::load<T>(gwv + i * W));
    }
  }
};

// Calls f(ActivationConstant<A>{}) for the op's activation: the four that check_conv_act_pool_args accepts, so
// that no forward kernel is built for leaky_relu.
template <typename F>
auto with_conv_activation(Activation act, F&& f) {
  switch (act) {
    case Activation::Identity: return f(ActivationConstant<Activation::Identity>{});
    case Activation::Relu: return f(ActivationConstant<Activation::Relu>{});
    case Activation::Sigmoid: return f(ActivationConstant<Activation::Sigmoid>{});
    default: break;
  }
  TORCH_INTERNAL_ASSERT(act == Activation::Tanh, "conv_act_pool: leaky_relu reached the kernel");
  return f(ActivationConstant<Activation::Tanh>{});
}

// Calls f(std::integral_constant<int, KS>{}) with KS = 5 (LeNet's kernel, fully unrolled) or 0 (any size).
template <typename F>
auto with_kernel_size(int64_t k, F&& f) {
  if (k == 5) return f(std::integral_constant<int, 5>{});
  return f(std::integral_constant<int, 0>{});
}

}  // namespace

namespace cpu {
inline namespace FASTMNIST_VEC_NS {

std::tuple<at::Tensor, at::Tensor> conv_act_pool_cpu(const at::Tensor& x, const at::Tensor& weight,
                                                     const std::optional<at::Tensor>& bias, int64_t padding,
                                                     c10::string_view activation, bool save_act) {
  constexpr const char* op = "conv_act_pool";
  const ConvActPoolArgs args = check_conv_act_pool_args(op, check_float_tensor, x, weight, padding, activation);
  TORCH_CHECK(x.device().is_cpu(), op, ": the CPU kernel got x on ", x.device());
  const at::Tensor b = checked_bias(op, bias, x, weight);
  const at::Tensor& x4 = args.x4;
  const at::Tensor w = weight.contiguous();
  const int64_t n = args.shape.n;
  at::Tensor out, saved;
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "conv_act_pool_cpu", [&] {
    const Geometry g = make_geometry<scalar_t>(x4, args.shape);
    out = at::empty({n, g.o, g.ho, g.wo}, x.options());
    saved = save_act ? at::empty({n, g.o, 2 * g.ho, 2 * g.wo}, x.options()) : at::empty({0}, x.options());
    if (out.numel() == 0) return;
    const scalar_t* x_ptr = x4.const_data_ptr<scalar_t>();
    const int64_t kk = g.k * g.k;
    // the weights packed for the path's tiles; the channel path's bias padded with zeros to op channels
    std::vector<scalar_t> wpacked(g.chan ? g.c * kk * g.op : w.numel(), scalar_t(0)), bpadded;
    pack_weights(w.const_data_ptr<scalar_t>(), g.o, g.c * kk, g.c, kk, kk, g.chan ? g.op : kConvBlock, false, g.chan,
                 wpacked.data());
    const scalar_t* w_ptr = wpacked.data();
    const scalar_t* b_ptr = b.defined() ? b.const_data_ptr<scalar_t>() : nullptr;
    if (g.chan) {
      bpadded.assign(g.op, scalar_t(0));
      if (b_ptr != nullptr) std::copy(b_ptr, b_ptr + g.o, bpadded.data());
      b_ptr = bpadded.data();
    }
    scalar_t* out_ptr = out.mutable_data_ptr<scalar_t>();
    scalar_t* act_ptr = save_act ? saved.mutable_data_ptr<scalar_t>() : nullptr;
    // about 64k multiply-adds per task at least
    const int64_t grain = std::max<int64_t>(1, 65536 / std::max<int64_t>(1, g.o * g.c * g.k * g.k * 4 * g.ho * g.wo));
    with_conv_activation(args.act, [&](auto a) {
      constexpr Activation A = decltype(a)::value;
      with_kernel_size(g.k, [&](auto ks) {
        constexpr int KS = decltype(ks)::value;
        at::parallel_for(0, n, grain, [&](int64_t n0, int64_t n1) {
          std::vector<scalar_t> buf(g.c * g.xh * g.xw, scalar_t(0));
          cpu::run_kernel<ConvActPoolForward<scalar_t, A, KS>>(x_ptr, g, w_ptr, b_ptr, out_ptr, act_ptr, buf.data(),
                                                               n0, n1);
        });
      });
    });
  });
  if (!args.batched) {
    out = out.squeeze(0);
    if (save_act) saved = saved.squeeze(0);
  }
  return {out, saved};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> conv_act_pool_backward_cpu(
    const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& weight, const at::Tensor& act_out,
    int64_t padding, c10::string_view activation, std::array<bool, 3> output_mask) {
  constexpr const char* op = "conv_act_pool_backward";
  const ConvActPoolArgs args = check_conv_act_pool_args(op, check_float_tensor, x, weight, padding, activation);
  TORCH_CHECK(x.device().is_cpu(), op, ": the CPU kernel got x on ", x.device());
  const ConvActPoolBackwardInputs in = check_conv_act_pool_backward_inputs(op, grad_out, act_out, x, args);
  const at::Tensor& x4 = args.x4;
  const int64_t n = args.shape.n, c_out = args.shape.o;
  const at::Tensor w = weight.contiguous();
  const bool need_x = output_mask[0], need_w = output_mask[1], need_b = output_mask[2];
  at::Tensor grad_x = need_x ? at::empty(x4.sizes(), x.options()) : at::empty({0}, x.options());
  at::Tensor grad_w = need_w ? at::empty(weight.sizes(), x.options()) : at::empty({0}, x.options());
  at::Tensor grad_b = need_b ? at::empty({c_out}, x.options()) : at::empty({0}, x.options());
  if (need_x || need_w || need_b) {
    const int64_t chunks = (n + kChunk - 1) / kChunk;
    const int64_t wsize = weight.numel();
    at::Tensor w_partial = need_w ? at::empty({chunks, wsize}, x.options()) : at::Tensor();
    at::Tensor b_partial = need_b ? at::empty({chunks, c_out}, x.options()) : at::Tensor();
    AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "conv_act_pool_backward_cpu", [&] {
      const Geometry geo = make_geometry<scalar_t>(x4, args.shape);
      const scalar_t* x_ptr = x4.const_data_ptr<scalar_t>();
      const scalar_t* g_ptr = in.grad_out.const_data_ptr<scalar_t>();
      const scalar_t* a_ptr = in.act.defined() ? in.act.const_data_ptr<scalar_t>() : nullptr;
      // W flipped, input and output channels swapped, packed for grad_x's tiles
      std::vector<scalar_t> wflip;
      if (need_x) {
        const int64_t kk = geo.k * geo.k;
        wflip.resize(wsize);
        pack_weights(w.const_data_ptr<scalar_t>(), geo.c, kk, geo.o, geo.c * kk, kk, kInGradBlock, true, false,
                     wflip.data());
      }
      const scalar_t* wf_ptr = need_x ? wflip.data() : nullptr;
      scalar_t* gx_ptr = need_x ? grad_x.mutable_data_ptr<scalar_t>() : nullptr;
      scalar_t* wp_ptr = need_w ? w_partial.mutable_data_ptr<scalar_t>() : nullptr;
      scalar_t* bp_ptr = need_b ? b_partial.mutable_data_ptr<scalar_t>() : nullptr;
      with_kernel_size(geo.k, [&](auto ks) {
        constexpr int KS = decltype(ks)::value;
        at::parallel_for(0, chunks, 1, [&](int64_t c0, int64_t c1) {
          std::vector<scalar_t> xbuf(need_w ? geo.c * geo.xh * geo.xw + kRowSlack<scalar_t> : 0, scalar_t(0));
          std::vector<scalar_t> dz(geo.o * geo.dh * geo.dw, scalar_t(0));
          std::vector<scalar_t> dzcl(need_w && geo.chan ? 4 * geo.ho * geo.wo * geo.op : 0, scalar_t(0));
          std::vector<scalar_t> gwv(need_w ? wsize * kWidth<scalar_t> : 0);
          for (int64_t c = c0; c < c1; ++c) {
            cpu::run_kernel<ConvActPoolBackward<scalar_t, KS>>(
                x_ptr, geo, args.act, wf_ptr, g_ptr, a_ptr, gx_ptr, wp_ptr ? wp_ptr + c * wsize : nullptr,
                bp_ptr ? bp_ptr + c * c_out : nullptr, xbuf.data(), dz.data(), dzcl.data(), gwv.data(), c * kChunk,
                std::min(n, (c + 1) * kChunk));
          }
        });
      });
      // chunk partials added in chunk order
      if (need_w) {
        scalar_t* gw = grad_w.mutable_data_ptr<scalar_t>();
        std::fill(gw, gw + wsize, scalar_t(0));
        for (int64_t c = 0; c < chunks; ++c)
          for (int64_t i = 0; i < wsize; ++i) gw[i] += wp_ptr[c * wsize + i];
      }
      if (need_b) {
        scalar_t* gb = grad_b.mutable_data_ptr<scalar_t>();
        std::fill(gb, gb + c_out, scalar_t(0));
        for (int64_t c = 0; c < chunks; ++c)
          for (int64_t i = 0; i < c_out; ++i) gb[i] += bp_ptr[c * c_out + i];
      }
    });
  }
  if (need_x && !args.batched) grad_x = grad_x.squeeze(0);
  return {grad_x, grad_w, grad_b};
}

}  // namespace FASTMNIST_VEC_NS
}  // namespace cpu

#if FASTMNIST_VEC_BYTES == 32
namespace {

std::tuple<at::Tensor, at::Tensor> conv_act_pool_by_path(const at::Tensor& x, const at::Tensor& weight,
                                                         const std::optional<at::Tensor>& bias, int64_t padding,
                                                         c10::string_view activation, bool save_act) {
#if FASTMNIST_HAVE_X86_PATHS
  if (cpu::cpu_path() == cpu::CpuPath::Avx512)
    return cpu::vec512::conv_act_pool_cpu(x, weight, bias, padding, activation, save_act);
#endif
  return cpu::vec256::conv_act_pool_cpu(x, weight, bias, padding, activation, save_act);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> conv_act_pool_backward_by_path(
    const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& weight, const at::Tensor& act_out,
    int64_t padding, c10::string_view activation, std::array<bool, 3> output_mask) {
#if FASTMNIST_HAVE_X86_PATHS
  if (cpu::cpu_path() == cpu::CpuPath::Avx512)
    return cpu::vec512::conv_act_pool_backward_cpu(grad_out, x, weight, act_out, padding, activation, output_mask);
#endif
  return cpu::vec256::conv_act_pool_backward_cpu(grad_out, x, weight, act_out, padding, activation, output_mask);
}

}  // namespace

TORCH_LIBRARY_IMPL(fastmnist, CPU, m) {
  m.impl("conv_act_pool", &conv_act_pool_by_path);
  m.impl("conv_act_pool_backward", &conv_act_pool_backward_by_path);
}
#endif

}  // namespace fastmnist
