"""sigmoid_bce: the fused, stable sigmoid + binary cross-entropy (F.binary_cross_entropy_with_logits), with its
fake kernels (autograd is registered in C++, csrc/loss_autograd.cpp)."""

import math

import torch

from .. import _lib
from ._common import call_op, check_devices
from .cross_entropy import REDUCTIONS, _check_not_differentiable, reduction_code


def _per_class(op, name, t, shape):
    """weight / pos_weight as the kernel takes them: (C,) when it only varies along the last dimension, else the
    full (rows, C); raises as eager does when it does not broadcast to the input's shape."""
    if t is None:
        return None
    try:
        fits = torch.broadcast_shapes(t.shape, shape) == shape
    except RuntimeError:
        fits = False
    if not fits:
        raise RuntimeError(f"{op}: {name} of shape {tuple(t.shape)} does not broadcast to the input shape {tuple(shape)}")
    c = shape[-1] if len(shape) > 0 else 1
    if t.numel() == 1:
        return t.reshape(1).expand(c)
    if t.dim() >= 1 and t.shape[-1] == c and t.numel() == c:
        return t.reshape(c)
    return t.expand(shape).reshape(math.prod(shape[:-1]), c)


def sigmoid_bce(logits, target, weight=None, pos_weight=None, reduction="mean"):
    """Fused, numerically stable ``F.binary_cross_entropy_with_logits(logits, target, weight, reduction=...,
    pos_weight=...)``. weight and pos_weight broadcast to the input's shape (not differentiable); the loss is
    differentiable in logits and target."""
    # Fast path for the common call: (N, C) logits and targets of one dtype, no weights.
    if (weight is None and pos_weight is None and isinstance(reduction, str) and reduction in REDUCTIONS
            and _lib.LOADED and logits.dim() == 2 and target.shape == logits.shape
            and target.dtype == logits.dtype):
        return call_op("sigmoid_bce", logits, target, None, None, REDUCTIONS[reduction])
    op = "sigmoid_bce"
    code = reduction_code(reduction)
    if target.shape != logits.shape:
        raise ValueError(f"Target size ({target.shape}) must be the same as input size ({logits.shape})")
    if not target.is_floating_point():
        raise RuntimeError(f"{op}: target must be a floating-point tensor (probabilities), got {target.dtype}")
    check_devices(op, logits, target, weight, pos_weight)
    _check_not_differentiable(op, "weight", weight)
    _check_not_differentiable(op, "pos_weight", pos_weight)
    if target.dtype != logits.dtype:
        target = target.to(logits.dtype)
    shape = logits.shape
    c = shape[-1] if len(shape) > 0 else 1
    w = _per_class(op, "weight", weight, shape)
    pw = _per_class(op, "pos_weight", pos_weight, shape)
    rows = math.prod(shape[:-1])
    loss = call_op("sigmoid_bce", logits.reshape(rows, c), target.reshape(rows, c), w, pw, code)
    return loss.view(shape) if code == 0 else loss


def _sigmoid_bce_fake(logits, target, weight, pos_weight, reduction):
    return torch.empty_like(logits) if reduction == 0 else logits.new_empty(())


def _sigmoid_bce_backward_fake(grad_loss, logits, target, weight, pos_weight, reduction, output_mask):
    def empty():  # a distinct tensor per output: outputs must not alias
        return logits.new_empty((0,))

    return (torch.empty_like(logits) if output_mask[0] else empty(),
            torch.empty_like(logits) if output_mask[1] else empty())


if _lib.LOADED:
    torch.library.register_fake("fastmnist::sigmoid_bce")(_sigmoid_bce_fake)
    torch.library.register_fake("fastmnist::sigmoid_bce_backward")(_sigmoid_bce_backward_fake)
