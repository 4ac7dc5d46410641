"""linear_act: activation(x @ weight.T + bias), fused, with its autograd and fake kernels."""

import torch

from .. import _lib
from ._common import check_activation, check_devices, check_number, empty_if_unneeded


def linear_act(x, weight, bias=None, activation="relu", negative_slope=0.01):
    """Fused ``activation(F.linear(x, weight, bias))``.

    x: (*, in_features); weight: (out_features, in_features); bias: (out_features,) or None.
    activation: "identity", "relu", "leaky_relu" (with ``negative_slope`` >= 0), "sigmoid" or "tanh".
    Returns (*, out_features). float32 or float64.
    """
    check_activation(activation)
    negative_slope = check_number("negative_slope", negative_slope)
    check_devices("linear_act", x, weight, bias)
    return torch.ops.fastmnist.linear_act(x, weight, bias, activation, negative_slope)


def _linear_act_fake(x, weight, bias, activation, negative_slope):
    torch._check(x.dim() >= 1, lambda: "linear_act: x must have shape (*, in_features)")
    torch._check(weight.dim() == 2, lambda: "linear_act: weight must have 2 dimensions")
    torch._check(x.shape[-1] == weight.shape[1], lambda: "linear_act: in_features mismatch")
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


def _linear_act_backward_fake(grad_out, x, weight, out, activation, negative_slope, output_mask):
    empty = x.new_empty((0,))
    grad_x = torch.empty_like(x) if output_mask[0] else empty
    grad_weight = torch.empty_like(weight) if output_mask[1] else empty
    grad_bias = weight.new_empty((weight.shape[0],)) if output_mask[2] else empty
    return grad_x, grad_weight, grad_bias


def _setup_context(ctx, inputs, output):
    x, weight, bias, activation, negative_slope = inputs
    # The activation derivative is a function of the output, so the output is all backward needs besides the
    # GEMM operands.
    ctx.save_for_backward(x, weight, output)
    ctx.activation = activation
    ctx.negative_slope = negative_slope
    ctx.has_bias = bias is not None


def _backward(ctx, grad_out):
    x, weight, out = ctx.saved_tensors
    mask = [ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.has_bias and ctx.needs_input_grad[2]]
    grad_x, grad_weight, grad_bias = torch.ops.fastmnist.linear_act_backward(
        grad_out, x, weight, out, ctx.activation, ctx.negative_slope, mask
    )
    return (
        empty_if_unneeded(mask[0], grad_x),
        empty_if_unneeded(mask[1], grad_weight),
        empty_if_unneeded(mask[2], grad_bias),
        None,
        None,
    )


if _lib.LOADED:
    torch.library.register_fake("fastmnist::linear_act")(_linear_act_fake)
    torch.library.register_fake("fastmnist::linear_act_backward")(_linear_act_backward_fake)
    torch.library.register_autograd("fastmnist::linear_act", _backward, setup_context=_setup_context)
