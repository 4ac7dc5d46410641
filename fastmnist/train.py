"""The training loop shared by every model: shuffled mini-batches, one line per epoch, test accuracy each epoch.

    history = fit(model, loss_fn, optimizer, (x_train, y_train), (x_test, y_test), epochs=5, batch_size=64)
    accuracy, predictions = evaluate(model, x_test, y_test)

A training step is either the eager one (zero_grad, forward, loss, backward, optimizer.step: works for the
torch.nn and the fused modules alike) or a fused training step, a callable `step(x, target) -> float loss` that
updates the parameters itself and leaves that batch's logits in `step.logits`. fastmnist.fused_step's step is
handed the whole training set and each batch's row numbers (`index=`): it gathers the batch itself, or reads
the rows in place, with the same numbers as the gathered batch.
Loss and accuracy are accumulated as tensors on the device, so the eager loop does not wait for the device
after every batch; nothing loops over samples in Python.
"""

from __future__ import annotations

import math
import sys
import time
from dataclasses import dataclass, field

import torch
from torch.nn import functional as F

from .data import shuffled_batch_indices
from .fused_step import FusedStep

TARGET_KINDS = ("index", "onehot")
NUM_CLASSES = 10


@dataclass
class EpochResult:
    epoch: int
    loss: float  # mean training loss over the epoch's samples
    train_acc: float  # accuracy on the training batches, as seen while training (the tutorials' "train acc")
    test_acc: float
    seconds: float  # training time of the epoch (test evaluation excluded)

    def line(self, epochs):
        return (f"epoch {self.epoch}/{epochs}  loss {self.loss:.4f}  train acc {self.train_acc:.4f}  "
                f"test acc {self.test_acc:.4f}  {self.seconds:.1f} s")


@dataclass
class History:
    epochs: list = field(default_factory=list)  # EpochResult per epoch
    predictions: torch.Tensor | None = None  # predicted test classes after the last epoch (CPU, int64)

    @property
    def final(self):
        return self.epochs[-1] if self.epochs else None

    def as_dicts(self):
        return [vars(e).copy() for e in self.epochs]


def make_targets(y, target_kind, dtype=torch.float32):
    """Class indices as they are, or one-hot float vectors for target_kind "onehot"."""
    if target_kind == "index":
        return y
    return F.one_hot(y, NUM_CLASSES).to(dtype)


def _synchronize(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def _check_pair(name, pair):
    if not (isinstance(pair, (tuple, list)) and len(pair) == 2 and all(isinstance(t, torch.Tensor) for t in pair)):
        raise TypeError(f"fit: {name} must be a pair of tensors (x, y)")
    x, y = pair
    if len(x) != len(y) or len(x) == 0:
        raise ValueError(f"fit: {name} must hold the same positive number of images and labels, got "
                         f"{len(x)} and {len(y)}")


def _check_positive_int(name, value):
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"fit: {name} must be a positive integer, got {value!r}")


@torch.no_grad()
def predict_logits(model, x, batch_size=1000):
    """The model's logits for all of x, in batches, in eval mode (the model's mode is restored afterwards)."""
    was_training = model.training
    model.eval()
    try:
        device = next(model.parameters()).device
        return torch.cat([model(x[i:i + batch_size].to(device)) for i in range(0, len(x), batch_size)])
    finally:
        model.train(was_training)


def evaluate(model, x, y, batch_size=1000):
    """(accuracy, predictions): the accuracy of argmax(logits) against y, and the predicted classes (CPU int64)."""
    if len(x) == 0:
        raise ValueError("evaluate: no images")
    predictions = predict_logits(model, x, batch_size).argmax(dim=1).cpu()
    return (predictions == y.cpu()).double().mean().item(), predictions


def eager_step(model, loss_fn, optimizer):
    """The eager training step: returns step(x, target) -> loss tensor (0-d, detached), with `.logits`."""

    def step(x, target):
        optimizer.zero_grad(set_to_none=True)
        logits = model(x)
        loss = loss_fn(logits, target)
        loss.backward()
        optimizer.step()
        step.logits = logits.detach()
        return loss.detach()

    step.logits = None
    return step


def fit(model, loss_fn, optimizer, train, test, epochs, batch_size, target_kind="index", device="cpu", step=None,
        seed=0, progress=None, log=print):
    """Train `model` for `epochs` epochs on train = (x, y) and evaluate on test = (x, y) after each; returns History.

    x: float images (N, 1, 28, 28) (or whatever the model takes); y: int64 class indices. The data is moved to
    `device` once; the model and optimizer must already be there. target_kind: "index" (class indices) or "onehot"
    (float one-hot vectors, the classifier's). step: a fused training step `step(x, target) -> float` that leaves
    the batch's logits in `step.logits`; None for the eager step. seed: seeds the batch order. progress: a tqdm bar
    per epoch (default: when stderr is a terminal). log: receives one line per epoch (None for silence).
    """
    _check_pair("train", train)
    _check_pair("test", test)
    _check_positive_int("epochs", epochs)
    _check_positive_int("batch_size", batch_size)
    if target_kind not in TARGET_KINDS:
        raise ValueError(f"fit: target_kind must be one of {', '.join(TARGET_KINDS)}, got {target_kind!r}")
    if step is not None and not callable(step):
        raise TypeError("fit: step must be callable or None")
    if progress is None:
        progress = sys.stderr.isatty()
    log = log or (lambda line: None)
    device = torch.device(device)
    x_train, y_train = (t.to(device) for t in train)
    x_test, y_test = test
    train_step = step if step is not None else eager_step(model, loss_fn, optimizer)
    # the fused step takes the whole set and the batch's row numbers; the targets are made once, not per batch
    indexed = isinstance(train_step, FusedStep)
    if indexed:
        x_train = x_train.contiguous()
        t_train = make_targets(y_train, target_kind, x_train.dtype)
    generator = torch.Generator().manual_seed(seed)
    n_batches = -(-len(x_train) // batch_size)
    history = History()

    from tqdm import tqdm

    for epoch in range(1, epochs + 1):
        model.train()
        loss_sum = torch.zeros((), dtype=torch.float64, device=device)
        correct = torch.zeros((), dtype=torch.int64, device=device)
        seen_logits = True
        bar = tqdm(total=n_batches, desc=f"epoch {epoch}/{epochs}", leave=False, disable=not progress,
                   file=sys.stderr, unit="batch")
        _synchronize(device)
        start = time.perf_counter()
        for i, idx in enumerate(shuffled_batch_indices(len(x_train), batch_size, generator, x_train.device)):
            yb = y_train.index_select(0, idx)
            if indexed:
                loss = train_step(x_train, t_train, index=idx)
            else:
                xb = x_train.index_select(0, idx)
                loss = train_step(xb, make_targets(yb, target_kind, xb.dtype))
            loss_sum += loss * len(yb)  # a float from a fused step, a device tensor from the eager one
            logits = getattr(train_step, "logits", None)
            if logits is None:
                seen_logits = False
            else:
                correct += (logits.argmax(dim=1) == yb).sum()
            if progress:
                bar.update()
                if i % 20 == 0:
                    bar.set_postfix(loss=f"{float(loss):.4f}", refresh=False)
        _synchronize(device)
        seconds = time.perf_counter() - start
        bar.close()
        test_acc, history.predictions = evaluate(model, x_test, y_test)
        result = EpochResult(
            epoch=epoch,
            loss=loss_sum.item() / len(y_train),
            train_acc=correct.item() / len(y_train) if seen_logits else math.nan,
            test_acc=test_acc,
            seconds=seconds,
        )
        if not math.isfinite(result.loss):
            log(result.line(epochs))
            raise FloatingPointError(f"fit: the training loss is {result.loss} in epoch {epoch}; lower the "
                                     "learning rate")
        history.epochs.append(result)
        log(result.line(epochs))
    return history
