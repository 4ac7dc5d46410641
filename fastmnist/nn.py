"""Drop-in modules: the constructor, defaults, initialisation and state_dict keys of their torch.nn twins."""

import torch
from torch import nn

from . import ops
from .ops._common import check_activation, check_number
from .ops.conv_act_pool import check_conv_activation, check_padding


class FusedLinear(nn.Linear):
    """``activation(nn.Linear(x))`` in one fused op.

    Same parameters (``weight``, ``bias``), initialisation and state_dict as ``nn.Linear``, so
    ``FusedLinear(...).load_state_dict(linear.state_dict())`` gives the same outputs (after the activation).
    """

    def __init__(self, in_features, out_features, bias=True, activation="relu", negative_slope=0.01,
                 device=None, dtype=None):
        check_activation(activation)
        self.negative_slope = check_number("negative_slope", negative_slope)
        self.activation = activation
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ops.linear_act(x, self.weight, self.bias, self.activation, self.negative_slope)

    def extra_repr(self) -> str:
        extra = f", negative_slope={self.negative_slope}" if self.activation == "leaky_relu" else ""
        return f"{super().extra_repr()}, activation={self.activation}{extra}"


class ConvActPool2d(nn.Conv2d):
    """``nn.AvgPool2d(2)(activation(nn.Conv2d(in_channels, out_channels, kernel_size, padding=padding)(x)))``,
    the LeNet block, in one fused op.

    Same parameters (``weight``, ``bias``), initialisation and state_dict as ``nn.Conv2d`` (stride 1, square
    kernel), so a block trained in eager PyTorch loads with ``load_state_dict(conv.state_dict())``.
    """

    def __init__(self, in_channels, out_channels, kernel_size=5, padding=0, bias=True, activation="sigmoid",
                 device=None, dtype=None):
        check_conv_activation(activation)
        if isinstance(kernel_size, (tuple, list)):
            if len(kernel_size) != 2 or kernel_size[0] != kernel_size[1]:
                raise ValueError(f"ConvActPool2d: kernel_size must be square, got {tuple(kernel_size)}")
            kernel_size = kernel_size[0]
        if isinstance(kernel_size, bool) or not isinstance(kernel_size, int) or kernel_size < 1:
            raise ValueError(f"ConvActPool2d: kernel_size must be a positive int, got {kernel_size!r}")
        padding = check_padding(padding)
        self.activation = activation
        super().__init__(in_channels, out_channels, kernel_size, stride=1, padding=padding, bias=bias,
                         device=device, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ops.conv_act_pool(x, self.weight, self.bias, self.padding[0], self.activation)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, activation={self.activation}"
