// The classifier head of linear_cross_entropy in chunks of rows, written once for the CPU op
// (cpu/cross_entropy.cpp) and the CUDA op (cuda/cross_entropy.cu), forward and backward. Per chunk of x rows:
// logits = x W^T + b into one reused chunk-sized buffer (an ATen GEMM on the op's device), the device's row kernel
// on them (loss and/or the logit gradient G, in place), then the chunk's gradient GEMMs: grad_x rows = G W,
// grad_W += G^T x, grad_b += the column sums of G. The (N, C) logits never exist. Host code only: g++ and nvcc
// both compile it.
#pragma once

#include <ATen/ATen.h>

#include <algorithm>
#include <array>

#include "cross_entropy_args.h"

namespace fastmnist {

// The gradients the head computes, by mask (the bias's only when the op has a bias): grad_x (N, features),
// written chunk by chunk; grad_W and grad_b zeroed, the chunks add to them. Empty tensors where not asked.
struct LinearCEGrads {
  std::array<bool, 3> mask;
  at::Tensor x, w, b;
};

inline LinearCEGrads make_linear_ce_grads(const LinearCEArgs& a, const at::Tensor& x, const at::Tensor& weight,
                                          std::array<bool, 3> wanted) {
  LinearCEGrads g{{wanted[0], wanted[1], wanted[2] && a.b.defined()}, {}, {}, {}};
  const auto opts = x.options();
  g.x = g.mask[0] ? at::empty({a.N, x.size(1)}, opts) : at::empty({0}, opts);
  g.w = g.mask[1] ? at::zeros_like(a.w) : at::empty({0}, opts);
  g.b = g.mask[2] ? at::zeros({weight.size(0)}, opts) : at::empty({0}, opts);
  return g;
}

// Rows of x per chunk: a logits buffer of about chunk_bytes, but at least min_rows rows (a GEMM of fewer rows runs
// far below peak) and at most all of them.
inline int64_t linear_ce_chunk_rows(const LinearCEArgs& a, int64_t element_size, int64_t chunk_bytes,
                                    int64_t min_rows) {
  const int64_t width_bytes = std::max<int64_t>(1, a.D * a.C * element_size);
  return std::min(std::max(chunk_bytes / width_bytes, min_rows), std::max<int64_t>(a.N, 1));
}

// p: the row kernel's parameters for all N * D rows (the CPU's CERows or the CUDA CEParams: the same pointer
// fields), advanced here to each chunk's rows; run_rows(p, rows) runs the row kernel on `rows` rows. With `grads`
// the kernel writes G into the logits buffer (gscale, when not null, read per row with gscale_stride) and the
// masked gradients follow.
template <typename T, typename Params, typename RunRows>
void linear_ce_chunks(const LinearCEArgs& a, const Params& p, bool grads, int64_t chunk, LinearCEGrads& g,
                      RunRows run_rows) {
  at::Tensor buf = at::empty({chunk, a.D * a.C}, a.x.options());
  const at::Tensor wt = a.w.t();
  for (int64_t n0 = 0; n0 < a.N; n0 += chunk) {
    const int64_t len = std::min(chunk, a.N - n0);
    const int64_t r0 = n0 * a.D;  // the chunk's first logit row
    at::Tensor logits = buf.narrow(0, 0, len);
    const at::Tensor xc = a.x.narrow(0, n0, len);
    if (a.b.defined()) {
      at::addmm_out(logits, a.b, xc, wt);
    } else {
      at::mm_out(logits, xc, wt);
    }
    Params c = p;
    c.x = logits.template const_data_ptr<T>();
    if (c.y != nullptr) c.y += r0;
    if (c.q != nullptr) c.q += r0 * a.C;
    c.lse += r0;
    if (c.loss != nullptr) c.loss += r0;
    if (grads) c.grad = logits.template mutable_data_ptr<T>();
    if (grads && c.gscale != nullptr) c.gscale += r0 * c.gscale_stride;
    run_rows(c, len * a.D);
    if (!grads) continue;
    if (g.mask[0]) {
      at::Tensor gx = g.x.narrow(0, n0, len);
      at::mm_out(gx, logits, a.w);
    }
    if (g.mask[1]) g.w.addmm_(logits.t(), xc);
    if (g.mask[2]) g.b.add_(logits.sum(0));
  }
}

}  // namespace fastmnist
