"""conv_act_pool: avg_pool2d(activation(conv2d(x, weight, bias, padding=padding)), 2), fused (the LeNet block),
the Python wrapper and the fake kernels (autograd is in C++, csrc/conv_act_pool_autograd.cpp)."""

import numbers

import torch

from .. import _lib
from ._common import call_op, check_devices

ACTIVATIONS = ("identity", "relu", "sigmoid", "tanh")


def check_conv_activation(activation):
    if activation not in ACTIVATIONS:
        raise ValueError(f"conv_act_pool: unknown activation {activation!r}; expected one of {', '.join(ACTIVATIONS)}")


def check_padding(padding):
    if isinstance(padding, bool) or not isinstance(padding, numbers.Integral):
        raise TypeError(f"conv_act_pool: padding must be an int, got {type(padding).__name__}")
    if padding < 0:
        raise ValueError(f"conv_act_pool: padding must be >= 0, got {padding}")
    return int(padding)


def conv_act_pool(x, weight, bias=None, padding=0, activation="sigmoid"):
    """Fused ``F.avg_pool2d(activation(F.conv2d(x, weight, bias, stride=1, padding=padding)), 2)``.

    x: (N, C_in, H, W) or (C_in, H, W); weight: (C_out, C_in, k, k) (square); bias: (C_out,) or None.
    activation: "sigmoid", "relu", "tanh" or "identity". Odd conv-output sizes are pooled with floor, as
    ``nn.AvgPool2d(2)``. Returns (N, C_out, H_out, W_out). float32 or float64.
    """
    check_conv_activation(activation)
    padding = check_padding(padding)
    check_devices("conv_act_pool", x, weight, bias)
    for name, t in (("weight", weight), ("bias", bias)):
        if isinstance(t, torch.Tensor) and isinstance(x, torch.Tensor) and t.device != x.device:
            raise ValueError(f"conv_act_pool: {name} is on {t.device} but x is on {x.device}; they must be on the "
                             "same device")
    # The activation is saved for backward only when a gradient will be asked for (the identity needs none).
    needs_grad = torch.is_grad_enabled() and any(
        isinstance(t, torch.Tensor) and t.requires_grad for t in (x, weight, bias)
    )
    out, _ = call_op("conv_act_pool", x, weight, bias, padding, activation, needs_grad and activation != "identity")
    return out


def _pooled_size(x, weight, padding):
    k = weight.shape[-1]
    return (x.shape[-2] + 2 * padding - k + 1) // 2, (x.shape[-1] + 2 * padding - k + 1) // 2


def _conv_act_pool_fake(x, weight, bias, padding, activation, save_act):
    torch._check(x.dim() in (3, 4), lambda: "conv_act_pool: x must have 3 or 4 dimensions")
    torch._check(weight.dim() == 4, lambda: "conv_act_pool: weight must have 4 dimensions")
    torch._check(weight.shape[2] == weight.shape[3], lambda: "conv_act_pool: the kernel must be square")
    torch._check(x.shape[-3] == weight.shape[1], lambda: "conv_act_pool: channel mismatch")
    torch._check(padding >= 0, lambda: "conv_act_pool: padding must be >= 0")
    ho, wo = _pooled_size(x, weight, padding)
    torch._check(ho >= 1 and wo >= 1, lambda: "conv_act_pool: output smaller than one pooling window")
    lead = tuple(x.shape[:-3])
    out = x.new_empty((*lead, weight.shape[0], ho, wo))
    act = x.new_empty((*lead, weight.shape[0], 2 * ho, 2 * wo)) if save_act else x.new_empty((0,))
    return out, act


def _conv_act_pool_backward_fake(grad_out, x, weight, act, padding, activation, output_mask):
    # unneeded gradients are distinct empty tensors, as the kernel returns them (no aliasing)
    grad_x = x.new_empty(x.shape if output_mask[0] else (0,))
    grad_weight = weight.new_empty(weight.shape if output_mask[1] else (0,))
    grad_bias = weight.new_empty((weight.shape[0],) if output_mask[2] else (0,))
    return grad_x, grad_weight, grad_bias


if _lib.LOADED:
    torch.library.register_fake("fastmnist::conv_act_pool")(_conv_act_pool_fake)
    torch.library.register_fake("fastmnist::conv_act_pool_backward")(_conv_act_pool_backward_fake)
    # autograd is registered in C++ (csrc/conv_act_pool_autograd.cpp), like the other ops'

