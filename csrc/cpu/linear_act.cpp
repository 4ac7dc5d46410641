// Fused linear + activation on the CPU: out = act(x @ W^T + b).
//
// Forward. For few outputs (N <= small_n_limit(): a 10-class head, a 50-unit hidden layer) BLAS runs far below
// peak, so a register-blocked dot-product kernel computes a tile of x @ W^T and applies bias and activation
// before storing it. These small-output kernels (forward, grad_x, grad_W) are built twice, with 32-byte vectors
// here and with 64-byte vectors by cpu/avx512/linear_act.cpp (see cpu/simd.h), and picked per call by
// cpu_path(); everything else is built once, in the 32-byte build.
// Otherwise the GEMM goes through ATen (MKL) with the bias inside it (addmm, the call eager's nn.Linear makes, so
// the pre-activations are eager's to the bit; ~3% slower than a plain GEMM at 64x784x400), and one pass over each
// row block applies the activation while the block is in cache.
// Saved for backward: the output y only (plus the inputs x and W, which the GEMMs need); every activation's
// derivative is a function of y (see activation.h).
//
// Backward. One pass over grad_out computes g_z = grad_out * f'(y) and, in the same pass, the bias gradient
// (per-chunk partial sums over fixed row chunks, added in chunk order: deterministic for any thread count).
// Then grad_x = g_z @ W and grad_W = g_z^T @ x (our kernels for few outputs, else ATen), each only when
// requested.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "activation.h"
#include "cpu/activation_vec.h"
#include "cpu/linear_act.h"
#include "linear_act_args.h"

namespace fastmnist {
namespace {

using cpu::Vec;
using cpu::kWidth;

constexpr int64_t kRowChunk = 32;    // rows per chunk of the bias reduction (fixed: the sum order depends on it)
// Elements per task in the element-wise passes: a smaller pass runs on one thread, since a parallel region
// costs more than it saves (and a time slice when another process holds a core).
constexpr int64_t kMinTaskElements = 16384;

// y[r, :] = act(y[r, :]) in place for rows [r0, r1) of a (rows, n) row-major block, 4 vectors at a time (the
// activation's exps overlap, see vactivate_n).
template <typename T, Activation A>
struct ActRows {
  template <int U>
  static FASTMNIST_INLINE void vectors(T* row, int64_t j, T slope) {
    constexpr int W = kWidth<T>;
    Vec<T> z[U];
#pragma GCC unroll 16
    for (int u = 0; u < U; ++u) z[u] = cpu::load<T>(row + j + u * W);
    cpu::vactivate_n<A, T, U>(z, slope);
#pragma GCC unroll 16
    for (int u = 0; u < U; ++u) cpu::store(row + j + u * W, z[u]);
  }
  static FASTMNIST_INLINE void run(T* y, int64_t r0, int64_t r1, int64_t n, T slope) {
    constexpr int W = kWidth<T>;
    for (int64_t r = r0; r < r1; ++r) {
      T* row = y + r * n;
      int64_t j = 0;
      for (; j + 4 * W <= n; j += 4 * W) vectors<4>(row, j, slope);
      for (; j + W <= n; j += W) vectors<1>(row, j, slope);
      for (; j < n; ++j) row[j] = cpu::activate<A, T>(row[j], slope);
    }
  }
};

// Row r of a linear layer's input (m, k): x + r * k, or, for a batch gathered from a larger table by the fused
// step, table row index[r], read in place (no copy of the batch).
template <typename T>
struct DenseRows {
  const T* x;
  int64_t k;
  FASTMNIST_INLINE const T* operator()(int64_t r) const { return x + r * k; }
};
template <typename T>
struct GatheredRows {
  const T* table;
  const int64_t* index;
  int64_t k;
  FASTMNIST_INLINE const T* operator()(int64_t r) const { return table + index[r] * k; }
};

// Dot products of rows r..r+R-1 of x with C rows of W (all of length k), vectorised along k.
template <typename T, int R, int C, typename Rows>
FASTMNIST_INLINE void dot_tile(Rows x, int64_t r, const T* w, int64_t ldw, int64_t k, T out[R][C],
                               const T* const* ahead = nullptr, int ahead_rows = 0) {
  constexpr int W = kWidth<T>;
  const T* row[R];
  for (int i = 0; i < R; ++i) row[i] = x(r + i);
  Vec<T> acc[R][C] = {};
  int64_t p = 0;
  for (; p + W <= k; p += W) {
    Vec<T> xv[R];
    for (int i = 0; i < ahead_rows; ++i) __builtin_prefetch(ahead[i] + p);
    for (int i = 0; i < R; ++i) xv[i] = cpu::load<T>(row[i] + p);
    for (int c = 0; c < C; ++c) {
      Vec<T> wv = cpu::load<T>(w + c * ldw + p);
      for (int i = 0; i < R; ++i) acc[i][c] += xv[i] * wv;
    }
  }
  for (int i = 0; i < R; ++i) {
    for (int c = 0; c < C; ++c) {
      T s = cpu::reduce_add<T>(acc[i][c]);
      for (int64_t q = p; q < k; ++q) s += row[i][q] * w[c * ldw + q];
      out[i][c] = s;
    }
  }
}

// Rows [r0, r1) of y = act(x @ W^T + b) for n <= small_n_limit() outputs, in tiles of kRows rows x kOutputs
// outputs. A row block's rows of x stay in L1 while the W rows of its tiles stream from L2 (W is read once per
// row block), so the tile balances three limits: FMA rate, load ports and L2 bandwidth. With 32-byte vectors
// (16 registers) 4 x 3: 12 accumulators, 7 loads per 12 FMAs (a 1-output tile would be load-bound). With 64-byte
// vectors (32 registers) 6 x 4: 24 accumulators, 10 loads per 24 FMAs and a third less of W per FMA. On an Intel
// Xeon (AVX-512), medians in one process each: 256x784x10 (softmax regression's layer) 23.5 us on two threads
// with 6 x 4 against 29 with 4 x 3 (MKL: 61); 100x784x50 on one thread 76 against 90 (MKL: 66-73).
// The first tile of a row block prefetches the next block's rows, one line per line it loads: the rows of a
// gathered batch are scattered, so the hardware prefetcher cannot see them coming (softmax regression's fused
// step on fresh batches took ~12% less time with it, on the same Xeon).
template <typename T, Activation A>
struct SmallNLinearAct {
  static constexpr int kRows = FASTMNIST_VEC_BYTES == 64 ? 6 : 4;
  static constexpr int kOutputs = FASTMNIST_VEC_BYTES == 64 ? 4 : 3;

  template <int R, int C, typename Rows>
  static FASTMNIST_INLINE void tile(Rows x, const T* w, const T* bias, T* y, int64_t r, int64_t c, int64_t n,
                                    int64_t k, T slope, const T* const* ahead = nullptr, int ahead_rows = 0) {
    T out[R][C];
    dot_tile<T, R, C>(x, r, w + c * k, k, k, out, ahead, ahead_rows);
    for (int i = 0; i < R; ++i)
      for (int j = 0; j < C; ++j)
        y[(r + i) * n + c + j] = cpu::activate<A, T>(out[i][j] + (bias != nullptr ? bias[c + j] : T(0)), slope);
  }
  // the last count < kOutputs outputs, from c: one tile of C = count
  template <int R, int C = kOutputs - 1, typename Rows>
  static FASTMNIST_INLINE void last_tile(int64_t count, Rows x, const T* w, const T* bias, T* y, int64_t r,
                                         int64_t c, int64_t n, int64_t k, T slope) {
    if constexpr (C > 0) {
      if (count == C) return tile<R, C>(x, w, bias, y, r, c, n, k, slope);
      last_tile<R, C - 1>(count, x, w, bias, y, r, c, n, k, slope);
    }
  }
  template <int R, typename Rows>
  static FASTMNIST_INLINE void row_block(Rows x, const T* w, const T* bias, T* y, int64_t r, int64_t r1, int64_t n,
                                         int64_t k, T slope) {
    const T* ahead[kRows];
    const int ahead_rows = static_cast<int>(std::min<int64_t>(kRows, r1 - (r + R)));
    for (int i = 0; i < ahead_rows; ++i) ahead[i] = x(r + R + i);
    int64_t c = 0;
    if (c + kOutputs <= n) {
      tile<R, kOutputs>(x, w, bias, y, r, c, n, k, slope, ahead, ahead_rows);
      c += kOutputs;
    }
    for (; c + kOutputs <= n; c += kOutputs) tile<R, kOutputs>(x, w, bias, y, r, c, n, k, slope);
    last_tile<R>(n - c, x, w, bias, y, r, c, n, k, slope);
  }
  // rows [r0, r1): blocks of kRows, then of 4 (the 64-byte build), then single rows
  template <typename Rows>
  static FASTMNIST_INLINE void run(Rows x, const T* w, const T* bias, T* y, int64_t r0, int64_t r1, int64_t n,
                                   int64_t k, T slope) {
    int64_t r = r0;
    for (; r + kRows <= r1; r += kRows) row_block<kRows>(x, w, bias, y, r, r1, n, k, slope);
    if constexpr (kRows > 4) {
      for (; r + 4 <= r1; r += 4) row_block<4>(x, w, bias, y, r, r1, n, k, slope);
    }
    for (; r < r1; ++r) row_block<1>(x, w, bias, y, r, r1, n, k, slope);
  }
};

// g_z[r, :] = g[r, :] * f'(y[r, :]) for rows [r0, r1), and bias_partial[:] = sum over those rows of g_z.
// `gz` may alias `g` (then g is overwritten); `gz == nullptr` computes only the bias partial.
template <typename T, Activation A>
struct ActGradRows {
  static FASTMNIST_INLINE void run(const T* g, const T* y, T* gz, T* bias_partial, int64_t r0, int64_t r1,
                                   int64_t n, T slope) {
    constexpr int W = kWidth<T>;
    if (bias_partial != nullptr) std::fill(bias_partial, bias_partial + n, T(0));
    for (int64_t r = r0; r < r1; ++r) {
      int64_t j = 0;
      for (; j + W <= n; j += W) {
        Vec<T> v = cpu::load<T>(g + r * n + j) * cpu::vgrad_from_output<A, T>(cpu::load<T>(y + r * n + j), slope);
        if (gz != nullptr) cpu::store(gz + r * n + j, v);
        if (bias_partial != nullptr) cpu::store(bias_partial + j, cpu::load<T>(bias_partial + j) + v);
      }
      for (; j < n; ++j) {
        T v = g[r * n + j] * activation_grad_from_output<T>(A, y[r * n + j], slope);
        if (gz != nullptr) gz[r * n + j] = v;
        if (bias_partial != nullptr) bias_partial[j] += v;
      }
    }
  }
};

// grad_W (n, k) = g_z^T (n, m) @ x (m, k) for n <= small_n_limit() outputs, columns [j0, j1): whole vectors, then
// the columns past the last whole vector (j1 = k) by dot products.
// Per vector of columns, all n rows of grad_W are accumulated over the m rows of x in order (deterministic for any
// thread count): per row of x one vector load, n broadcasts of g_z and n multiply-adds into n accumulators in
// registers. The outputs go in passes of equal size (50 outputs with 32-byte vectors: 5 x 10, not 4 x 12 + 2,
// whose last pass would load x for 2 multiply-adds), all passes over one vector of columns before the next, so
// that the first pass brings the column's m lines into L1 for the others. That first pass prefetches the line
// kAhead rows ahead: the rows are scattered (a gathered batch) and half of them sit in the other core's cache
// (the forward splits the rows, this kernel the columns), and one line at a time each load waited its full latency.
template <typename T>
struct SmallNGradWeight {
  static constexpr int kMaxGroup = 12;  // outputs per pass: 12 accumulators + x + the broadcast in 16 registers
  static constexpr int64_t kAhead = 16;

  template <int N, bool Prefetch, typename Rows>
  static FASTMNIST_INLINE void vector(const T* g, Rows x, T* gw, int64_t m, int64_t n, int64_t k, int64_t c0,
                                      int64_t j) {
    Vec<T> acc[N] = {};
    for (int64_t r = 0; r < m; ++r) {
      if (Prefetch && r + kAhead < m) __builtin_prefetch(x(r + kAhead) + j);
      const Vec<T> xv = cpu::load<T>(x(r) + j);
      for (int c = 0; c < N; ++c) acc[c] += g[r * n + c0 + c] * xv;  // scalar * vector: one vbroadcastss
    }
    for (int c = 0; c < N; ++c) cpu::store<T>(gw + (c0 + c) * k + j, acc[c]);
  }

  // outputs c0 .. c0 + N - 1 at the whole vector of columns j (j + W <= j1) or at the tail columns [j, j1)
  template <int N, typename Rows>
  static FASTMNIST_INLINE void group(const T* g, Rows x, T* gw, int64_t m, int64_t n, int64_t k, int64_t c0,
                                     int64_t j, int64_t j1) {
    if (j + kWidth<T> <= j1) {
      if (c0 == 0) vector<N, true>(g, x, gw, m, n, k, c0, j);
      else vector<N, false>(g, x, gw, m, n, k, c0, j);
      return;
    }
    for (; j < j1; ++j) {
      for (int c = 0; c < N; ++c) {
        T s = 0;
        for (int64_t r = 0; r < m; ++r) s += g[r * n + c0 + c] * x(r)[j];
        gw[(c0 + c) * k + j] = s;
      }
    }
  }

  // calls group<N> for the N = count known at compile time
  template <int N = kMaxGroup, typename Rows>
  static FASTMNIST_INLINE void group_of(int64_t count, const T* g, Rows x, T* gw, int64_t m, int64_t n,
                                        int64_t k, int64_t c0, int64_t j, int64_t j1) {
    if constexpr (N > 0) {
      if (count == N) return group<N, Rows>(g, x, gw, m, n, k, c0, j, j1);
      group_of<N - 1, Rows>(count, g, x, gw, m, n, k, c0, j, j1);
    }
  }

  template <typename Rows>
  static FASTMNIST_INLINE void run(const T* g, Rows x, T* gw, int64_t m, int64_t n, int64_t k, int64_t j0,
                                   int64_t j1) {
    constexpr int W = kWidth<T>;
    const int64_t groups = (n + kMaxGroup - 1) / kMaxGroup, size = (n + groups - 1) / groups;
    for (int64_t j = j0; j < j1; j += W) {  // the last step covers the tail columns, if any
      for (int64_t c0 = 0; c0 < n; c0 += size) group_of(std::min<int64_t>(size, n - c0), g, x, gw, m, n, k, c0, j, j1);
    }
  }
};

// grad_x (m, k) = g_z (m, n) @ W (n, k) for n <= small_n_limit() outputs, rows [r0, r1): tiles of 4 rows x 3
// vectors of columns, each summing its n terms g_z[r, c] * W[c, columns] in registers, c in order (12
// accumulators, 3 vector loads of W and 4 broadcasts of g_z per 12 multiply-adds). MKL takes ~10 us for a
// product this small (100x10 @ 10x50: 0.1 MFLOP), this kernel ~4.
template <typename T>
struct SmallNGradInput {
  template <int R, int C>
  static FASTMNIST_INLINE void tile(const T* g, const T* w, T* gx, int64_t r, int64_t j, int64_t n, int64_t k) {
    constexpr int W = kWidth<T>;
    Vec<T> acc[R][C] = {};
    for (int64_t c = 0; c < n; ++c) {
      Vec<T> wv[C];
      for (int v = 0; v < C; ++v) wv[v] = cpu::load<T>(w + c * k + j + v * W);
      for (int i = 0; i < R; ++i)
        for (int v = 0; v < C; ++v) acc[i][v] += wv[v] * g[(r + i) * n + c];  // one vbroadcastss per g
    }
    for (int i = 0; i < R; ++i)
      for (int v = 0; v < C; ++v) cpu::store<T>(gx + (r + i) * k + j + v * W, acc[i][v]);
  }
  template <int R>
  static FASTMNIST_INLINE void row_block(const T* g, const T* w, T* gx, int64_t r, int64_t n, int64_t k) {
    constexpr int W = kWidth<T>;
    int64_t j = 0;
    for (; j + 3 * W <= k; j += 3 * W) tile<R, 3>(g, w, gx, r, j, n, k);
    for (; j + W <= k; j += W) tile<R, 1>(g, w, gx, r, j, n, k);
    for (int i = 0; i < R; ++i) {
      for (int64_t q = j; q < k; ++q) {
        T s = 0;
        for (int64_t c = 0; c < n; ++c) s += g[(r + i) * n + c] * w[c * k + q];
        gx[(r + i) * k + q] = s;
      }
    }
  }
  static FASTMNIST_INLINE void run(const T* g, const T* w, T* gx, int64_t r0, int64_t r1, int64_t n, int64_t k) {
    int64_t r = r0;
    for (; r + 4 <= r1; r += 4) row_block<4>(g, w, gx, r, n, k);
    for (; r < r1; ++r) row_block<1>(g, w, gx, r, n, k);
  }
};

// Calls f(rows) with the row accessor of x (rows of length k), or of x's rows index[r] when index is not null.
template <typename T, typename F>
void with_rows(const T* x, const int64_t* index, int64_t k, F f) {
  if (index != nullptr) return f(GatheredRows<T>{x, index, k});
  f(DenseRows<T>{x, k});
}

}  // namespace

// The small-output kernels at this build's vector width, each over all rows in parallel (~64k multiply-adds per
// task); linear_act_forward_into and the gradients (below) pick a width per call (FASTMNIST_AT_WIDTH).
namespace cpu {
inline namespace FASTMNIST_VEC_NS {

// The same kernels on rows [r0, r1) only, on the calling thread (for callers that split the rows themselves).
template <typename T>
void small_n_forward_rows_at_width(const T* x, const int64_t* index, const T* w, const T* bias, T* y, int64_t r0,
                                   int64_t r1, int64_t n, int64_t k, Activation act, T slope) {
  with_activation(act, [&](auto a) {
    with_rows(x, index, k, [&](auto rows) {
      run_kernel<SmallNLinearAct<T, decltype(a)::value>>(rows, w, bias, y, r0, r1, n, k, slope);
    });
  });
}

template <typename T>
void small_n_grad_weight_rows_at_width(const T* g, const T* x, const int64_t* index, T* gw, int64_t r0, int64_t r1,
                                       int64_t n, int64_t k) {
  // rows r0.. of x seen as rows 0..
  with_rows(index != nullptr ? x : x + r0 * k, index != nullptr ? index + r0 : nullptr, k, [&](auto rows) {
    run_kernel<SmallNGradWeight<T>>(g + r0 * n, rows, gw, r1 - r0, n, k, int64_t{0}, k);
  });
}

template <typename T>
void small_n_forward_at_width(const T* x, const int64_t* index, const T* w, const T* bias, T* y, int64_t m,
                              int64_t n, int64_t k, Activation act, T slope) {
  // split in whole row blocks: a task's last rows otherwise go one at a time, each re-reading all of W
  constexpr int64_t kBlock = SmallNLinearAct<T, Activation::Identity>::kRows;
  const int64_t blocks = (m + kBlock - 1) / kBlock;
  const int64_t grain = std::max<int64_t>(1, 65536 / std::max<int64_t>(1, n * k * kBlock));
  at::parallel_for(0, blocks, grain, [&](int64_t b0, int64_t b1) {
    small_n_forward_rows_at_width<T>(x, index, w, bias, y, b0 * kBlock, std::min(m, b1 * kBlock), n, k, act, slope);
  });
}

template <typename T>
void small_n_grad_weight_at_width(const T* g, const T* x, const int64_t* index, T* gw, int64_t m, int64_t n,
                                  int64_t k) {
  constexpr int W = kWidth<T>;
  const int64_t vectors = (k + W - 1) / W;  // the last one may be partial
  const int64_t grain = std::max<int64_t>(1, 65536 / std::max<int64_t>(1, m * n * W));
  with_rows(x, index, k, [&](auto rows) {
    at::parallel_for(0, vectors, grain, [&](int64_t v0, int64_t v1) {
      run_kernel<SmallNGradWeight<T>>(g, rows, gw, m, n, k, v0 * W, std::min(v1 * W, k));
    });
  });
}

template <typename T>
void small_n_grad_input_at_width(const T* g, const T* w, T* gx, int64_t m, int64_t n, int64_t k) {
  const int64_t grain = std::max<int64_t>(4, 65536 / std::max<int64_t>(1, n * k) / 4 * 4);  // whole 4-row tiles
  at::parallel_for(0, m, grain, [&](int64_t r0, int64_t r1) {
    run_kernel<SmallNGradInput<T>>(g, w, gx, r0, r1, n, k);
  });
}

#define FASTMNIST_INSTANTIATE(T)                                                                                  \
  template void small_n_forward_at_width<T>(const T*, const int64_t*, const T*, const T*, T*, int64_t, int64_t, \
                                            int64_t, Activation, T);                                            \
  template void small_n_grad_weight_at_width<T>(const T*, const T*, const int64_t*, T*, int64_t, int64_t,        \
                                                int64_t);                                                       \
  template void small_n_grad_input_at_width<T>(const T*, const T*, T*, int64_t, int64_t, int64_t);              \
  template void small_n_forward_rows_at_width<T>(const T*, const int64_t*, const T*, const T*, T*, int64_t,      \
                                                 int64_t, int64_t, int64_t, Activation, T);                     \
  template void small_n_grad_weight_rows_at_width<T>(const T*, const T*, const int64_t*, T*, int64_t, int64_t,   \
                                                     int64_t, int64_t);
FASTMNIST_INSTANTIATE(float)
FASTMNIST_INSTANTIATE(double)
#undef FASTMNIST_INSTANTIATE

}  // namespace FASTMNIST_VEC_NS
}  // namespace cpu

// Everything below is built once, in the 32-byte build.
#if FASTMNIST_VEC_BYTES == 32

#if FASTMNIST_HAVE_X86_PATHS
namespace cpu::vec512 {  // cpu/avx512/linear_act.cpp
template <typename T>
void small_n_forward_at_width(const T* x, const int64_t* index, const T* w, const T* bias, T* y, int64_t m,
                              int64_t n, int64_t k, Activation act, T slope);
template <typename T>
void small_n_grad_weight_at_width(const T* g, const T* x, const int64_t* index, T* gw, int64_t m, int64_t n,
                                  int64_t k);
template <typename T>
void small_n_grad_input_at_width(const T* g, const T* w, T* gx, int64_t m, int64_t n, int64_t k);
template <typename T>
void small_n_forward_rows_at_width(const T* x, const int64_t* index, const T* w, const T* bias, T* y, int64_t r0,
                                   int64_t r1, int64_t n, int64_t k, Activation act, T slope);
template <typename T>
void small_n_grad_weight_rows_at_width(const T* g, const T* x, const int64_t* index, T* gw, int64_t r0, int64_t r1,
                                       int64_t n, int64_t k);
}  // namespace cpu::vec512
#define FASTMNIST_AT_WIDTH(fn, ...)                                                                                \
  (cpu::cpu_path() == cpu::CpuPath::Avx512 ? cpu::vec512::fn(__VA_ARGS__) : cpu::vec256::fn(__VA_ARGS__))
#else
#define FASTMNIST_AT_WIDTH(fn, ...) cpu::vec256::fn(__VA_ARGS__)
#endif

namespace {

// At most this many outputs: our own kernels (above) rather than BLAS. Measured on a Zen 2 (AVX2), two
// threads: at 100x784x50 (forward / weight gradient) they take 72 / 72 us against MKL's 91 / 88-138, at
// 256x784x10 49 / 54 against 95 / 84, still 200 / 239 against 215 / 284 at 256x784x64, and MKL catches up
// past 64 outputs (256x200x100: 137 / 112 against 106 / 105). Where MKL has AVX-512 it is as fast past the
// 10-class heads: on an Intel Xeon (AVX-512), one thread, the 64-byte kernels take 76 / 52 us at 100x784x50
// against MKL's 66-73 / 44-47, and the two-layer net's step 154-158 us with them against 156-162 with MKL
// (at 890668b); the softmax epoch 89 ms with the 64-byte kernels, 99 with the 32-byte ones, 94 with MKL (778b5d3).
int64_t small_n_limit() { return cpu::cpu_path() == cpu::CpuPath::Avx512 ? 16 : 64; }

const int64_t* index_ptr(const at::Tensor& row_index) {
  return row_index.defined() ? row_index.const_data_ptr<int64_t>() : nullptr;
}

}  // namespace

bool linear_small_output(int64_t out_features) { return out_features <= small_n_limit(); }

template <typename T>
void linear_forward_rows(const T* x, const int64_t* row_index, const T* w, const T* bias, T* y, int64_t r0,
                         int64_t r1, int64_t n, int64_t k, Activation act, T negative_slope) {
  TORCH_INTERNAL_ASSERT(linear_small_output(n), "linear_forward_rows: only for the small-output kernels");
  FASTMNIST_AT_WIDTH(small_n_forward_rows_at_width<T>, x, row_index, w, bias, y, r0, r1, n, k, act, negative_slope);
}

template <typename T>
void linear_grad_weight_rows(const T* gz, const T* x, const int64_t* row_index, T* grad_w, int64_t r0, int64_t r1,
                             int64_t n, int64_t k) {
  TORCH_INTERNAL_ASSERT(linear_small_output(n), "linear_grad_weight_rows: only for the small-output kernels");
  FASTMNIST_AT_WIDTH(small_n_grad_weight_rows_at_width<T>, gz, x, row_index, grad_w, r0, r1, n, k);
}

#define FASTMNIST_INSTANTIATE(T)                                                                                  \
  template void linear_forward_rows<T>(const T*, const int64_t*, const T*, const T*, T*, int64_t, int64_t,      \
                                       int64_t, int64_t, Activation, T);                                        \
  template void linear_grad_weight_rows<T>(const T*, const T*, const int64_t*, T*, int64_t, int64_t, int64_t,   \
                                           int64_t);
FASTMNIST_INSTANTIATE(float)
FASTMNIST_INSTANTIATE(double)
#undef FASTMNIST_INSTANTIATE

namespace {

void check_gather(const at::Tensor& row_index, int64_t n) {
  TORCH_INTERNAL_ASSERT(!row_index.defined() || linear_small_output(n),
                        "linear_act: a gathered input needs the small-output kernels");
}

}  // namespace

void linear_grad_weight_into(at::Tensor& grad_w, const at::Tensor& gz, const at::Tensor& x2d,
                             const at::Tensor& row_index) {
  const int64_t m = gz.size(0), k = x2d.size(1), n = gz.size(1);
  check_gather(row_index, n);
  if (n > small_n_limit()) {
    at::mm_out(grad_w, gz.t(), x2d);
    return;
  }
  AT_DISPATCH_FLOATING_TYPES(x2d.scalar_type(), "linear_grad_weight_cpu", [&] {
    FASTMNIST_AT_WIDTH(small_n_grad_weight_at_width<scalar_t>, gz.const_data_ptr<scalar_t>(),
                       x2d.const_data_ptr<scalar_t>(), index_ptr(row_index), grad_w.mutable_data_ptr<scalar_t>(),
                       m, n, k);
  });
}

bool linear_sgd_weight_update(const at::Tensor& w, const at::Tensor& gz, const at::Tensor& x2d, double lr) {
  if (gz.size(1) <= small_n_limit()) return false;
  w.addmm_(gz.t(), x2d, /*beta=*/1, /*alpha=*/-lr);
  return true;
}

void linear_grad_input_into(at::Tensor& grad_x, const at::Tensor& gz, const at::Tensor& w) {
  const int64_t m = gz.size(0), n = gz.size(1), k = w.size(1);
  if (n > small_n_limit()) {
    at::mm_out(grad_x, gz, w);
    return;
  }
  AT_DISPATCH_FLOATING_TYPES(w.scalar_type(), "linear_grad_input_cpu", [&] {
    FASTMNIST_AT_WIDTH(small_n_grad_input_at_width<scalar_t>, gz.const_data_ptr<scalar_t>(),
                       w.const_data_ptr<scalar_t>(), grad_x.mutable_data_ptr<scalar_t>(), m, n, k);
  });
}

void linear_act_forward_into(at::Tensor& y, const at::Tensor& x2d, const at::Tensor& w, const at::Tensor& b,
                             Activation act, double negative_slope, const at::Tensor& row_index) {
  const int64_t m = y.size(0), k = x2d.size(1), n = w.size(0);
  check_gather(row_index, n);
  const bool has_bias = b.defined();
  AT_DISPATCH_FLOATING_TYPES(x2d.scalar_type(), "linear_act_cpu", [&] {
    const scalar_t slope = static_cast<scalar_t>(negative_slope);
    scalar_t* y_ptr = y.mutable_data_ptr<scalar_t>();
    if (n <= small_n_limit()) {
      FASTMNIST_AT_WIDTH(small_n_forward_at_width<scalar_t>, x2d.const_data_ptr<scalar_t>(), index_ptr(row_index),
                         w.const_data_ptr<scalar_t>(), has_bias ? b.const_data_ptr<scalar_t>() : nullptr, y_ptr, m,
                         n, k, act, slope);
      return;
    }
    // addmm: eager's rounding, so that a pre-activation within rounding of ReLU's kink falls on eager's side
    if (has_bias) at::addmm_out(y, b, x2d, w.t());
    else at::mm_out(y, x2d, w.t());
    if (act == Activation::Identity) return;
    cpu::with_activation(act, [&](auto a) {
      constexpr Activation A = decltype(a)::value;
      at::parallel_for(0, m, std::max(kRowChunk, kMinTaskElements / n), [&](int64_t r0, int64_t r1) {
        cpu::run_kernel<ActRows<scalar_t, A>>(y_ptr, r0, r1, n, slope);
      });
    });
  });
}

void linear_act_grad_pre_into(at::Tensor& gz, at::Tensor& grad_bias, const at::Tensor& g, const at::Tensor& y,
                              Activation act, double negative_slope) {
  const int64_t m = y.size(0), n = y.size(1);
  const bool write_gz = gz.defined() && act != Activation::Identity;
  const bool need_bias = grad_bias.defined();
  if (!write_gz && !need_bias) return;
  const int64_t chunks = (m + kRowChunk - 1) / kRowChunk;
  at::Tensor partials = need_bias ? at::empty({chunks, n}, y.options()) : at::Tensor();
  AT_DISPATCH_FLOATING_TYPES(y.scalar_type(), "linear_act_backward_cpu", [&] {
    const scalar_t slope = static_cast<scalar_t>(negative_slope);
    const scalar_t* g_ptr = g.const_data_ptr<scalar_t>();
    const scalar_t* y_ptr = y.const_data_ptr<scalar_t>();
    scalar_t* gz_ptr = write_gz ? gz.mutable_data_ptr<scalar_t>() : nullptr;
    scalar_t* partial_ptr = need_bias ? partials.mutable_data_ptr<scalar_t>() : nullptr;
    cpu::with_activation(act, [&](auto a) {
      constexpr Activation A = decltype(a)::value;
      const int64_t chunks_per_task = std::max<int64_t>(1, kMinTaskElements / (kRowChunk * n));
      at::parallel_for(0, chunks, chunks_per_task, [&](int64_t c0, int64_t c1) {
        for (int64_t c = c0; c < c1; ++c) {
          cpu::run_kernel<ActGradRows<scalar_t, A>>(g_ptr, y_ptr, gz_ptr, partial_ptr ? partial_ptr + c * n : nullptr,
                                                    c * kRowChunk, std::min(m, (c + 1) * kRowChunk), n, slope);
        }
      });
    });
    if (need_bias) {
      // chunk partials added in chunk order
      scalar_t* gb = grad_bias.mutable_data_ptr<scalar_t>();
      std::fill(gb, gb + n, scalar_t(0));
      for (int64_t c = 0; c < chunks; ++c)
        for (int64_t j = 0; j < n; ++j) gb[j] += partial_ptr[c * n + j];
    }
  });
}

namespace {

at::Tensor linear_act_cpu(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                          c10::string_view activation, double negative_slope) {
  const LinearActForwardArgs args =
      check_linear_act_args("linear_act", check_float_tensor, x, weight, bias, activation, negative_slope);
  at::Tensor y = at::empty({args.x2d.size(0), args.n}, x.options());
  linear_act_forward_into(y, args.x2d, weight.contiguous(), args.bias, args.act, negative_slope);
  return y.view(args.out_shape);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> linear_act_backward_cpu(
    const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& weight, const at::Tensor& out,
    c10::string_view activation, double negative_slope, std::array<bool, 3> output_mask) {
  const LinearActBackwardArgs args = check_linear_act_backward_args(
      "linear_act_backward", check_float_tensor, grad_out, x, weight, out, activation, negative_slope);
  const bool need_input_grads = output_mask[0] || output_mask[1];
  const bool need_bias = output_mask[2];

  // g_z = g * f'(y); for the identity, g_z is g itself.
  at::Tensor gz =
      args.act == Activation::Identity ? args.g : (need_input_grads ? at::empty_like(args.g) : at::Tensor());
  at::Tensor grad_bias = need_bias ? at::empty({args.n}, x.options()) : at::Tensor();
  linear_act_grad_pre_into(gz, grad_bias, args.g, args.y, args.act, negative_slope);
  if (!need_bias) grad_bias = at::empty({0}, x.options());
  at::Tensor grad_x = at::empty({0}, x.options());
  at::Tensor grad_w = at::empty({0}, x.options());
  if (output_mask[0]) {
    grad_x = at::empty({args.g.size(0), weight.size(1)}, x.options());
    linear_grad_input_into(grad_x, gz.contiguous(), weight.contiguous());
    grad_x = grad_x.view(x.sizes());
  }
  if (output_mask[1]) {
    grad_w = at::empty_like(weight, at::MemoryFormat::Contiguous);
    linear_grad_weight_into(grad_w, gz.contiguous(), x.reshape({-1, weight.size(1)}).contiguous());
  }
  return {grad_x, grad_w, grad_bias};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastmnist, CPU, m) {
  m.impl("linear_act", &linear_act_cpu);
  m.impl("linear_act_backward", &linear_act_backward_cpu);
}

#undef FASTMNIST_AT_WIDTH
#endif  // FASTMNIST_VEC_BYTES == 32

}  // namespace fastmnist
