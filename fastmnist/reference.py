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


def conv_act_pool_reference(x, weight, bias=None, padding=0, activation="sigmoid"):
    """The LeNet block in eager PyTorch: conv (stride 1) -> activation -> 2x2 average pooling (floor)."""
    return F.avg_pool2d(activation_reference(F.conv2d(x, weight, bias, padding=padding), activation), 2)
