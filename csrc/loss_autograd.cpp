// Autograd for the loss ops, in C++ (registered for every device under the Autograd key).
//
// The losses are called once per training step on tiny tensors (64 x 10 logits), where a Python autograd
// formula (torch.library.register_autograd) costs more than eager's whole fused C++ loss; this keeps the
// forward and backward dispatch in C++. The backward kernels are ops of their own, called through the
// dispatcher, so torch.compile traces them (their fake kernels are registered from Python).

#include <ATen/ATen.h>
#include <torch/autograd.h>
#include <torch/library.h>

namespace fastmnist {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

at::Tensor undefined() {
  return at::Tensor();
}

// A loss gradient that autograd left undefined (nothing flowed into it) as zeros of the loss's shape.
at::Tensor grad_or_zeros(const at::Tensor& grad, int64_t reduction, int64_t rows, const at::Tensor& like) {
  if (grad.defined()) return grad;
  return reduction == 0 ? at::zeros({rows}, like.options()) : at::zeros({}, like.options());
}

struct SoftmaxCrossEntropyFn : torch::autograd::Function<SoftmaxCrossEntropyFn> {
  static variable_list forward(AutogradContext* ctx, const at::Tensor& logits, const at::Tensor& target,
                               const std::optional<at::Tensor>& weight, int64_t ignore_index, int64_t reduction,
                               double label_smoothing) {
    static auto op = c10::Dispatcher::singleton()
                         .findSchemaOrThrow("fastmnist::softmax_cross_entropy", "")
                         .typed<std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&,
                                                                    const std::optional<at::Tensor>&, int64_t,
                                                                    int64_t, double)>();
    at::AutoDispatchBelowADInplaceOrView guard;
    auto [loss, lse] = op.call(logits, target, weight, ignore_index, reduction, label_smoothing);
    ctx->save_for_backward({logits, target, weight.value_or(at::Tensor()), lse});
    ctx->saved_data["ignore_index"] = ignore_index;
    ctx->saved_data["reduction"] = reduction;
    ctx->saved_data["label_smoothing"] = label_smoothing;
    ctx->mark_non_differentiable({lse});
    ctx->set_materialize_grads(false);  // no zero gradient for lse on every backward; grad_or_zeros covers `loss`
    return {loss, lse};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    static auto op = c10::Dispatcher::singleton()
                         .findSchemaOrThrow("fastmnist::softmax_cross_entropy_backward", "")
                         .typed<std::tuple<at::Tensor, at::Tensor>(
                             const at::Tensor&, const at::Tensor&, const at::Tensor&,
                             const std::optional<at::Tensor>&, const at::Tensor&, int64_t, int64_t, double,
                             std::array<bool, 2>)>();
    const auto saved = ctx->get_saved_variables();
    const at::Tensor& logits = saved[0];
    const at::Tensor& target = saved[1];
    const std::optional<at::Tensor> weight = saved[2].defined() ? std::optional<at::Tensor>(saved[2]) : std::nullopt;
    const int64_t reduction = ctx->saved_data["reduction"].toInt();
    const std::array<bool, 2> mask = {ctx->needs_input_grad(0),
                                      ctx->needs_input_grad(1) && target.is_floating_point()};
    auto [grad, grad_target] =
        op.call(grad_or_zeros(grads[0], reduction, logits.size(0), logits), logits, target, weight, saved[3],
                ctx->saved_data["ignore_index"].toInt(), reduction, ctx->saved_data["label_smoothing"].toDouble(),
                mask);
    return {mask[0] ? grad : undefined(), mask[1] ? grad_target : undefined(), undefined(), undefined(),
            undefined(), undefined()};
  }
};

std::tuple<at::Tensor, at::Tensor> softmax_cross_entropy_autograd(const at::Tensor& logits, const at::Tensor& target,
                                                                  const std::optional<at::Tensor>& weight,
                                                                  int64_t ignore_index, int64_t reduction,
                                                                  double label_smoothing) {
  auto out = SoftmaxCrossEntropyFn::apply(logits, target, weight, ignore_index, reduction, label_smoothing);
  return {out[0], out[1]};
}

struct SigmoidBCEFn : torch::autograd::Function<SigmoidBCEFn> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& logits, const at::Tensor& target,
                            const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& pos_weight,
                            int64_t reduction) {
    static auto op = c10::Dispatcher::singleton()
                         .findSchemaOrThrow("fastmnist::sigmoid_bce", "")
                         .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&,
                                           const std::optional<at::Tensor>&, int64_t)>();
    at::AutoDispatchBelowADInplaceOrView guard;
    ctx->save_for_backward({logits, target, weight.value_or(at::Tensor()), pos_weight.value_or(at::Tensor())});
    ctx->saved_data["reduction"] = reduction;
    return op.call(logits, target, weight, pos_weight, reduction);
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    static auto op = c10::Dispatcher::singleton()
                         .findSchemaOrThrow("fastmnist::sigmoid_bce_backward", "")
                         .typed<std::tuple<at::Tensor, at::Tensor>(
                             const at::Tensor&, const at::Tensor&, const at::Tensor&,
                             const std::optional<at::Tensor>&, const std::optional<at::Tensor>&, int64_t,
                             std::array<bool, 2>)>();
    const auto saved = ctx->get_saved_variables();
    auto opt = [](const at::Tensor& t) { return t.defined() ? std::optional<at::Tensor>(t) : std::nullopt; };
    const std::array<bool, 2> mask = {ctx->needs_input_grad(0), ctx->needs_input_grad(1)};
    const int64_t reduction = ctx->saved_data["reduction"].toInt();
    const at::Tensor grad = grads[0].defined() ? grads[0]
                            : reduction == 0   ? at::zeros_like(saved[0])
                                               : at::zeros({}, saved[0].options());
    auto [grad_x, grad_t] = op.call(grad, saved[0], saved[1], opt(saved[2]), opt(saved[3]), reduction, mask);
    return {mask[0] ? grad_x : undefined(), mask[1] ? grad_t : undefined(), undefined(), undefined(), undefined()};
  }
};

at::Tensor sigmoid_bce_autograd(const at::Tensor& logits, const at::Tensor& target,
                                const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& pos_weight,
                                int64_t reduction) {
  return SigmoidBCEFn::apply(logits, target, weight, pos_weight, reduction);
}

using LinearCEOutputs = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

struct LinearCrossEntropyFn : torch::autograd::Function<LinearCrossEntropyFn> {
  static variable_list forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& weight,
                               const std::optional<at::Tensor>& bias, const at::Tensor& target,
                               const std::optional<at::Tensor>& class_weight, int64_t num_classes,
                               int64_t ignore_index, int64_t reduction, double label_smoothing,
                               std::vector<bool> grad_mask) {
    static auto op = c10::Dispatcher::singleton()
                         .findSchemaOrThrow("fastmnist::linear_cross_entropy", "")
                         .typed<LinearCEOutputs(const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&,
                                                const at::Tensor&, const std::optional<at::Tensor>&, int64_t,
                                                int64_t, int64_t, double, std::array<bool, 3>)>();
    at::AutoDispatchBelowADInplaceOrView guard;
    const std::array<bool, 3> mask = {grad_mask[0], grad_mask[1], grad_mask[2] && bias.has_value()};
    auto [loss, lse, gx, gw, gb] =
        op.call(x, weight, bias, target, class_weight, num_classes, ignore_index, reduction, label_smoothing, mask);
    ctx->save_for_backward({x, weight, bias.value_or(at::Tensor()), target, class_weight.value_or(at::Tensor()), lse,
                            gx, gw, gb});
    ctx->saved_data["num_classes"] = num_classes;
    ctx->saved_data["ignore_index"] = ignore_index;
    ctx->saved_data["reduction"] = reduction;
    ctx->saved_data["label_smoothing"] = label_smoothing;
    ctx->saved_data["mask"] = c10::List<bool>({mask[0], mask[1], mask[2]});
    ctx->mark_non_differentiable({lse, gx, gw, gb});
    // no zero gradients for lse and the precomputed gradients (the size of x and of the weight) on every
    // backward; an undefined grad of `loss` is handled in backward
    ctx->set_materialize_grads(false);
    return {loss, lse, gx, gw, gb};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    static auto op = c10::Dispatcher::singleton()
                         .findSchemaOrThrow("fastmnist::linear_cross_entropy_backward", "")
                         .typed<std::tuple<at::Tensor, at::Tensor, at::Tensor>(
                             const at::Tensor&, const at::Tensor&, const at::Tensor&,
                             const std::optional<at::Tensor>&, const at::Tensor&, const std::optional<at::Tensor>&,
                             const at::Tensor&, int64_t, int64_t, int64_t, double, std::array<bool, 3>)>();
    const auto saved = ctx->get_saved_variables();
    const bool has_bias = saved[2].defined();
    const std::array<bool, 3> needs = {ctx->needs_input_grad(0), ctx->needs_input_grad(1),
                                       has_bias && ctx->needs_input_grad(2)};
    const auto mask = ctx->saved_data["mask"].toBoolList();
    const int64_t reduction = ctx->saved_data["reduction"].toInt();
    bool precomputed = reduction != 0;
    for (int i = 0; i < 3; ++i) precomputed = precomputed && (mask[i] || !needs[i]);
    at::Tensor g[3];
    if (precomputed) {  // forward computed the gradients for grad_loss = 1
      for (int i = 0; i < 3; ++i)
        if (needs[i]) g[i] = grads[0].defined() ? grads[0] * saved[6 + i] : at::zeros_like(saved[6 + i]);
    } else {
      auto opt = [](const at::Tensor& t) { return t.defined() ? std::optional<at::Tensor>(t) : std::nullopt; };
      const at::Tensor grad_loss = grad_or_zeros(grads[0], reduction, saved[5].size(0), saved[0]);
      std::tie(g[0], g[1], g[2]) =
          op.call(grad_loss, saved[0], saved[1], opt(saved[2]), saved[3], opt(saved[4]), saved[5],
                  ctx->saved_data["num_classes"].toInt(), ctx->saved_data["ignore_index"].toInt(), reduction,
                  ctx->saved_data["label_smoothing"].toDouble(), needs);
      for (int i = 0; i < 3; ++i)
        if (!needs[i]) g[i] = undefined();
    }
    return {g[0],        g[1],        g[2],        undefined(), undefined(), undefined(),
            undefined(), undefined(), undefined(), undefined()};
  }
};

LinearCEOutputs linear_cross_entropy_autograd(const at::Tensor& x, const at::Tensor& weight,
                                              const std::optional<at::Tensor>& bias, const at::Tensor& target,
                                              const std::optional<at::Tensor>& class_weight, int64_t num_classes,
                                              int64_t ignore_index, int64_t reduction, double label_smoothing,
                                              std::array<bool, 3> grad_mask) {
  auto out = LinearCrossEntropyFn::apply(x, weight, bias, target, class_weight, num_classes, ignore_index, reduction,
                                         label_smoothing,
                                         std::vector<bool>{grad_mask[0], grad_mask[1], grad_mask[2]});
  return {out[0], out[1], out[2], out[3], out[4]};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastmnist, Autograd, m) {
  m.impl("softmax_cross_entropy", &softmax_cross_entropy_autograd);
  m.impl("sigmoid_bce", &sigmoid_bce_autograd);
  m.impl("linear_cross_entropy", &linear_cross_entropy_autograd);
}

}  // namespace fastmnist
