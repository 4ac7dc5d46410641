"""linear_act: activation(x @ weight.T + bias), fused: the Python wrapper and the fake kernels (autograd is in
C++, csrc/linear_act_autograd.cpp)."""

import torch

from .. import _lib
from ._common import call_op, check_activation, check_number


def linear_act(x, weight, bias=None, activation="relu", negative_slope=0.01):
    """Fused ``activation(F.linear(x, weight, bias))``.

    x: (*, in_features); weight: (out_features, in_features); bias: (out_features,) or None.
    activation: "identity", "relu", "leaky_relu" (with ``negative_slope`` >= 0), "sigmoid" or "tanh".
    Returns (*, out_features). float32 or float64.
    """
    check_activation(activation)
    negative_slope = check_number("negative_slope", negative_slope)
    return call_op("linear_act", x, weight, bias, activation, negative_slope)


def _linear_act_fake(x, weight, bias, activation, negative_slope):
    torch._check(x.dim() >= 1, lambda: "linear_act: x must have shape (*, in_features)")
    torch._check(weight.dim() == 2, lambda: "linear_act: weight must have 2 dimensions")
    torch._check(x.shape[-1] == weight.shape[1], lambda: "linear_act: in_features mismatch")
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


def _linear_act_backward_fake(grad_out, x, weight, out, activation, negative_slope, output_mask):
    # outputs must not alias each other: a fresh empty tensor for each gradient that is not requested
    grad_x = torch.empty_like(x) if output_mask[0] else x.new_empty((0,))
    grad_weight = torch.empty_like(weight) if output_mask[1] else x.new_empty((0,))
    grad_bias = weight.new_empty((weight.shape[0],)) if output_mask[2] else x.new_empty((0,))
    return grad_x, grad_weight, grad_bias


if _lib.LOADED:
    torch.library.register_fake("fastmnist::linear_act")(_linear_act_fake)
    torch.library.register_fake("fastmnist::linear_act_backward")(_linear_act_backward_fake)
    # autograd is registered in C++ (csrc/linear_act_autograd.cpp): a Python formula costs more than the layer
