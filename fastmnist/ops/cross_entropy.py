"""softmax_cross_entropy and linear_cross_entropy (the classifier head): wrappers, fake kernels and autograd.

Autograd is registered in C++ (csrc/loss_autograd.cpp): at the tutorial shapes a Python autograd formula would
cost more than the loss. The wrappers check arguments the way F.cross_entropy / F.linear_cross_entropy do (same exception types), move
the class dimension last and flatten to (rows, C) (a view for (N, C) inputs, one copy for K-dimensional ones),
and call the fused ops, which work on (rows, C) row-major logits.
"""

import math

import torch

from .. import _lib
from ._common import call_op, check_devices, check_number

REDUCTIONS = {"none": 0, "mean": 1, "sum": 2}


def reduction_code(reduction):
    code = REDUCTIONS.get(reduction) if isinstance(reduction, str) else None
    if code is None:
        raise ValueError(f"{reduction} is not a valid value for reduction")
    return code


def check_label_smoothing(label_smoothing):
    label_smoothing = check_number("label_smoothing", label_smoothing)
    if not 0.0 <= label_smoothing <= 1.0:
        raise RuntimeError(f"label_smoothing must be between 0.0 and 1.0. Got: {label_smoothing}")
    return label_smoothing


def _plain_reduction_code(weight, reduction, label_smoothing, target, rows):
    """The fast paths' shared test: the reduction's code when the call uses only the common options (no class
    weights, no label smoothing, a known reduction name) with (rows,) int64 class-index targets and the extension
    loaded; else None, and the caller takes its general path, which checks everything."""
    if (weight is None and label_smoothing == 0.0 and not isinstance(label_smoothing, bool)
            and isinstance(reduction, str) and _lib.LOADED and target.dim() == 1 and target.dtype == torch.int64
            and target.shape[0] == rows):
        return REDUCTIONS.get(reduction)
    return None


def _check_not_differentiable(op, name, tensor):
    if tensor is not None and tensor.requires_grad and torch.is_grad_enabled():
        raise RuntimeError(
            f"{op}: the loss is not differentiable with respect to {name}; this input cannot have requires_grad True"
        )


def normalise_targets(op, logits_shape, logits_dtype, target, weight, ignore_index):
    """Checks target and class weight against logits of shape `logits_shape` as F.cross_entropy does, and
    returns (target as (rows,) int64 or (rows, C) float, loss shape for reduction "none", prob)."""
    ndim = len(logits_shape)
    if ndim == 0:
        raise RuntimeError(f"{op}: logits must have at least one dimension (the classes), got a scalar")
    class_dim = 0 if ndim == 1 else 1
    num_classes = logits_shape[class_dim]
    if weight is not None and (weight.dim() != 1 or weight.numel() != num_classes):
        raise RuntimeError(
            f"weight tensor should be defined either for all {num_classes} classes or no classes but got weight "
            f"tensor of shape: {list(weight.shape)}"
        )
    if weight is not None and weight.dtype != logits_dtype:
        raise RuntimeError(f"{op}: weight has dtype {weight.dtype} but logits have dtype {logits_dtype}")
    if target.is_floating_point():
        if tuple(target.shape) != tuple(logits_shape):
            raise RuntimeError(f"Expected target size {list(logits_shape)}, got {list(target.shape)}")
        if ignore_index >= 0:
            raise RuntimeError("ignore_index is not supported for floating point target")
        if target.dtype != logits_dtype:
            target = target.to(logits_dtype)
        none_shape = tuple(logits_shape[:class_dim]) + tuple(logits_shape[class_dim + 1:])
        if ndim > 2:
            target = target.movedim(1, -1)
        return target.reshape(-1, num_classes), none_shape, True
    if target.dtype == torch.uint8:
        target = target.long()
    elif target.dtype != torch.int64:
        raise RuntimeError(f"expected target dtype to be Long or Byte, but got {str(target.dtype)[6:].capitalize()}")
    if ndim <= 2:
        if target.dim() != ndim - 1:
            raise RuntimeError("0D or 1D target tensor expected, multi-target not supported")
        if ndim == 2 and target.shape[0] != logits_shape[0]:
            raise ValueError(
                f"Expected input batch_size ({logits_shape[0]}) to match target batch_size ({target.shape[0]})."
            )
    else:
        expected = (logits_shape[0], *logits_shape[2:])
        if tuple(target.shape) != expected:
            raise RuntimeError(f"Expected target size {list(expected)}, got {list(target.shape)}")
    return target.reshape(-1), tuple(target.shape), False


def softmax_cross_entropy(logits, target, weight=None, ignore_index=-100, reduction="mean", label_smoothing=0.0):
    """Fused, numerically stable ``F.cross_entropy(logits, target, weight, ignore_index=..., reduction=...,
    label_smoothing=...)``.

    logits: (C,), (N, C) or (N, C, d1, ...), float32 or float64. target: class indices (int64, shape (), (N,) or
    (N, d1, ...)) or class probabilities (the shape of logits). weight: (C,) class weights (not differentiable).
    """
    # Fast path for the common call (the loss runs once per step on tiny tensors, where Python checks show):
    # (N, C) logits, (N,) int64 targets, no class weights or smoothing. It checks what the general path checks.
    code = _plain_reduction_code(weight, reduction, label_smoothing, target, logits.shape[0]) \
        if logits.dim() == 2 else None
    if code is not None:
        return call_op("softmax_cross_entropy", logits, target, None, ignore_index, code, 0.0)[0]
    return _softmax_cross_entropy(logits, target, weight, ignore_index, reduction, label_smoothing)


def _softmax_cross_entropy(logits, target, weight, ignore_index, reduction, label_smoothing):
    """The general path of softmax_cross_entropy."""
    op = "softmax_cross_entropy"
    code = reduction_code(reduction)
    label_smoothing = check_label_smoothing(label_smoothing)
    check_devices(op, logits, target, weight)
    _check_not_differentiable(op, "weight", weight)
    target2d, none_shape, _ = normalise_targets(op, logits.shape, logits.dtype, target, weight, ignore_index)
    if logits.dim() == 1:
        logits2d = logits.unsqueeze(0)
    elif logits.dim() == 2:
        logits2d = logits
    else:
        logits2d = logits.movedim(1, -1).reshape(-1, logits.shape[1])
    loss = call_op("softmax_cross_entropy", logits2d, target2d, weight, ignore_index, code, label_smoothing)[0]
    return loss.view(none_shape) if code == 0 else loss


def linear_cross_entropy(input, linear_weight, target, linear_bias=None, *, weight=None, reduction="mean",
                         ignore_index=None, label_smoothing=0.0):
    """The classifier head ``F.cross_entropy(F.linear(input, linear_weight, linear_bias), target, ...)`` as one op
    that never stores the logits (the semantics and signature of torch's ``F.linear_cross_entropy``;
    ``linear_bias`` may also be given positionally).

    input: (in_features,) or (N, in_features). linear_weight: (C, in_features), or (C, d1, ..., dK, in_features)
    for a K-dimensional loss (logits (N, C, d1, ...)). linear_bias: (C, d1, ..., dK). weight: (C,) class weights.
    ignore_index: None means -100 (and must be None with probability targets).
    Memory: the logits are computed and consumed in chunks of about 4 MiB; eager keeps the (N, C) logits and
    their log-softmax (2 N C floats) for backward.
    """
    # Fast path for the common call, as in softmax_cross_entropy: (N, in) input, (C, in) weight, (C,) or no bias,
    # (N,) int64 targets, no class weights or smoothing. It checks what the general path checks.
    code = None
    if (ignore_index is None and input.dim() == 2 and linear_weight.dim() == 2
            and input.shape[1] == linear_weight.shape[1]
            and (linear_bias is None or tuple(linear_bias.shape) == (linear_weight.shape[0],))):
        code = _plain_reduction_code(weight, reduction, label_smoothing, target, input.shape[0])
    if code is not None:
        grad = torch.is_grad_enabled()
        mask = [grad and input.requires_grad, grad and linear_weight.requires_grad,
                grad and linear_bias is not None and linear_bias.requires_grad]
        return call_op("linear_cross_entropy", input, linear_weight, linear_bias, target, None,
                       linear_weight.shape[0], -100, code, 0.0, mask)[0]
    op = "linear_cross_entropy"
    if input.dim() < 1 or input.dim() > 2:
        raise RuntimeError(f"expected input with dimensionality 1 or 2, got {input.dim()}")
    if linear_weight.dim() < 2:
        raise RuntimeError(f"expected linear_weight with dimensionality at least 2, got {linear_weight.dim()}")
    in_features = input.shape[-1]
    if in_features != linear_weight.shape[-1]:
        raise RuntimeError(
            "expected equal input and linear_weight last dimensions (in_features), "
            f"got {input.shape[-1]} and {linear_weight.shape[-1]}, respectively"
        )
    num_classes = linear_weight.shape[0]
    out_features = tuple(linear_weight.shape[1:-1])
    if linear_bias is not None and tuple(linear_bias.shape) != (num_classes, *out_features):
        raise RuntimeError(f"expected linear_bias shape {(num_classes, *out_features)}, got {tuple(linear_bias.shape)}")
    if out_features and input.dim() == 1:
        raise RuntimeError(
            f"K-dimensional loss defined by linear_weight shape {tuple(linear_weight.shape)} requires"
            f" batched input, (N, {in_features}), got unbatched input with shape {tuple(input.shape)}"
        )
    logits_shape = (*input.shape[:-1], num_classes, *out_features)
    if tuple(target.shape) == logits_shape and ignore_index is not None:
        raise RuntimeError("ignore_index cannot be specified when target contains probabilities")
    ignore_index = -100 if ignore_index is None else ignore_index
    code = reduction_code(reduction)
    label_smoothing = check_label_smoothing(label_smoothing)
    check_devices(op, input, linear_weight, target, linear_bias, weight)
    _check_not_differentiable(op, "weight", weight)
    _check_not_differentiable(op, "target", target)
    target2d, none_shape, _ = normalise_targets(op, logits_shape, input.dtype, target, weight, ignore_index)
    x = input.unsqueeze(0) if input.dim() == 1 else input
    w, b = linear_weight, linear_bias
    if out_features:
        # rows of the GEMM output ordered (d, c), so that each group of C classes is contiguous
        d = math.prod(out_features)
        w = w.reshape(num_classes, d, in_features).transpose(0, 1).reshape(d * num_classes, in_features)
        if b is not None:
            b = b.reshape(num_classes, d).t().reshape(-1)
    grad = torch.is_grad_enabled()
    mask = [grad and x.requires_grad, grad and w.requires_grad, grad and b is not None and b.requires_grad]
    loss = call_op("linear_cross_entropy", x, w, b, target2d, weight, num_classes, ignore_index, code, label_smoothing,
                   mask)[0]
    return loss.view(none_shape) if code == 0 else loss


def _softmax_cross_entropy_fake(logits, target, weight, ignore_index, reduction, label_smoothing):
    torch._check(logits.dim() == 2, lambda: "softmax_cross_entropy: logits must be (rows, C)")
    rows = logits.shape[0]
    loss = logits.new_empty((rows,)) if reduction == 0 else logits.new_empty(())
    return loss, logits.new_empty((rows,), dtype=torch.float64)


def _softmax_cross_entropy_backward_fake(grad_loss, logits, target, weight, lse, ignore_index, reduction,
                                         label_smoothing, output_mask):
    def empty():  # a distinct tensor per output: outputs must not alias
        return logits.new_empty((0,))

    grad = torch.empty_like(logits) if output_mask[0] else empty()
    grad_target = torch.empty_like(logits) if output_mask[1] and target.is_floating_point() else empty()
    return grad, grad_target


def _linear_cross_entropy_fake(x, weight, bias, target, class_weight, num_classes, ignore_index, reduction,
                               label_smoothing, grad_mask):
    rows = x.shape[0] * (weight.shape[0] // num_classes)
    loss = x.new_empty((rows,)) if reduction == 0 else x.new_empty(())
    lse = x.new_empty((rows,), dtype=torch.float64)
    def empty():  # a distinct tensor per output: outputs must not alias
        return x.new_empty((0,))

    pre = reduction != 0
    grad_x = torch.empty_like(x) if pre and grad_mask[0] else empty()
    grad_w = torch.empty_like(weight) if pre and grad_mask[1] else empty()
    grad_b = weight.new_empty((weight.shape[0],)) if pre and grad_mask[2] and bias is not None else empty()
    return loss, lse, grad_x, grad_w, grad_b


def _linear_cross_entropy_backward_fake(grad_loss, x, weight, bias, target, class_weight, lse, num_classes,
                                        ignore_index, reduction, label_smoothing, output_mask):
    def empty():  # a distinct tensor per output: outputs must not alias
        return x.new_empty((0,))

    grad_x = torch.empty_like(x) if output_mask[0] else empty()
    grad_w = torch.empty_like(weight) if output_mask[1] else empty()
    grad_b = weight.new_empty((weight.shape[0],)) if output_mask[2] and bias is not None else empty()
    return grad_x, grad_w, grad_b


if _lib.LOADED:
    torch.library.register_fake("fastmnist::softmax_cross_entropy")(_softmax_cross_entropy_fake)
    torch.library.register_fake("fastmnist::softmax_cross_entropy_backward")(_softmax_cross_entropy_backward_fake)
    torch.library.register_fake("fastmnist::linear_cross_entropy")(_linear_cross_entropy_fake)
    torch.library.register_fake("fastmnist::linear_cross_entropy_backward")(_linear_cross_entropy_backward_fake)
