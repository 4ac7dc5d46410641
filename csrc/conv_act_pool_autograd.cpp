// Autograd for conv_act_pool (the LeNet block), in C++ like the other ops' (see linear_act_autograd.cpp):
// a Python autograd formula costs tens of microseconds per call, as much as the block at batch 1.
//
// Saved for backward: x and weight (for the convolution gradients) and `act`, the activation output at the
// conv positions the pooling reads; the activation derivative is a function of it (activation.h). The op
// writes `act` only when the caller asks (save_act: fastmnist.conv_act_pool asks whenever a gradient will be
// needed and the activation is not the identity).

#include <ATen/ATen.h>
#include <torch/autograd.h>
#include <torch/library.h>

namespace fastmnist {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

struct ConvActPoolFn : torch::autograd::Function<ConvActPoolFn> {
  static variable_list forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& weight,
                               const std::optional<at::Tensor>& bias, int64_t padding, c10::string_view activation,
                               bool save_act) {
    static auto op = c10::Dispatcher::singleton()
                         .findSchemaOrThrow("fastmnist::conv_act_pool", "")
                         .typed<std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&,
                                                                    const std::optional<at::Tensor>&, int64_t,
                                                                    c10::string_view, bool)>();
    at::AutoDispatchBelowADInplaceOrView guard;
    auto [out, act] = op.call(x, weight, bias, padding, activation, save_act);
    ctx->save_for_backward({x, weight, act});
    ctx->mark_non_differentiable({act});
    // No zero gradient for `act` (or an unused `out`): the engine would otherwise fill one of act's size, 4x the
    // output, on every backward (half a millisecond for the first LeNet block at batch 256).
    ctx->set_materialize_grads(false);
    ctx->saved_data["padding"] = padding;
    ctx->saved_data["activation"] = std::string(activation);
    ctx->saved_data["save_act"] = save_act;
    ctx->saved_data["has_bias"] = bias.has_value() && bias->defined();
    return {out, act};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    static auto op = c10::Dispatcher::singleton()
                         .findSchemaOrThrow("fastmnist::conv_act_pool_backward", "")
                         .typed<std::tuple<at::Tensor, at::Tensor, at::Tensor>(
                             const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, int64_t,
                             c10::string_view, std::array<bool, 3>)>();
    const std::string activation = ctx->saved_data["activation"].toStringRef();
    TORCH_CHECK(ctx->saved_data["save_act"].toBool() || activation == "identity",
                "conv_act_pool: backward needs the activation, but the op ran with save_act=False; call it with "
                "save_act=True (fastmnist.conv_act_pool does so whenever a gradient is needed)");
    const auto saved = ctx->get_saved_variables();
    if (!grads[0].defined()) return variable_list(6);  // nothing flowed into `out`: every gradient is zero
    const std::array<bool, 3> mask = {ctx->needs_input_grad(0), ctx->needs_input_grad(1),
                                      ctx->saved_data["has_bias"].toBool() && ctx->needs_input_grad(2)};
    auto [grad_x, grad_w, grad_b] = op.call(grads[0], saved[0], saved[1], saved[2],
                                            ctx->saved_data["padding"].toInt(), activation, mask);
    return {mask[0] ? grad_x : at::Tensor(), mask[1] ? grad_w : at::Tensor(), mask[2] ? grad_b : at::Tensor(),
            at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

std::tuple<at::Tensor, at::Tensor> conv_act_pool_autograd(const at::Tensor& x, const at::Tensor& weight,
                                                          const std::optional<at::Tensor>& bias, int64_t padding,
                                                          c10::string_view activation, bool save_act) {
  auto out = ConvActPoolFn::apply(x, weight, bias, padding, activation, save_act);
  return {out[0], out[1]};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastmnist, Autograd, m) {
  m.impl("conv_act_pool", &conv_act_pool_autograd);
}

}  // namespace fastmnist
