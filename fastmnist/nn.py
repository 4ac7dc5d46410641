"""Drop-in modules: the constructor, defaults, initialisation and state_dict keys of their torch.nn twins."""

import math

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


class SoftmaxCrossEntropyLoss(nn.CrossEntropyLoss):
    """``nn.CrossEntropyLoss`` (same constructor, defaults and state_dict) computed by the fused
    ``softmax_cross_entropy``."""

    def forward(self, input: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return ops.softmax_cross_entropy(input, target, weight=self.weight, ignore_index=self.ignore_index,
                                         reduction=self.reduction, label_smoothing=self.label_smoothing)


class SigmoidBCELoss(nn.BCEWithLogitsLoss):
    """``nn.BCEWithLogitsLoss`` (same constructor, defaults and state_dict) computed by the fused ``sigmoid_bce``."""

    def forward(self, input: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return ops.sigmoid_bce(input, target, weight=self.weight, pos_weight=self.pos_weight,
                               reduction=self.reduction)


class LinearCrossEntropyLoss(nn.modules.loss._WeightedLoss):
    """The classifier head: a ``Linear`` layer followed by softmax cross-entropy, fused by
    ``linear_cross_entropy`` so that the logits are never stored.

    The constructor, parameters (``linear.weight``, ``linear.bias``, stored flat as (C * prod(out_features),
    in_features)), initialisation and state_dict of torch's ``nn.LinearCrossEntropyLoss`` (torch >= 2.13; this
    module also works where torch lacks it). ``options`` (torch's chunking options) is accepted and ignored:
    the fused op always works in chunks.
    """

    def __init__(self, in_features, num_classes, *, out_features=(), bias=False, device=None, dtype=None,
                 reduction="mean", weight=None, ignore_index=None, label_smoothing=0.0, options=None):
        if weight is not None and weight.shape != (num_classes,):
            raise RuntimeError(f"expected weight shape to be {(num_classes,)}, got {tuple(weight.shape)}")
        if label_smoothing < 0 or label_smoothing > 1.0:
            raise RuntimeError(f"expected label_smoothing to be in range [0, 1], got {label_smoothing}")
        super().__init__(weight=weight, size_average=None, reduce=None, reduction=reduction)
        self.num_classes = num_classes
        self.out_features = tuple(out_features)
        self.ignore_index = ignore_index
        self.label_smoothing = label_smoothing
        self.linear = nn.Linear(in_features, math.prod(self.out_features, start=num_classes), bias=bias,
                                device=device, dtype=dtype)
        self.options = options

    def forward(self, input: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        weight = self.linear.weight.reshape(self.num_classes, *self.out_features, self.linear.in_features)
        bias = self.linear.bias
        if bias is not None:
            bias = bias.reshape(self.num_classes, *self.out_features)
        return ops.linear_cross_entropy(input, weight, target, bias, weight=self.weight, reduction=self.reduction,
                                        ignore_index=self.ignore_index, label_smoothing=self.label_smoothing)

    def extra_repr(self) -> str:
        return (f"in_features={self.linear.in_features}, num_classes={self.num_classes}, "
                f"out_features={self.out_features}, bias={self.linear.bias is not None}, reduction={self.reduction}, "
                f"ignore_index={self.ignore_index}, label_smoothing={self.label_smoothing}")


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
