"""Plain-PyTorch references for every fused op: the ground truth of the tests and the baselines of the
benchmarks."""

import torch
import torch.nn.functional as F


def activation_reference(z, activation, negative_slope=0.01):
    if activation == "identity":
        return z
    if activation == "relu":
        return F.relu(z)
    if activation == "leaky_relu":
        return F.leaky_relu(z, negative_slope)
    if activation == "sigmoid":
        return torch.sigmoid(z)
    if activation == "tanh":
        return torch.tanh(z)
    raise ValueError(f"unknown activation {activation!r}")


def linear_act_reference(x, weight, bias=None, activation="relu", negative_slope=0.01):
    return activation_reference(F.linear(x, weight, bias), activation, negative_slope)


def softmax_cross_entropy_reference(logits, target, weight=None, ignore_index=-100, reduction="mean",
                                    label_smoothing=0.0):
    return F.cross_entropy(logits, target, weight=weight, ignore_index=ignore_index, reduction=reduction,
                           label_smoothing=label_smoothing)


def sigmoid_bce_reference(logits, target, weight=None, pos_weight=None, reduction="mean"):
    return F.binary_cross_entropy_with_logits(logits, target, weight=weight, pos_weight=pos_weight,
                                              reduction=reduction)


def linear_cross_entropy_composition(input, linear_weight, target, linear_bias=None, *, weight=None,
                                     reduction="mean", ignore_index=None, label_smoothing=0.0):
    """F.linear_cross_entropy's documented meaning: cross_entropy(linear(input, W, b).reshape(logits), ...)."""
    num_classes, out_features = linear_weight.shape[0], tuple(linear_weight.shape[1:-1])
    logits_shape = (*input.shape[:-1], num_classes, *out_features)
    flat_w = linear_weight.reshape(-1, linear_weight.shape[-1])
    flat_b = linear_bias.reshape(-1) if linear_bias is not None else None
    logits = F.linear(input, flat_w, flat_b).reshape(logits_shape)
    return F.cross_entropy(logits, target, weight=weight, reduction=reduction,
                           ignore_index=-100 if ignore_index is None else ignore_index,
                           label_smoothing=label_smoothing)


def linear_cross_entropy_reference(input, linear_weight, target, linear_bias=None, *, weight=None,
                                   reduction="mean", ignore_index=None, label_smoothing=0.0):
    """torch's F.linear_cross_entropy where it exists (torch >= 2.13), else its composition."""
    fn = getattr(F, "linear_cross_entropy", None)
    if fn is None:
        return linear_cross_entropy_composition(input, linear_weight, target, linear_bias, weight=weight,
                                                reduction=reduction, ignore_index=ignore_index,
                                                label_smoothing=label_smoothing)
    return fn(input, linear_weight, target, linear_bias=linear_bias, weight=weight, reduction=reduction,
              ignore_index=ignore_index, label_smoothing=label_smoothing)


def conv_act_pool_reference(x, weight, bias=None, padding=0, activation="sigmoid"):
    """The LeNet block in eager PyTorch: conv (stride 1) -> activation -> 2x2 average pooling (floor)."""
    return F.avg_pool2d(activation_reference(F.conv2d(x, weight, bias, padding=padding), activation), 2)
