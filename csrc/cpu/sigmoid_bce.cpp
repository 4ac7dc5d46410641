// Sigmoid followed by binary cross-entropy, fused, on the CPU (F.binary_cross_entropy_with_logits).
//
// With y the target, w the weight and pw the positive-class weight (1 when absent), and lw = 1 + (pw - 1) y:
//   loss = w ((1 - y) x + lw softplus(-x)),  softplus(z) = max(z, 0) + log1p(exp(-|z|))   (finite for all x)
//   dloss/dx = w (lw sigmoid(x) - pw y),     dloss/dy = w (pw - 1) softplus(-x) - w x
// Logits and targets come as (rows, C) row-major; weight and pos_weight as (C,) (broadcast over the rows) or
// (rows, C). Forward is one pass (the reduced losses sum per row, then the rows in order: deterministic);
// nothing is saved for backward but the inputs, and backward is one pass that writes each gradient once.
// Without a per-class (C,) weight or pos_weight the loss is elementwise, and the kernel sees the data as rows of
// kFlatRow elements instead (the last one shorter): a short row (10 classes) would otherwise end in a partial
// vector every few elements.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "cpu/loss_vec.h"
#include "cpu/sigmoid_bce.h"
#include "sigmoid_bce_args.h"

namespace fastmnist {
namespace {

using cpu::BCERows;
using cpu::kWidth;
using cpu::Vec;

constexpr int64_t kFlatRow = 256;

template <typename T>
struct SigmoidBCERows {
  static FASTMNIST_INLINE void run(BCERows<T> p, int64_t r0, int64_t r1) {
    constexpr int W = kWidth<T>;
    const int64_t C = p.C;
    const bool forward = p.loss != nullptr || p.row_sum != nullptr;
    for (int64_t r = r0; r < r1; ++r) {
      const T* x = p.x + r * C;
      const T* y = p.y + r * C;
      const T* w = p.w != nullptr ? p.w + r * p.w_ld : nullptr;
      const T* pw = p.pw != nullptr ? p.pw + r * p.pw_ld : nullptr;
      const int64_t len = std::min<int64_t>(C, p.total - r * C);
      Vec<T> acc = cpu::broadcast<T>(T(0));
      for (int64_t j = 0; j < len; j += W) {
        const int64_t n = std::min<int64_t>(W, len - j);
        const Vec<T> xv = cpu::load_n<T>(x + j, n, T(0));
        const Vec<T> yv = cpu::load_n<T>(y + j, n, T(0));
        const Vec<T> wv = w != nullptr ? cpu::load_n<T>(w + j, n, T(0)) : cpu::broadcast<T>(T(1));
        const Vec<T> pwv = pw != nullptr ? cpu::load_n<T>(pw + j, n, T(1)) : cpu::broadcast<T>(T(1));
        const Vec<T> lw = T(1) + (pwv - T(1)) * yv;
        if (forward) {
          const Vec<T> sp = cpu::vsoftplus<T>(-xv);  // softplus(-x) = -log sigmoid(x)
          Vec<T> l = ((T(1) - yv) * xv + lw * sp) * wv;
          if (p.loss != nullptr) cpu::store_n<T>(p.loss + r * C + j, l, n);
          if (p.row_sum != nullptr) acc += n == W ? l : cpu::select<T>(cpu::lane_mask<T>(n), l, cpu::broadcast<T>(T(0)));
        } else {
          const Vec<T> s = (p.g_ld != 0 ? cpu::load_n<T>(p.g + r * C + j, n, T(0)) : cpu::broadcast<T>(p.g[0])) *
                           p.gmul * wv;
          if (p.grad_x != nullptr) {
            cpu::store_n<T>(p.grad_x + r * C + j, s * (lw * cpu::vsigmoid0<T>(xv) - pwv * yv), n);
          }
          if (p.grad_y != nullptr) {
            cpu::store_n<T>(p.grad_y + r * C + j, s * ((pwv - T(1)) * cpu::vsoftplus<T>(-xv) - xv), n);
          }
        }
      }
      if (p.row_sum != nullptr) p.row_sum[r] = double(cpu::hsum<T>(acc));
    }
  }
};

// The kernel's rows: the caller's (rows, C), or flat rows of kFlatRow elements when nothing is per class.
template <typename T>
BCERows<T> make_bce_rows(const SigmoidBCEArgs& a, int64_t* rows) {
  const bool flat = (!a.w.defined() || a.w_full) && (!a.pw.defined() || a.pw_full);
  BCERows<T> p{};
  p.total = a.rows * a.C;
  p.C = flat ? kFlatRow : a.C;
  *rows = p.C == 0 ? a.rows : (p.total + p.C - 1) / p.C;
  p.x = a.x.const_data_ptr<T>();
  p.y = a.y.const_data_ptr<T>();
  p.w = a.w.defined() ? a.w.const_data_ptr<T>() : nullptr;
  p.w_ld = a.w_full ? p.C : 0;
  p.pw = a.pw.defined() ? a.pw.const_data_ptr<T>() : nullptr;
  p.pw_ld = a.pw_full ? p.C : 0;
  return p;
}

}  // namespace

namespace cpu {

template <typename T>
void sigmoid_bce_rows(const BCERows<T>& p, int64_t rows) {
  // about 8k elements per task: each costs an exp and a division or two
  const int64_t grain = std::max<int64_t>(1, 8192 / std::max<int64_t>(p.C, 1));
  at::parallel_for(0, rows, grain, [&](int64_t r0, int64_t r1) {
    run_kernel<SigmoidBCERows<T>>(p, r0, r1);
  });
}

template void sigmoid_bce_rows<float>(const BCERows<float>&, int64_t);
template void sigmoid_bce_rows<double>(const BCERows<double>&, int64_t);

}  // namespace cpu

namespace {

at::Tensor sigmoid_bce_cpu(const at::Tensor& logits, const at::Tensor& target, const std::optional<at::Tensor>& weight,
                           const std::optional<at::Tensor>& pos_weight, int64_t reduction) {
  const SigmoidBCEArgs a =
      check_sigmoid_bce_args("sigmoid_bce", check_float_tensor, logits, target, weight, pos_weight, reduction);
  at::Tensor out;
  AT_DISPATCH_FLOATING_TYPES(logits.scalar_type(), "sigmoid_bce_cpu", [&] {
    int64_t rows;
    BCERows<scalar_t> p = make_bce_rows<scalar_t>(a, &rows);
    if (reduction == kNone) {
      out = at::empty({a.rows, a.C}, logits.options());
      p.loss = out.mutable_data_ptr<scalar_t>();
      cpu::sigmoid_bce_rows<scalar_t>(p, rows);
      return;
    }
    at::Tensor sums = at::empty({rows}, logits.options().dtype(at::kDouble));
    p.row_sum = sums.mutable_data_ptr<double>();
    cpu::sigmoid_bce_rows<scalar_t>(p, rows);
    double total = 0;
    for (int64_t r = 0; r < rows; ++r) total += p.row_sum[r];
    if (reduction == kMean) total /= double(a.rows * a.C);
    out = at::scalar_tensor(total, logits.options());
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> sigmoid_bce_backward_cpu(const at::Tensor& grad_loss, const at::Tensor& logits,
                                                            const at::Tensor& target,
                                                            const std::optional<at::Tensor>& weight,
                                                            const std::optional<at::Tensor>& pos_weight,
                                                            int64_t reduction, std::array<bool, 2> output_mask) {
  constexpr const char* op = "sigmoid_bce_backward";
  const SigmoidBCEArgs a =
      check_sigmoid_bce_args(op, check_float_tensor, logits, target, weight, pos_weight, reduction);
  check_sigmoid_bce_grad_loss(op, grad_loss, logits, reduction);
  const auto opts = logits.options();
  at::Tensor grad_x = output_mask[0] ? at::empty({a.rows, a.C}, opts) : at::empty({0}, opts);
  at::Tensor grad_y = output_mask[1] ? at::empty({a.rows, a.C}, opts) : at::empty({0}, opts);
  if (!output_mask[0] && !output_mask[1]) return {grad_x, grad_y};
  const at::Tensor g = grad_loss.contiguous();
  AT_DISPATCH_FLOATING_TYPES(logits.scalar_type(), "sigmoid_bce_backward_cpu", [&] {
    int64_t rows;
    BCERows<scalar_t> p = make_bce_rows<scalar_t>(a, &rows);
    p.g = g.const_data_ptr<scalar_t>();
    p.g_ld = reduction == kNone ? p.C : 0;
    p.gmul = reduction == kMean ? scalar_t(1.0 / double(a.rows * a.C)) : scalar_t(1);
    p.grad_x = output_mask[0] ? grad_x.mutable_data_ptr<scalar_t>() : nullptr;
    p.grad_y = output_mask[1] ? grad_y.mutable_data_ptr<scalar_t>() : nullptr;
    cpu::sigmoid_bce_rows<scalar_t>(p, rows);
  });
  return {grad_x, grad_y};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastmnist, CPU, m) {
  m.impl("sigmoid_bce", &sigmoid_bce_cpu);
  m.impl("sigmoid_bce_backward", &sigmoid_bce_backward_cpu);
}

}  // namespace fastmnist
