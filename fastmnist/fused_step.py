"""The fused training step: forward, loss, backward and optimizer update in one call into C++.

    step = fastmnist.fused_step(model, loss_fn, optimizer)
    for x, target in batches:
        loss = step(x, target)          # a Python float; step.logits holds the batch's logits

or, with the whole data set as two tensors and the batch as their rows `idx` (a shuffled epoch):

        loss = step(x_all, target_all, index=idx)

which gathers the batch inside the step (where the first layer is a linear layer with few outputs, 64 at most
with AVX2 and 16 with AVX-512, as in softmax regression and the two-layer net, it reads the rows in place, no
copy).

The step updates the model's own parameter tensors in place and keeps the optimizer's state in torch.optim's
format (``momentum_buffer``; ``step``, ``exp_avg``, ``exp_avg_sq``), so fused steps, eager steps,
``optimizer.state_dict()`` / ``load_state_dict()`` and learning-rate schedulers mix freely. It does not fill
``param.grad`` and does not run the optimizer's step hooks. Anything it cannot run exactly as eager PyTorch
would raises FusionError naming the part.
"""

from __future__ import annotations

import torch
from torch import nn

from . import _lib
from . import nn as fnn
from .models import SigmoidMSELoss

SUPPORTED_LAYERS = "FusedLinear, ConvActPool2d, Flatten, LayerNorm"


class FusionError(ValueError):
    """The model, loss or optimizer has a part the fused step cannot run."""


def _leaf_layers(model):
    if isinstance(model, nn.Sequential):
        for name, child in model.named_children():
            for sub_name, leaf in _leaf_layers(child):
                yield (f"{name}.{sub_name}" if sub_name else name), leaf
    else:
        yield "", model


def _add_layer(impl, name, layer):
    label = f"layer '{name}' ({type(layer).__name__})" if name else f"layer {type(layer).__name__}"
    if isinstance(layer, fnn.FusedLinear):
        impl.add_linear(layer.weight, layer.bias, layer.activation, layer.negative_slope)
    elif isinstance(layer, nn.Flatten):
        if layer.start_dim != 1 or layer.end_dim != -1:
            raise FusionError(f"fused_step: {label}: only Flatten(start_dim=1, end_dim=-1) is supported")
        impl.add_flatten()
    elif isinstance(layer, nn.LayerNorm):
        if len(layer.normalized_shape) != 1 or layer.weight is None or layer.bias is None:
            raise FusionError(f"fused_step: {label}: only LayerNorm over the last dimension with an affine "
                              "weight and bias is supported")
        impl.add_layer_norm(layer.weight, layer.bias, layer.eps)
    elif isinstance(layer, fnn.ConvActPool2d):
        impl.add_conv_act_pool(layer.weight, layer.bias, layer.padding[0], layer.activation)
    else:
        raise FusionError(f"fused_step: {label} is not supported; supported layers: {SUPPORTED_LAYERS}")


def _loss_kind(loss_fn):
    name = type(loss_fn).__name__
    if isinstance(loss_fn, nn.CrossEntropyLoss):  # fnn.SoftmaxCrossEntropyLoss included
        if (loss_fn.weight is not None or loss_fn.reduction != "mean" or loss_fn.label_smoothing != 0
                or loss_fn.ignore_index != -100):
            raise FusionError(f"fused_step: loss {name}: only the defaults (no class weight, reduction='mean', "
                              "label_smoothing=0, ignore_index=-100) are supported")
        return "cross_entropy"
    if isinstance(loss_fn, nn.BCEWithLogitsLoss):  # fnn.SigmoidBCELoss included
        if loss_fn.weight is not None or loss_fn.pos_weight is not None or loss_fn.reduction != "mean":
            raise FusionError(f"fused_step: loss {name}: only the defaults (no weight, no pos_weight, "
                              "reduction='mean') are supported")
        return "sigmoid_bce"
    if isinstance(loss_fn, SigmoidMSELoss):
        return "sigmoid_mse"
    raise FusionError(f"fused_step: loss {name} is not supported; supported: SoftmaxCrossEntropyLoss / "
                      "CrossEntropyLoss, SigmoidBCELoss / BCEWithLogitsLoss, SigmoidMSELoss")


def _optimizer_kind(optimizer):
    name = type(optimizer).__name__
    if len(optimizer.param_groups) != 1:
        raise FusionError(f"fused_step: optimizer {name}: only one parameter group is supported")
    group = optimizer.param_groups[0]
    for flag in ("maximize", "differentiable", "capturable", "amsgrad", "fused"):
        if group.get(flag):
            raise FusionError(f"fused_step: optimizer {name}: {flag}=True is not supported")
    if type(optimizer) is torch.optim.SGD:
        return "sgd"
    if type(optimizer) in (torch.optim.Adam, torch.optim.AdamW):
        return "adam"
    raise FusionError(f"fused_step: optimizer {name} is not supported; supported: SGD, Adam, AdamW")


class FusedStep:
    """The callable returned by fused_step(); see the module docstring."""

    def __init__(self, model, loss_fn, optimizer):
        _lib.require_library()
        from . import _C

        self._impl = torch.classes.fastmnist.FusedStep()
        self._run = _C.fused_step  # self._impl.step without TorchScript's method call (~3 us less per step)
        for name, layer in _leaf_layers(model):
            _add_layer(self._impl, name, layer)
        self._impl.set_loss(_loss_kind(loss_fn))
        self._optimizer_kind = _optimizer_kind(optimizer)
        self.optimizer = optimizer
        self.params = [p for _, layer in _leaf_layers(model) for p in (getattr(layer, "weight", None),
                                                                       getattr(layer, "bias", None))
                       if p is not None]
        model_params = list(model.parameters())
        if {id(p) for p in self.params} != {id(p) for p in model_params} or len(self.params) != len(model_params):
            raise FusionError("fused_step: the model has parameters outside its supported layers")
        group_params = optimizer.param_groups[0]["params"]
        if {id(p) for p in group_params} != {id(p) for p in self.params}:
            raise FusionError("fused_step: the optimizer must hold exactly the model's parameters")
        for p in self.params:
            if not p.requires_grad:
                raise FusionError("fused_step: every parameter must require grad (frozen layers are not supported)")
        self._hyper = None
        self._state_key = None

    @property
    def logits(self):
        """The logits of the last step's batch (a buffer overwritten by the next step)."""
        return self._impl.logits()

    def _sync_hyperparameters(self, group):
        if self._optimizer_kind == "sgd":
            hyper = ("sgd", group["momentum"], group["dampening"], group["nesterov"], group["weight_decay"])
            if hyper != self._hyper:
                self._impl.set_sgd(*map(float, hyper[1:3]), bool(hyper[3]), float(hyper[4]))
        else:
            decoupled = type(self.optimizer) is torch.optim.AdamW or bool(group.get("decoupled_weight_decay"))
            beta1, beta2 = group["betas"]
            hyper = ("adam", beta1, beta2, group["eps"], group["weight_decay"], decoupled)
            if hyper != self._hyper:
                self._impl.set_adam(float(beta1), float(beta2), float(group["eps"]), float(group["weight_decay"]),
                                    decoupled)
        if hyper != self._hyper:
            self._hyper = hyper
            self._state_key = None  # the state layout depends on the optimizer's settings

    def _sync_state(self, group):
        """Hands the optimizer's state tensors to C++, creating them as torch.optim would on a first step.
        Re-done only when the state changed identity (an eager first step, load_state_dict)."""
        state = self.optimizer.state
        if self._optimizer_kind == "sgd":
            if group["momentum"] == 0:
                tensors = []
            else:
                tensors = [state[p].get("momentum_buffer") for p in self.params]
        else:
            tensors = [state[p].get(key) for p in self.params for key in ("step", "exp_avg", "exp_avg_sq")]
        key = (id(state), tuple(map(id, tensors)))
        if key == self._state_key:
            return
        fresh = False
        if self._optimizer_kind == "sgd" and tensors and any(t is None for t in tensors):
            # torch.optim's first step sets the buffer to the first gradient: allocate, C++ initialises it.
            fresh = True
            tensors = []
            for p in self.params:
                state[p]["momentum_buffer"] = torch.empty_like(p, memory_format=torch.preserve_format)
                tensors.append(state[p]["momentum_buffer"])
        elif self._optimizer_kind == "adam" and any(t is None for t in tensors):
            tensors = []
            for p in self.params:
                s = state[p]
                s["step"] = torch.tensor(0.0, dtype=torch.float32)
                s["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                s["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                tensors += [s["step"], s["exp_avg"], s["exp_avg_sq"]]
        for t in tensors:
            if t.dim() > 0 and not t.is_contiguous():
                raise FusionError("fused_step: optimizer state tensors must be contiguous")
        self._impl.set_state(tensors, fresh)
        self._state_key = (id(state), tuple(map(id, tensors)))

    def __call__(self, x, target, index=None):
        group = self.optimizer.param_groups[0]
        self._sync_hyperparameters(group)
        self._sync_state(group)
        lr = float(group["lr"])
        loss = self._run(self._impl, x, target, index, lr)
        if loss is NotImplemented:  # arguments of a kind the direct call does not take (a tensor subclass, say)
            loss = self._impl.step(x, target, index, lr)
        # an optimizer step happened: tell a learning-rate scheduler (it checks this flag to warn about
        # schedulers stepped before any optimizer step)
        self.optimizer._opt_called = True
        return loss


def fused_step(model, loss_fn, optimizer):
    """A callable ``step(x, target, index=None) -> loss`` that runs one training step of `model` in one call
    into C++; with `index` (1-D int64), the batch is rows `index` of x and target.

    model: fastmnist layers (FusedLinear, ConvActPool2d, Flatten, LayerNorm) in an nn.Sequential (or one of
    fastmnist.models with backend="fused"); loss_fn: SoftmaxCrossEntropyLoss / nn.CrossEntropyLoss,
    SigmoidBCELoss / nn.BCEWithLogitsLoss (default options) or models.SigmoidMSELoss; optimizer: SGD (momentum,
    dampening, nesterov, weight decay) or Adam / AdamW over exactly the model's parameters, one group.
    Raises FusionError naming the unsupported part otherwise.
    """
    return FusedStep(model, loss_fn, optimizer)
