// Autograd for linear_act, in C++ (registered for every device under the Autograd key).
//
// A Python autograd formula (torch.library.register_autograd) costs tens of microseconds per call on this
// project's machines, more than the whole layer at the tutorial shapes (a 100 -> 10 layer at batch 64 is a few
// microseconds of math). The forward and backward kernels are ops of their own, called through the
// dispatcher, so torch.compile traces them; their fake kernels are registered from Python.
//
// Saved for backward: x and weight (the GEMM operands) and the output y, from which the activation
// derivative is computed (activation.h).

#include <ATen/ATen.h>
#include <torch/autograd.h>
#include <torch/library.h>

namespace fastmnist {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

struct LinearActFn : torch::autograd::Function<LinearActFn> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& weight,
                            const std::optional<at::Tensor>& bias, c10::string_view activation,
                            double negative_slope) {
    static auto op = c10::Dispatcher::singleton()
                         .findSchemaOrThrow("fastmnist::linear_act", "")
                         .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&,
                                           c10::string_view, double)>();
    at::AutoDispatchBelowADInplaceOrView guard;
    at::Tensor out = op.call(x, weight, bias, activation, negative_slope);
    ctx->save_for_backward({x, weight, out});
    ctx->saved_data["activation"] = std::string(activation);
    ctx->saved_data["negative_slope"] = negative_slope;
    ctx->saved_data["has_bias"] = bias.has_value() && bias->defined();
    return out;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    static auto op = c10::Dispatcher::singleton()
                         .findSchemaOrThrow("fastmnist::linear_act_backward", "")
                         .typed<std::tuple<at::Tensor, at::Tensor, at::Tensor>(
                             const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                             c10::string_view, double, std::array<bool, 3>)>();
    const auto saved = ctx->get_saved_variables();
    const std::array<bool, 3> mask = {ctx->needs_input_grad(0), ctx->needs_input_grad(1),
                                      ctx->saved_data["has_bias"].toBool() && ctx->needs_input_grad(2)};
    const std::string activation = ctx->saved_data["activation"].toStringRef();
    auto [grad_x, grad_w, grad_b] = op.call(grads[0], saved[0], saved[1], saved[2], activation,
                                            ctx->saved_data["negative_slope"].toDouble(), mask);
    return {mask[0] ? grad_x : at::Tensor(), mask[1] ? grad_w : at::Tensor(), mask[2] ? grad_b : at::Tensor(),
            at::Tensor(), at::Tensor()};
  }
};

at::Tensor linear_act_autograd(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                               c10::string_view activation, double negative_slope) {
  return LinearActFn::apply(x, weight, bias, activation, negative_slope);
}

}  // namespace

TORCH_LIBRARY_IMPL(fastmnist, Autograd, m) {
  m.impl("linear_act", &linear_act_autograd);
}

}  // namespace fastmnist
