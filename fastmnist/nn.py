"""Drop-in modules: the constructor, defaults, initialisation and state_dict keys of their torch.nn twins."""

import torch
from torch import nn

from . import ops
from .ops._common import check_activation, check_number


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
