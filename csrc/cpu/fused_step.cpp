// The fused training step: forward, loss, backward and optimizer update of a small sequential model in one
// call, with no autograd engine and no per-step allocation.
//
// A FusedStep object (a TorchScript custom class, built by fastmnist/fused_step.py from a model, a loss and an
// optimizer) holds the layer list, aliases of the model's parameter tensors (updated in place) and of the
// optimizer's state tensors (torch.optim's own format, so fused and eager steps can be mixed). Activations and
// gradients live in a workspace allocated once per batch size and reused.
//
// Per step:
//   forward   a_i = layer_i(a_{i-1}), each layer writing into its workspace buffer (a flatten is a view); the
//             outputs are what backward needs (linear: the output gives the activation derivative; layer norm
//             also keeps the per-row mean and 1/std; the LeNet block keeps its pre-pooling activation, and
//             allocates its outputs per call, as its op does)
//   loss      value and d loss / d logits, by the loss ops' own row kernels (cross-entropy, BCE); cross-entropy
//             on a last linear layer with few outputs and no activation (every tutorial model's head but the
//             classifier's) runs with that layer's forward and weight gradient in one pass over row chunks
//             (head_forward_backward)
//   backward  from the last layer to the first: the gradient w.r.t. the layer input is computed (only when an
//             earlier layer has parameters) BEFORE that layer's parameters are updated, then the parameter
//             gradients and the optimizer update follow in one pass per parameter (plain SGD on a layer whose
//             weight gradient goes through BLAS: the update is that GEMM itself, W += -lr * g^T x with beta = 1)
// The update formulas are torch.optim's (SGD with momentum/dampening/nesterov/weight decay; Adam and AdamW),
// evaluated in the same order, so the numbers match an eager step to rounding.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/custom_class.h>
#include <torch/library.h>

#include <cmath>
#include <cstring>
#include <map>

#include "activation.h"
#include "checks.h"
#include "cpu/cross_entropy.h"
#include "cpu/fused_step.h"
#include "cpu/linear_act.h"
#include "cpu/optimizer_update.h"
#include "cpu/sigmoid_bce.h"

namespace fastmnist {
namespace {

enum class LayerKind { Linear, Flatten, LayerNorm, ConvActPool };
enum class LossKind { CrossEntropy, SigmoidBCE, SigmoidMSE };
enum class OptimizerKind { None, SGD, Adam };

struct Layer {
  LayerKind kind;
  at::Tensor weight, bias;  // aliases of the model's parameters (may be undefined)
  Activation activation = Activation::Identity;
  double negative_slope = 0;
  double eps = 0;
  int64_t padding = 0;
  std::string activation_name;  // for the conv_act_pool op
};

// The LeNet block's kernels, called through the dispatcher (below autograd): they allocate their outputs and
// scratch per call, unlike the other layers, whose buffers live in the workspace.
std::tuple<at::Tensor, at::Tensor> conv_act_pool_op(const at::Tensor& x, const Layer& layer) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("fastmnist::conv_act_pool", "")
                       .typed<std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&,
                                                                 const std::optional<at::Tensor>&, int64_t,
                                                                 c10::string_view, bool)>();
  return op.call(x, layer.weight, layer.bias.defined() ? std::optional<at::Tensor>(layer.bias) : std::nullopt,
                 layer.padding, layer.activation_name, true);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> conv_act_pool_backward_op(const at::Tensor& grad_out,
                                                                         const at::Tensor& x, const Layer& layer,
                                                                         const at::Tensor& act, bool need_input) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("fastmnist::conv_act_pool_backward", "")
                       .typed<std::tuple<at::Tensor, at::Tensor, at::Tensor>(
                           const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, int64_t,
                           c10::string_view, std::array<bool, 3>)>();
  return op.call(grad_out, x, layer.weight, act, layer.padding, layer.activation_name,
                 {need_input, true, layer.bias.defined()});
}

// Buffers for one batch size.
struct Workspace {
  std::vector<at::Tensor> outputs;      // a_i, the output of layer i
  std::vector<at::Tensor> grads;        // d loss / d a_i
  std::vector<at::Tensor> row_stats;    // layer norm: (2, rows) mean and 1/std; else undefined
  std::vector<at::Tensor> saved;        // conv_act_pool: the activation output its backward needs
  std::vector<at::Tensor> param_grads;  // one per parameter, in parameter order
  at::Tensor loss_rows, row_sums;       // per-row loss; cross-entropy's log-sum-exp or BCE's loss sums
  at::Tensor batch, batch_target;       // an indexed step's gathered input (when not read in place) and targets
  at::Tensor head_chunk_grads;          // (chunks, n, k): the fused head's weight gradient per row chunk
};

// Elements per task in the optimizer updates (SGD and Adam). A parallel region costs microseconds on a quiet
// machine and milliseconds when another process holds a core (a thread waits out a time slice), so only updates
// big enough to pay for it (784x400 weights, not 784x200) are split across threads. Adam over 784x200 weights on
// two threads made the classifier's step 3-4% faster at batch 1 on a quiet Zen 4 VM (~25% at batch 16), but
// 3.5x slower at batch 1 (~350 us against ~100; 2.4x at batch 16) while the VM's two vCPUs were slow to reach
// each other (a cache-line round trip of 320-380 ns instead of ~60; perf: the forward's GEMV reads all the
// weights on the first thread, and the second thread's half of the update took ~8x longer). On one thread the
// batch-1 step kept ~100 us in both states.
constexpr int64_t kGrain = 1 << 18;
// Rows per chunk of the fused head's pass (head_forward_backward), fixed: the weight gradient's sum order depends
// on it. Softmax regression's batch of 256 makes two chunks, one per thread (its step on fresh batches, Xeon,
// alternating runs: 88-89 us with 128-row chunks, 90-94 with 64, 92-102 with 32: fewer shares to add).
constexpr int64_t kHeadChunk = 128;

class FusedStep : public torch::CustomClassHolder {
 public:
  void add_linear(at::Tensor weight, std::optional<at::Tensor> bias, std::string activation, double slope) {
    Layer layer{LayerKind::Linear, weight, bias.value_or(at::Tensor())};
    layer.activation = parse_activation(activation);
    check_negative_slope(slope);
    layer.negative_slope = slope;
    add_layer(std::move(layer));
  }
  void add_flatten() { add_layer(Layer{LayerKind::Flatten}); }
  void add_conv_act_pool(at::Tensor weight, std::optional<at::Tensor> bias, int64_t padding, std::string activation) {
    Layer layer{LayerKind::ConvActPool, weight, bias.value_or(at::Tensor())};
    layer.activation = parse_activation(activation);
    layer.activation_name = activation;
    layer.padding = padding;
    add_layer(std::move(layer));
  }
  void add_layer_norm(at::Tensor weight, at::Tensor bias, double eps) {
    Layer layer{LayerKind::LayerNorm, weight, bias};
    layer.eps = eps;
    add_layer(std::move(layer));
  }

  void set_loss(std::string kind) {
    if (kind == "cross_entropy") loss_ = LossKind::CrossEntropy;
    else if (kind == "sigmoid_bce") loss_ = LossKind::SigmoidBCE;
    else if (kind == "sigmoid_mse") loss_ = LossKind::SigmoidMSE;
    else TORCH_CHECK(false, "FusedStep: unknown loss '", kind, "'");
  }

  void set_sgd(double momentum, double dampening, bool nesterov, double weight_decay) {
    optimizer_ = OptimizerKind::SGD;
    momentum_ = momentum, dampening_ = dampening, nesterov_ = nesterov, weight_decay_ = weight_decay;
  }
  void set_adam(double beta1, double beta2, double eps, double weight_decay, bool decoupled) {
    optimizer_ = OptimizerKind::Adam;
    beta1_ = beta1, beta2_ = beta2, adam_eps_ = eps, weight_decay_ = weight_decay, decoupled_ = decoupled;
  }

  // The optimizer state, in parameter order: SGD with momentum: one momentum buffer per parameter;
  // Adam: (step, exp_avg, exp_avg_sq) per parameter. `fresh` marks SGD momentum buffers that the next step
  // initialises (torch.optim sets the buffer to the first gradient).
  void set_state(std::vector<at::Tensor> state, bool fresh) {
    const size_t per_param = optimizer_ == OptimizerKind::Adam ? 3 : (momentum_ != 0 ? 1 : 0);
    TORCH_CHECK(state.size() == per_param * params_.size(), "FusedStep: expected ", per_param * params_.size(),
                " optimizer state tensors, got ", state.size());
    state_ = std::move(state);
    fresh_momentum_ = fresh;
  }

  at::Tensor logits() const { return logits_; }

  // One training step with learning rate lr; returns the loss. The batch is (x, target), or, with an index,
  // the rows index of the whole tensors (x, target): gathered inside the step, and where the first layer
  // with parameters is a linear layer that our own kernels run (softmax regression, the two-layer net), read by
  // it in place, never copied.
  double step(at::Tensor x, at::Tensor target, std::optional<at::Tensor> index, double lr) {
    TORCH_CHECK(optimizer_ != OptimizerKind::None, "FusedStep: no optimizer set");
    TORCH_CHECK(!layers_.empty(), "FusedStep: no layers");
    TORCH_CHECK(x.scalar_type() == dtype_, "fused_step: x must have the model's dtype ", dtype_, ", got ",
                x.scalar_type());
    TORCH_CHECK(x.device().is_cpu(), "fused_step: x must be on the CPU, got ", x.device());
    TORCH_CHECK(x.dim() >= 2, "fused_step: x must be a batch (N, ...), got shape ", x.sizes());
    TORCH_CHECK(target.device().is_cpu(), "fused_step: target must be on the CPU, as x is, got ", target.device());
    // Plain kernels below the autograd layer: the step is its own backward.
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    std::vector<int64_t> batch_shape = x.sizes().vec();
    at::Tensor idx;  // the index, contiguous
    if (index.has_value()) {
      idx = index->contiguous();
      check_index(idx, x, target);
      batch_shape[0] = idx.size(0);
    }
    Workspace& ws = workspace_for(batch_shape, x.options());
    at::Tensor input = index.has_value() ? x : x.contiguous(), rows;
    if (index.has_value()) {
      if (gathers_in_place() && idx.size(0) > 1) {
        rows = idx;
      } else {
        gather_rows(ws.batch, x, idx);
        input = ws.batch;
      }
      std::vector<int64_t> target_shape = target.sizes().vec();
      target_shape[0] = idx.size(0);
      if (!ws.batch_target.defined() || ws.batch_target.scalar_type() != target.scalar_type() ||
          ws.batch_target.sizes() != target_shape)
        ws.batch_target = at::empty(target_shape, target.options());
      // a strided target's rows are gathered where they lie (contiguous() would copy all of it every step)
      if (target.is_contiguous()) {
        gather_rows(ws.batch_target, target, idx);
      } else {
        at::index_select_out(ws.batch_target, target, 0, idx);
      }
      target = ws.batch_target;
    }
    const bool head = fused_head();
    forward(input, rows, ws, head ? layers_.size() - 1 : layers_.size());
    double loss;
    if (head) {
      loss = head_forward_backward(input, rows, target, ws);
    } else {
      const at::Tensor& out = ws.outputs.back();
      TORCH_CHECK(out.dim() == 2, "fused_step: the model must end in (N, classes) logits, got ", out.sizes());
      loss = loss_and_grad(out, target, ws.grads.back(), ws);
    }
    logits_ = ws.outputs.back();
    backward(input, rows, lr, ws, head);
    fresh_momentum_ = false;
    // parameters and optimizer state changed in place: bump their version counters as an in-place op would
    for (at::Tensor& p : params_) p.unsafeGetTensorImpl()->bump_version();
    for (at::Tensor& s : state_) s.unsafeGetTensorImpl()->bump_version();
    return loss;
  }

 private:
  void add_layer(Layer layer) {
    for (const at::Tensor* p : {&layer.weight, &layer.bias}) {
      if (!p->defined()) continue;
      check_float_tensor("fused_step", "parameter", *p);
      TORCH_CHECK(p->device().is_cpu(), "fused_step: the CPU fused step needs CPU parameters, got ", p->device());
      TORCH_CHECK(p->is_contiguous(), "fused_step: parameters must be contiguous");
      if (params_.empty()) dtype_ = p->scalar_type();
      TORCH_CHECK(p->scalar_type() == dtype_, "fused_step: all parameters must have one dtype");
      params_.push_back(*p);
    }
    layers_.push_back(std::move(layer));
    workspaces_.clear();
  }

  // An indexed step's checks: index (contiguous) selects rows of the whole tensors x and target, which stay in
  // place.
  static void check_index(const at::Tensor& index, const at::Tensor& x, const at::Tensor& target) {
    TORCH_CHECK(index.scalar_type() == at::kLong && index.dim() == 1 && index.device().is_cpu(),
                "fused_step: index must be a 1-D int64 CPU tensor of row numbers, got ", index.scalar_type(), " ",
                index.sizes(), " on ", index.device());
    TORCH_CHECK(index.numel() > 0, "fused_step: index selects no rows");
    TORCH_CHECK(x.is_contiguous(), "fused_step: with an index, x (all rows) must be contiguous; make it so once, "
                "not per step");
    TORCH_CHECK(target.dim() >= 1 && target.size(0) == x.size(0), "fused_step: with an index, x and target must "
                "have the same number of rows, got ", x.size(0), " and ", target.sizes());
    const int64_t* p = index.const_data_ptr<int64_t>();
    for (int64_t i = 0; i < index.numel(); ++i) {
      TORCH_CHECK(p[i] >= 0 && p[i] < x.size(0), "fused_step: index out of range: index[", i, "] = ", p[i],
                  ", x has ", x.size(0), " rows");
    }
  }

  // dst[r] = src[index[r]], whole rows of the contiguous src (index contiguous, checked), split across the threads
  // when there is enough to copy: the rows of a shuffled batch come from memory, and on one thread (index_select,
  // below its parallel grain for a batch of 100 images) the copy was 11% of the two-layer net's step. Also the
  // batch's targets (on one thread: a few hundred bytes, where index_select's dispatch cost more than the copy).
  static void gather_rows(at::Tensor& dst, const at::Tensor& src, const at::Tensor& index) {
    const int64_t rows = index.size(0), row_bytes = src.numel() / src.size(0) * src.element_size();
    if (row_bytes == 0) return;
    const int64_t* ip = index.const_data_ptr<int64_t>();
    const char* from = static_cast<const char*>(src.const_data_ptr());
    char* to = static_cast<char*>(dst.mutable_data_ptr());
    at::parallel_for(0, rows, std::max<int64_t>(1, (16 << 10) / row_bytes), [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r) std::memcpy(to + r * row_bytes, from + ip[r] * row_bytes, row_bytes);
    });
  }

  // The layer that reads an indexed batch in place, or -1: the first layer with parameters, when it is a
  // linear layer with few enough outputs for our own kernels (linear_small_output: softmax regression's 10,
  // the two-layer net's 50) and only flattens come before it.
  int64_t in_place_gather_layer() const {
    for (size_t i = 0; i < layers_.size(); ++i) {
      const Layer& layer = layers_[i];
      if (layer.kind == LayerKind::Flatten) continue;
      const bool reads_rows = layer.kind == LayerKind::Linear && linear_small_output(layer.weight.size(0));
      return reads_rows ? static_cast<int64_t>(i) : -1;
    }
    return -1;
  }
  bool gathers_in_place() const { return in_place_gather_layer() >= 0; }

  Workspace& workspace_for(const std::vector<int64_t>& batch_shape, const at::TensorOptions& options) {
    auto found = workspaces_.find(batch_shape);
    if (found != workspaces_.end()) return found->second;
    Workspace ws;
    const int64_t rows = batch_shape[0];
    at::Tensor a = at::empty(batch_shape, options);  // also the buffer an indexed step gathers into
    ws.batch = a;
    for (const Layer& layer : layers_) {
      at::Tensor out, stats;
      switch (layer.kind) {
        case LayerKind::Linear:
          TORCH_CHECK(a.size(-1) == layer.weight.size(1), "fused_step: a linear layer expects ", layer.weight.size(1),
                      " input features, got input of shape ", a.sizes());
          out = at::empty({rows, layer.weight.size(0)}, options);
          break;
        case LayerKind::Flatten:
          // a view of its input in forward (set per step), and its gradient a view of the input's gradient
          out = a.view({rows, -1});
          break;
        case LayerKind::ConvActPool: {
          TORCH_CHECK(a.dim() == 4 && a.size(1) == layer.weight.size(1), "fused_step: a conv block expects (N, ",
                      layer.weight.size(1), ", H, W) input, got ", a.sizes());
          const int64_t k = layer.weight.size(2);
          const int64_t conv_h = a.size(2) + 2 * layer.padding - k + 1, conv_w = a.size(3) + 2 * layer.padding - k + 1;
          TORCH_CHECK(conv_h >= 2 && conv_w >= 2, "fused_step: a conv block's output is smaller than one pooling "
                      "window for input ", a.sizes());
          out = at::empty({rows, layer.weight.size(0), conv_h / 2, conv_w / 2}, options);
          break;
        }
        case LayerKind::LayerNorm:
          TORCH_CHECK(a.dim() == 2 && a.size(1) == layer.weight.numel(), "fused_step: layer norm over ",
                      layer.weight.numel(), " features got input of shape ", a.sizes());
          out = at::empty_like(a);
          stats = at::empty({2, rows}, options);
          break;
      }
      ws.outputs.push_back(out);
      const bool grad_is_view = layer.kind == LayerKind::Flatten && !ws.grads.empty();
      ws.grads.push_back(grad_is_view ? ws.grads.back().view(out.sizes()) : at::empty_like(out));
      ws.row_stats.push_back(stats);
      ws.saved.emplace_back();
      a = out;
    }
    for (const at::Tensor& p : params_) ws.param_grads.push_back(at::empty_like(p));
    ws.loss_rows = at::empty({rows}, options);
    ws.row_sums = at::empty({rows}, options.dtype(at::kDouble));
    return workspaces_.emplace(batch_shape, std::move(ws)).first->second;
  }

  // The input of layer i: the previous layer's output, or the step's x (the batch, or all rows when the layer
  // reads an indexed batch in place).
  static const at::Tensor& layer_input(int64_t i, int64_t reader, const at::Tensor& x, const Workspace& ws) {
    return i > 0 && i != reader ? ws.outputs[i - 1] : x;
  }

  // Layers [0, end). x is the batch, or, with rows (an indexed step read in place), all rows: then the flattens
  // before the layer that reads them are skipped.
  void forward(const at::Tensor& x, const at::Tensor& rows, Workspace& ws, size_t end) {
    const int64_t reader = rows.defined() ? in_place_gather_layer() : -1;
    at::Tensor a = x;
    for (int64_t i = std::max<int64_t>(reader, 0); i < static_cast<int64_t>(end); ++i) {
      const Layer& layer = layers_[i];
      at::Tensor& out = ws.outputs[i];
      switch (layer.kind) {
        case LayerKind::Linear:
          linear_act_forward_into(out, a.view({a.size(0), -1}), layer.weight, layer.bias, layer.activation,
                                  layer.negative_slope, i == reader ? rows : at::Tensor());
          break;
        case LayerKind::Flatten:
          out = a.view(out.sizes());
          break;
        case LayerKind::LayerNorm:
          layer_norm_forward(a, layer, out, ws.row_stats[i]);
          break;
        case LayerKind::ConvActPool:
          std::tie(out, ws.saved[i]) = conv_act_pool_op(a, layer);
          break;
      }
      a = out;
    }
  }

  // Layer norm over the last dimension: y = (x - mean) / sqrt(var + eps) * gamma + beta, biased variance, as
  // torch. Keeps mean and 1/std per row for backward.
  static void layer_norm_forward(const at::Tensor& x, const Layer& layer, at::Tensor& y, at::Tensor& stats) {
    const int64_t rows = x.size(0), d = x.size(1);
    AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "fused_step_layer_norm", [&] {
      const scalar_t* xp = x.const_data_ptr<scalar_t>();
      const scalar_t* gamma = layer.weight.const_data_ptr<scalar_t>();
      const scalar_t* beta = layer.bias.const_data_ptr<scalar_t>();
      scalar_t* yp = y.mutable_data_ptr<scalar_t>();
      scalar_t* mean = stats.mutable_data_ptr<scalar_t>();
      scalar_t* rstd = mean + rows;
      at::parallel_for(0, rows, 16, [&](int64_t r0, int64_t r1) {
        for (int64_t r = r0; r < r1; ++r) {
          const scalar_t* row = xp + r * d;
          double sum = 0, sq = 0;
          for (int64_t j = 0; j < d; ++j) sum += row[j];
          const double mu = sum / d;
          for (int64_t j = 0; j < d; ++j) sq += (row[j] - mu) * (row[j] - mu);
          const double inv = 1.0 / std::sqrt(sq / d + layer.eps);
          mean[r] = static_cast<scalar_t>(mu);
          rstd[r] = static_cast<scalar_t>(inv);
          for (int64_t j = 0; j < d; ++j)
            yp[r * d + j] = static_cast<scalar_t>((row[j] - mu) * inv) * gamma[j] + beta[j];
        }
      });
    });
  }

  static at::Tensor checked_class_targets(const at::Tensor& target, int64_t rows) {
    TORCH_CHECK(target.scalar_type() == at::kLong && target.dim() == 1 && target.size(0) == rows,
                "fused_step: cross-entropy needs int64 class indices of shape (", rows, ",), got ",
                target.scalar_type(), " ", target.sizes());
    return target.contiguous();
  }

  // The loss ops' cross-entropy row kernel's arguments for logits z (rows, classes) and class targets t (checked
  // here, before any row is read), writing the logit gradient into grad. Returns the mean's divisor, the number of
  // kept rows (0 for an all-ignored batch, whose mean is then 0/0 = NaN, as eager's).
  template <typename T>
  static double cross_entropy_args(cpu::CERows<T>& p, const at::Tensor& z, const at::Tensor& t, at::Tensor& grad,
                                   Workspace& ws) {
    static const T one = 1;
    const int64_t rows = z.size(0), classes = z.size(1);
    const double kept = cpu::check_targets_and_weight_sum<T>("fused_step", t.const_data_ptr<int64_t>(), rows,
                                                             classes, nullptr, kIgnoreIndex);
    p.x = z.const_data_ptr<T>();
    p.C = classes;
    p.y = t.const_data_ptr<int64_t>();
    p.ignore_index = kIgnoreIndex;
    p.w_sum = T(classes);
    p.lse = ws.row_sums.mutable_data_ptr<double>();
    p.loss = ws.loss_rows.mutable_data_ptr<T>();
    p.grad = grad.mutable_data_ptr<T>();
    p.gscale = &one;
    p.gmul = T(1) / static_cast<T>(kept);
    return kept;
  }

  template <typename T>
  static double mean_loss(const cpu::CERows<T>& p, int64_t rows, double kept) {
    double total = 0;
    for (int64_t r = 0; r < rows; ++r) total += static_cast<double>(p.loss[r]);
    return total / kept;
  }

  // Whether the last layer and a cross-entropy loss run as one pass (head_forward_backward): the last layer is
  // linear, without activation, and has few enough outputs for our own row kernels.
  bool fused_head() const {
    const Layer& last = layers_.back();
    return loss_ == LossKind::CrossEntropy && last.kind == LayerKind::Linear &&
           last.activation == Activation::Identity && linear_small_output(last.weight.size(0));
  }

  // The last layer's forward, the cross-entropy loss and the layer's weight gradient in one parallel pass over
  // fixed chunks of kHeadChunk rows: per chunk its logits, loss rows and logit gradient, then its share of the
  // weight gradient g^T x, whose input rows are still in this core's cache. As separate passes, the layer's input
  // was read twice, and the weight-gradient kernel (which splits the columns, not the rows) read half of it from
  // the other core's cache: a third of softmax regression's step, whose input is the 784-pixel images. The chunk
  // shares are added in chunk order (deterministic for any thread count). Returns the loss.
  double head_forward_backward(const at::Tensor& x, const at::Tensor& rows, const at::Tensor& target,
                               Workspace& ws) {
    const int64_t last = static_cast<int64_t>(layers_.size()) - 1;
    const Layer& layer = layers_[last];
    const int64_t reader = rows.defined() ? in_place_gather_layer() : -1;
    const at::Tensor& in = layer_input(last, reader, x, ws);
    const at::Tensor& z = ws.outputs[last];
    at::Tensor& grad_w = ws.param_grads[params_.size() - (layer.bias.defined() ? 2 : 1)];
    const int64_t m = z.size(0), n = z.size(1), k = layer.weight.size(1);
    const int64_t chunks = (m + kHeadChunk - 1) / kHeadChunk;
    if (chunks > 1 && !ws.head_chunk_grads.defined()) ws.head_chunk_grads = at::empty({chunks, n, k}, z.options());
    const at::Tensor t = checked_class_targets(target, m);
    double loss = 0;
    AT_DISPATCH_FLOATING_TYPES(z.scalar_type(), "fused_step_head", [&] {
      using T = scalar_t;
      cpu::CERows<T> p{};
      const double kept = cross_entropy_args<T>(p, z, t, ws.grads[last], ws);
      const T* xp = in.const_data_ptr<T>();
      const int64_t* index = reader == last ? rows.const_data_ptr<int64_t>() : nullptr;
      const T* w = layer.weight.const_data_ptr<T>();
      const T* b = layer.bias.defined() ? layer.bias.const_data_ptr<T>() : nullptr;
      T* logits = z.mutable_data_ptr<T>();
      T* shares = chunks > 1 ? ws.head_chunk_grads.mutable_data_ptr<T>() : grad_w.mutable_data_ptr<T>();
      at::parallel_for(0, chunks, 1, [&](int64_t c0, int64_t c1) {
        for (int64_t c = c0; c < c1; ++c) {
          const int64_t r0 = c * kHeadChunk, r1 = std::min(m, r0 + kHeadChunk);
          linear_forward_rows<T>(xp, index, w, b, logits, r0, r1, n, k, Activation::Identity, T(0));
          cpu::cross_entropy_row_range<T>(p, r0, r1);
          linear_grad_weight_rows<T>(p.grad, xp, index, shares + c * n * k, r0, r1, n, k);
        }
      });
      if (chunks > 1) {
        T* gw = grad_w.mutable_data_ptr<T>();
        std::copy(shares, shares + n * k, gw);
        for (int64_t c = 1; c < chunks; ++c)
          for (int64_t i = 0; i < n * k; ++i) gw[i] += shares[c * n * k + i];
      }
      loss = mean_loss(p, m, kept);
    });
    return loss;
  }

  // Loss value (mean reduction) and its gradient w.r.t. the logits z (rows, classes), written into grad.
  double loss_and_grad(const at::Tensor& z, const at::Tensor& target, at::Tensor& grad, Workspace& ws) {
    const int64_t rows = z.size(0), classes = z.size(1);
    double total = 0;
    if (loss_ == LossKind::CrossEntropy) {
      const at::Tensor t = checked_class_targets(target, rows);
      AT_DISPATCH_FLOATING_TYPES(z.scalar_type(), "fused_step_cross_entropy", [&] {
        cpu::CERows<scalar_t> p{};
        const double kept = cross_entropy_args<scalar_t>(p, z, t, grad, ws);
        cpu::cross_entropy_rows<scalar_t>(p, rows);
        total = mean_loss(p, rows, kept);
      });
      return total;
    }
    TORCH_CHECK(target.sizes() == z.sizes() && target.scalar_type() == z.scalar_type(),
                "fused_step: this loss needs float targets of the logits' shape ", z.sizes(), " and dtype ",
                z.scalar_type(), ", got ", target.scalar_type(), " ", target.sizes());
    const at::Tensor t = target.contiguous();
    AT_DISPATCH_FLOATING_TYPES(z.scalar_type(), "fused_step_sigmoid_loss", [&] {
      const scalar_t* zp = z.const_data_ptr<scalar_t>();
      const scalar_t* tp = t.const_data_ptr<scalar_t>();
      scalar_t* gp = grad.mutable_data_ptr<scalar_t>();
      const int64_t n = z.numel();
      const scalar_t scale = scalar_t(1) / static_cast<scalar_t>(n);
      if (loss_ == LossKind::SigmoidBCE) {
        // the loss ops' kernel: a forward pass for the per-row loss sums, a backward pass for the gradient
        const scalar_t one = 1;
        cpu::BCERows<scalar_t> p{};
        p.x = zp;
        p.y = tp;
        p.C = classes;
        p.total = n;
        p.row_sum = ws.row_sums.mutable_data_ptr<double>();
        cpu::sigmoid_bce_rows<scalar_t>(p, rows);
        for (int64_t r = 0; r < rows; ++r) total += p.row_sum[r];
        p.row_sum = nullptr;
        p.g = &one;
        p.gmul = scale;
        p.grad_x = gp;
        cpu::sigmoid_bce_rows<scalar_t>(p, rows);
      } else {
        // mean of (sigmoid(z) - t)^2, which only this step offers (the classifier model's MSE variant)
        for (int64_t i = 0; i < n; ++i) {
          const scalar_t s = activate<Activation::Sigmoid>(zp[i], scalar_t(0));
          const scalar_t diff = s - tp[i];
          total += static_cast<double>(diff * diff);
          gp[i] = scalar_t(2) * diff * activation_grad_from_output(Activation::Sigmoid, s, scalar_t(0)) * scale;
        }
      }
      total /= static_cast<double>(n);
    });
    return total;
  }

  // head: the last layer's weight gradient is already in its param_grads (head_forward_backward).
  void backward(const at::Tensor& x, const at::Tensor& rows, double lr, Workspace& ws, bool head) {
    const int64_t reader = rows.defined() ? in_place_gather_layer() : -1;
    // index of the first parameter of each layer, and whether any layer before i has parameters
    std::vector<size_t> first_param(layers_.size());
    size_t p = 0;
    int64_t first_with_params = -1;
    for (size_t i = 0; i < layers_.size(); ++i) {
      first_param[i] = p;
      const size_t count = layers_[i].weight.defined() + layers_[i].bias.defined();
      if (count > 0 && first_with_params < 0) first_with_params = static_cast<int64_t>(i);
      p += count;
    }
    for (int64_t i = static_cast<int64_t>(layers_.size()) - 1; i >= 0; --i) {
      if (i < first_with_params) break;  // nothing below needs a gradient
      const Layer& layer = layers_[i];
      const at::Tensor& in = layer_input(i, reader, x, ws);
      at::Tensor& g = ws.grads[i];
      const bool need_input_grad = i > first_with_params;
      at::Tensor grad_in = i > 0 ? ws.grads[i - 1] : at::Tensor();
      const size_t pw = first_param[i];
      switch (layer.kind) {
        case LayerKind::Linear: {
          at::Tensor grad_bias = layer.bias.defined() ? ws.param_grads[pw + 1] : at::Tensor();
          linear_act_grad_pre_into(g, grad_bias, g, ws.outputs[i], layer.activation, layer.negative_slope);
          const at::Tensor in2d = in.view({in.size(0), -1});
          if (need_input_grad) {
            at::Tensor grad_in2d = grad_in.view({in.size(0), -1});
            linear_grad_input_into(grad_in2d, g, layer.weight);
          }
          if (head && i == static_cast<int64_t>(layers_.size()) - 1) {
            update(pw, ws.param_grads[pw], lr);
          } else if (g.size(0) == 1) {
            update_rows(pw, in2d, g, lr);  // batch 1: grad_W[o, k] = g[0, o] x[0, k], formed in the update
          } else if (plain_sgd() && linear_sgd_weight_update(layer.weight, g, in2d, lr)) {
            // plain SGD on a BLAS layer: the update was the weight-gradient GEMM itself
          } else {
            linear_grad_weight_into(ws.param_grads[pw], g, in2d, i == reader ? rows : at::Tensor());
            update(pw, ws.param_grads[pw], lr);
          }
          if (layer.bias.defined()) update(pw + 1, grad_bias, lr);
          break;
        }
        case LayerKind::Flatten:  // its gradient is a view of its input's
          break;
        case LayerKind::ConvActPool: {
          auto [grad_x, grad_w, grad_b] = conv_act_pool_backward_op(g, in, layer, ws.saved[i], need_input_grad);
          if (need_input_grad) grad_in.copy_(grad_x);
          update(pw, grad_w, lr);
          if (layer.bias.defined()) update(pw + 1, grad_b, lr);
          break;
        }
        case LayerKind::LayerNorm:
          layer_norm_backward(in, layer, ws.outputs[i], ws.row_stats[i], g, need_input_grad ? grad_in : at::Tensor(),
                              ws.param_grads[pw], ws.param_grads[pw + 1]);
          update(pw, ws.param_grads[pw], lr);
          update(pw + 1, ws.param_grads[pw + 1], lr);
          break;
      }
    }
  }

  // d gamma = sum_r g * xhat, d beta = sum_r g (rows added in order), and
  // dx = rstd * (g*gamma - mean(g*gamma) - xhat * mean(g*gamma*xhat)) per row.
  static void layer_norm_backward(const at::Tensor& x, const Layer& layer, const at::Tensor& y,
                                  const at::Tensor& stats, const at::Tensor& g, at::Tensor grad_x,
                                  at::Tensor& grad_gamma, at::Tensor& grad_beta) {
    const int64_t rows = x.size(0), d = x.size(1);
    AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "fused_step_layer_norm_backward", [&] {
      const scalar_t* xp = x.const_data_ptr<scalar_t>();
      const scalar_t* gp = g.const_data_ptr<scalar_t>();
      const scalar_t* gamma = layer.weight.const_data_ptr<scalar_t>();
      const scalar_t* mean = stats.const_data_ptr<scalar_t>();
      const scalar_t* rstd = mean + rows;
      scalar_t* dgamma = grad_gamma.mutable_data_ptr<scalar_t>();
      scalar_t* dbeta = grad_beta.mutable_data_ptr<scalar_t>();
      std::fill(dgamma, dgamma + d, scalar_t(0));
      std::fill(dbeta, dbeta + d, scalar_t(0));
      for (int64_t r = 0; r < rows; ++r) {
        for (int64_t j = 0; j < d; ++j) {
          const scalar_t xhat = (xp[r * d + j] - mean[r]) * rstd[r];
          dgamma[j] += gp[r * d + j] * xhat;
          dbeta[j] += gp[r * d + j];
        }
      }
      if (!grad_x.defined()) return;
      scalar_t* dx = grad_x.mutable_data_ptr<scalar_t>();
      at::parallel_for(0, rows, 16, [&](int64_t r0, int64_t r1) {
        for (int64_t r = r0; r < r1; ++r) {
          double sum_dxhat = 0, sum_dxhat_xhat = 0;
          for (int64_t j = 0; j < d; ++j) {
            const double dxhat = gp[r * d + j] * gamma[j];
            sum_dxhat += dxhat;
            sum_dxhat_xhat += dxhat * (xp[r * d + j] - mean[r]) * rstd[r];
          }
          const double m1 = sum_dxhat / d, m2 = sum_dxhat_xhat / d;
          for (int64_t j = 0; j < d; ++j) {
            const double xhat = (xp[r * d + j] - mean[r]) * rstd[r];
            dx[r * d + j] = static_cast<scalar_t>(rstd[r] * (gp[r * d + j] * gamma[j] - m1 - xhat * m2));
          }
        }
      });
    });
  }

  // The optimizer update of parameter `index` with gradient `grad` (cpu/optimizer_update.h), in chunks of
  // kGrain elements: only parameters of several chunks are split across threads.
  void update(size_t index, const at::Tensor& grad, double lr) { update_rows(index, grad, at::Tensor(), lr); }

  // The same with the gradient row[i % cols] * row_scale[i / cols] (cols = row.numel()): a batch-1 linear layer's
  // weight gradient, the outer product of the output gradient (row_scale) and the input row, formed in the
  // update's own pass instead of written by a GEMM and read back.
  void update_rows(size_t index, const at::Tensor& row, const at::Tensor& row_scale, double lr) {
    at::Tensor& param = params_[index];
    AT_DISPATCH_FLOATING_TYPES(param.scalar_type(), "fused_step_update", [&] {
      using T = scalar_t;
      T* p = param.mutable_data_ptr<T>();
      const cpu::GradRows<T> grad{row.const_data_ptr<T>(),
                                  row_scale.defined() ? row_scale.const_data_ptr<T>() : nullptr, row.numel()};
      const int64_t n = param.numel();
      if (optimizer_ == OptimizerKind::SGD) {
        const cpu::SgdArgs<T> args{static_cast<T>(lr), static_cast<T>(weight_decay_), static_cast<T>(momentum_),
                                   static_cast<T>(1 - dampening_), nesterov_, fresh_momentum_};
        T* buf = momentum_ != 0 ? state_[index].mutable_data_ptr<T>() : nullptr;
        at::parallel_for(0, n, kGrain, [&](int64_t i0, int64_t i1) {
          cpu::run_kernel<cpu::SgdUpdate<T>>(p, grad, buf, i0, i1, args);
        });
        return;
      }
      const double t = increment_step(state_[3 * index]);
      const cpu::AdamArgs<T> args{static_cast<T>(lr / (1 - std::pow(beta1_, t))),
                                  static_cast<T>(std::sqrt(1 - std::pow(beta2_, t))),
                                  static_cast<T>(1 - beta1_), static_cast<T>(beta2_), static_cast<T>(1 - beta2_),
                                  static_cast<T>(adam_eps_), static_cast<T>(weight_decay_),
                                  static_cast<T>(1 - lr * weight_decay_), decoupled_};
      T* m = state_[3 * index + 1].mutable_data_ptr<T>();
      T* v = state_[3 * index + 2].mutable_data_ptr<T>();
      at::parallel_for(0, n, kGrain, [&](int64_t i0, int64_t i1) {
        cpu::run_kernel<cpu::AdamUpdate<T>>(p, grad, m, v, i0, i1, args);
      });
    });
  }

  // SGD without momentum or weight decay: p -= lr * grad
  bool plain_sgd() const { return optimizer_ == OptimizerKind::SGD && momentum_ == 0 && weight_decay_ == 0; }

  // Adam's step count, a scalar tensor as torch.optim keeps it: += 1 in place; returns the new count.
  static double increment_step(at::Tensor& step_count) {
    double t = 0;
    AT_DISPATCH_FLOATING_TYPES(step_count.scalar_type(), "fused_step_adam_step", [&] {
      scalar_t* s = step_count.mutable_data_ptr<scalar_t>();
      *s += scalar_t(1);
      t = static_cast<double>(*s);
    });
    return t;
  }

  static constexpr int64_t kIgnoreIndex = -100;

  std::vector<Layer> layers_;
  std::vector<at::Tensor> params_;
  std::vector<at::Tensor> state_;
  at::ScalarType dtype_ = at::kFloat;
  LossKind loss_ = LossKind::CrossEntropy;
  OptimizerKind optimizer_ = OptimizerKind::None;
  double momentum_ = 0, dampening_ = 0, weight_decay_ = 0, beta1_ = 0.9, beta2_ = 0.999, adam_eps_ = 1e-8;
  bool nesterov_ = false, decoupled_ = false, fresh_momentum_ = false;
  std::map<std::vector<int64_t>, Workspace> workspaces_;
  at::Tensor logits_;
};

}  // namespace

double run_fused_step(const c10::intrusive_ptr<c10::ivalue::Object>& step, at::Tensor x, at::Tensor target,
                      std::optional<at::Tensor> index, double lr) {
  return c10::IValue(step).toCustomClass<FusedStep>()->step(std::move(x), std::move(target), std::move(index), lr);
}

TORCH_LIBRARY_FRAGMENT(fastmnist, m) {
  m.class_<FusedStep>("FusedStep")
      .def(torch::init<>())
      .def("add_linear", &FusedStep::add_linear)
      .def("add_flatten", &FusedStep::add_flatten)
      .def("add_conv_act_pool", &FusedStep::add_conv_act_pool)
      .def("add_layer_norm", &FusedStep::add_layer_norm)
      .def("set_loss", &FusedStep::set_loss)
      .def("set_sgd", &FusedStep::set_sgd)
      .def("set_adam", &FusedStep::set_adam)
      .def("set_state", &FusedStep::set_state)
      .def("logits", &FusedStep::logits)
      .def("step", &FusedStep::step);
}

}  // namespace fastmnist
