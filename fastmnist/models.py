"""The five tutorial models, each buildable with the fused fastmnist layers or with plain torch.nn.

Both backends name their parameters alike (children named fc1, conv1, ... in an nn.Sequential), so a state_dict
saved from one loads into the other. Every model takes images of shape (N, 1, 28, 28) and returns logits
(N, 10). The recipes are the tutorials' hyper-parameters, used by `fastmnist train` as defaults.
"""

from __future__ import annotations

import dataclasses
from collections import OrderedDict

import torch
from torch import nn

from . import nn as fnn

BACKENDS = ("fused", "eager")
MODELS = ("mlp", "classifier", "softmax", "lenet", "twolayer")
CLASSIFIER_HIDDEN = ("sigmoid", "leaky_relu", "leaky_relu_layernorm")
CLASSIFIER_LOSSES = ("bce", "mse")
LEAKY_SLOPE = 0.02


@dataclasses.dataclass(frozen=True)
class Recipe:
    """A tutorial's training recipe."""

    epochs: int
    batch_size: int
    lr: float
    optimizer: str  # "sgd" or "adam"
    dataset: str  # "mnist" or "fashion-mnist"
    reference_accuracy: str  # what the tutorial reached, for the record


RECIPES = {
    "mlp": Recipe(20, 64, 0.1, "sgd", "mnist", "~0.98 on MNIST"),
    "classifier": Recipe(3, 1, 0.001, "adam", "mnist", "0.90-0.97 on MNIST (batch 1)"),
    "softmax": Recipe(5, 256, 0.1, "sgd", "fashion-mnist", "~0.85 on Fashion-MNIST"),
    "lenet": Recipe(10, 256, 0.9, "sgd", "fashion-mnist", "LeNet-5 tutorial, Fashion-MNIST"),
    "twolayer": Recipe(16, 100, 0.1, "sgd", "mnist", "~0.94 on MNIST"),
}
# The classifier tutorial's SGD learning rate (Adam uses the recipe's).
CLASSIFIER_SGD_LR = 0.01


def _check(name, value, allowed):
    if value not in allowed:
        raise ValueError(f"unknown {name} {value!r}; expected one of {', '.join(allowed)}")


def _linear(backend, n_in, n_out, activation):
    """A linear layer with its activation: one FusedLinear, or nn.Linear followed by the eager activation."""
    if backend == "fused":
        return [fnn.FusedLinear(n_in, n_out, activation=activation, negative_slope=LEAKY_SLOPE)]
    layers = [nn.Linear(n_in, n_out)]
    eager_activation = {
        "identity": None,
        "relu": nn.ReLU(),
        "leaky_relu": nn.LeakyReLU(LEAKY_SLOPE),
        "sigmoid": nn.Sigmoid(),
        "tanh": nn.Tanh(),
    }[activation]
    return layers + ([eager_activation] if eager_activation is not None else [])


def _sequential(backend, spec):
    """nn.Sequential from [(name, layers)]: the first layer takes the name (it holds the parameters), the
    eager activation modules that follow get name + '_act' (they have no parameters)."""
    children = OrderedDict()
    for name, layers in spec:
        children[name] = layers[0]
        for i, extra in enumerate(layers[1:]):
            children[f"{name}_act{i or ''}"] = extra
    return nn.Sequential(children)


def mlp(backend="fused"):
    """784-400-200-100-10 with ReLU."""
    return _sequential(backend, [
        ("flatten", [nn.Flatten()]),
        ("fc1", _linear(backend, 784, 400, "relu")),
        ("fc2", _linear(backend, 400, 200, "relu")),
        ("fc3", _linear(backend, 200, 100, "relu")),
        ("fc4", _linear(backend, 100, 10, "identity")),
    ])


def classifier(backend="fused", hidden="leaky_relu_layernorm", loss="bce"):
    """784-200-10 with a sigmoid output trained on one-hot targets. The network returns the output layer's
    logits: with BCE the loss applies the sigmoid itself (stably); with MSE the loss is taken on sigmoid(logits)."""
    _check("hidden", hidden, CLASSIFIER_HIDDEN)
    _check("loss", loss, CLASSIFIER_LOSSES)
    activation = "sigmoid" if hidden == "sigmoid" else "leaky_relu"
    spec = [("flatten", [nn.Flatten()]), ("fc1", _linear(backend, 784, 200, activation))]
    if hidden == "leaky_relu_layernorm":
        spec.append(("norm", [nn.LayerNorm(200)]))
    spec.append(("fc2", _linear(backend, 200, 10, "identity")))
    return _sequential(backend, spec)


def softmax(backend="fused"):
    """Softmax regression 784-10 (the softmax is in the cross-entropy loss)."""
    return _sequential(backend, [("flatten", [nn.Flatten()]), ("fc1", _linear(backend, 784, 10, "identity"))])


def twolayer(backend="fused"):
    """784-50-10 with a sigmoid hidden layer."""
    return _sequential(backend, [
        ("flatten", [nn.Flatten()]),
        ("fc1", _linear(backend, 784, 50, "sigmoid")),
        ("fc2", _linear(backend, 50, 10, "identity")),
    ])


def _conv_block(backend, n_in, n_out, padding):
    if backend == "fused":
        return [fnn.ConvActPool2d(n_in, n_out, kernel_size=5, padding=padding, activation="sigmoid")]
    return [nn.Conv2d(n_in, n_out, kernel_size=5, padding=padding), nn.Sigmoid(), nn.AvgPool2d(2)]


def lenet(backend="fused"):
    """LeNet-5 with sigmoid and 2x2 average pooling, Xavier-uniform weights and zero biases."""
    model = _sequential(backend, [
        ("conv1", _conv_block(backend, 1, 6, padding=2)),
        ("conv2", _conv_block(backend, 6, 16, padding=0)),
        ("flatten", [nn.Flatten()]),
        ("fc1", _linear(backend, 400, 120, "sigmoid")),
        ("fc2", _linear(backend, 120, 84, "sigmoid")),
        ("fc3", _linear(backend, 84, 10, "identity")),
    ])
    for module in model.modules():
        if hasattr(module, "weight") and module.weight is not None and module.weight.dim() > 1:
            nn.init.xavier_uniform_(module.weight)
            nn.init.zeros_(module.bias)
    return model


BUILDERS = {"mlp": mlp, "classifier": classifier, "softmax": softmax, "lenet": lenet, "twolayer": twolayer}


def create_model(name, backend="fused", **options):
    """The model `name` for `backend` ("fused" or "eager"); `options` are the model's variant arguments
    (for the classifier: hidden=..., loss=...)."""
    _check("model", name, MODELS)
    _check("backend", backend, BACKENDS)
    return BUILDERS[name](backend, **options)


def create_loss(name, backend="fused", **options):
    """The model's loss on (logits, target): cross-entropy on class indices for most models; for the
    classifier, BCE on logits or MSE on sigmoid(logits) against one-hot targets (see `target_kind`)."""
    _check("model", name, MODELS)
    _check("backend", backend, BACKENDS)
    if name != "classifier":
        return fnn.SoftmaxCrossEntropyLoss() if backend == "fused" else nn.CrossEntropyLoss()
    loss = options.get("loss", "bce")
    _check("loss", loss, CLASSIFIER_LOSSES)
    if loss == "bce":
        return fnn.SigmoidBCELoss() if backend == "fused" else nn.BCEWithLogitsLoss()
    return SigmoidMSELoss()


class SigmoidMSELoss(nn.Module):
    """Mean squared error between sigmoid(logits) and the (one-hot) target: the classifier's MSE variant."""

    def forward(self, logits, target):
        return nn.functional.mse_loss(torch.sigmoid(logits), target)


def target_kind(name, **options):
    """"onehot" for the classifier (its tutorial trains on one-hot vectors), else "index"."""
    return "onehot" if name == "classifier" else "index"


def create_optimizer(name, parameters, optimizer=None, lr=None):
    """The recipe's optimizer (SGD or Adam) unless overridden."""
    recipe = RECIPES[name]
    optimizer = optimizer or recipe.optimizer
    _check("optimizer", optimizer, ("sgd", "adam"))
    if lr is None:
        lr = CLASSIFIER_SGD_LR if (name == "classifier" and optimizer == "sgd") else recipe.lr
    if optimizer == "sgd":
        return torch.optim.SGD(parameters, lr=lr)
    return torch.optim.Adam(parameters, lr=lr)
