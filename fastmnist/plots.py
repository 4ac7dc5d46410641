"""PNG plots of a training run: loss/accuracy curves, the confusion matrix, a grid of labelled test images.

Figures are drawn with matplotlib's object API on the Agg canvas (no pyplot, no display, no global backend
switch), and each function writes one PNG and returns its path.
"""

from __future__ import annotations

import os

import matplotlib
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

WRONG = "tab:red"
RIGHT = "black"


def _figure(width, height):
    figure = Figure(figsize=(width, height), dpi=100, layout="constrained")
    FigureCanvasAgg(figure)
    return figure


def _save(figure, path):
    path = os.fspath(path)
    folder = os.path.dirname(path)
    if folder:
        os.makedirs(folder, exist_ok=True)
    figure.savefig(path, format="png")
    return path


def _column(history, key):
    return [float(row[key]) if isinstance(row, dict) else float(getattr(row, key)) for row in history]


def plot_curves(history, path, title=None):
    """Training loss (left) and train/test accuracy (right) per epoch. history: EpochResult objects or dicts with
    epoch, loss, train_acc, test_acc."""
    if len(history) == 0:
        raise ValueError("plot_curves: empty history")
    epochs = _column(history, "epoch")
    figure = _figure(10, 4)
    loss_axes, acc_axes = figure.subplots(1, 2)
    loss_axes.plot(epochs, _column(history, "loss"), marker="o")
    loss_axes.set(xlabel="epoch", ylabel="training loss", title="loss")
    acc_axes.plot(epochs, _column(history, "train_acc"), marker="o", label="train")
    acc_axes.plot(epochs, _column(history, "test_acc"), marker="o", label="test")
    acc_axes.set(xlabel="epoch", ylabel="accuracy", title="accuracy")
    acc_axes.legend()
    for axes in (loss_axes, acc_axes):
        axes.grid(alpha=0.3)
        if len(epochs) <= 20:
            axes.set_xticks(epochs)
        else:
            axes.xaxis.get_major_locator().set_params(integer=True)
    if title:
        figure.suptitle(title)
    return _save(figure, path)


def confusion_matrix(y_true, y_pred, num_classes=10):
    """counts[true, predicted] as an int64 (num_classes, num_classes) tensor."""
    y_true, y_pred = torch.as_tensor(y_true).cpu().long(), torch.as_tensor(y_pred).cpu().long()
    if y_true.shape != y_pred.shape:
        raise ValueError(f"confusion_matrix: {tuple(y_true.shape)} labels but {tuple(y_pred.shape)} predictions")
    flat = torch.bincount(y_true * num_classes + y_pred, minlength=num_classes * num_classes)
    return flat.reshape(num_classes, num_classes)


def plot_confusion(y_true, y_pred, classes, path, title=None):
    """The confusion matrix (rows: true class, columns: predicted class) with the count in each cell."""
    counts = confusion_matrix(y_true, y_pred, len(classes))
    n = len(classes)
    figure = _figure(7, 6.5)
    axes = figure.subplots()
    image = axes.imshow(counts.numpy(), cmap="Blues")
    figure.colorbar(image, ax=axes, shrink=0.8)
    axes.set_xticks(range(n), classes, rotation=45 if max(map(len, classes)) > 2 else 0, ha="right")
    axes.set_yticks(range(n), classes)
    axes.set(xlabel="predicted", ylabel="true")
    threshold = counts.max().item() / 2
    for i in range(n):
        for j in range(n):
            value = counts[i, j].item()
            axes.text(j, i, str(value), ha="center", va="center", fontsize=8,
                      color="white" if value > threshold else "black")
    accuracy = counts.diag().sum().item() / max(counts.sum().item(), 1)
    axes.set_title(f"{title + ': ' if title else ''}accuracy {accuracy:.4f}")
    return _save(figure, path)


def plot_image_grid(images, y_true, y_pred, classes, path, columns=8, title=None):
    """Images (N, 28, 28) or (N, 1, 28, 28) titled "true / predicted"; wrong predictions in red."""
    images = torch.as_tensor(images).detach().cpu().float()
    images = images.reshape(len(images), *images.shape[-2:])
    if not len(images) == len(y_true) == len(y_pred) or len(images) == 0:
        raise ValueError("plot_image_grid: need the same positive number of images, labels and predictions")
    columns = min(columns, len(images))
    rows = -(-len(images) // columns)
    # One montage image (NaN gaps, drawn white) with the labels as text above each cell: one axes instead of
    # one per image keeps this well under a second.
    size, gap, label = images.shape[-1], 4, 16
    cell_w, cell_h = size + gap, size + label
    montage = torch.full((rows * cell_h, columns * cell_w), float("nan"))
    for k in range(len(images)):
        row, col = divmod(k, columns)
        montage[row * cell_h + label:(row + 1) * cell_h, col * cell_w:col * cell_w + size] = images[k]
    figure = _figure(1.1 * columns, 1.35 * rows + (0.4 if title else 0.1))
    axes = figure.subplots()
    axes.set_axis_off()
    cmap = matplotlib.colormaps["gray"].with_extremes(bad="white")
    axes.imshow(montage.numpy(), cmap=cmap, vmin=0, vmax=1, interpolation="nearest")
    for k in range(len(images)):
        row, col = divmod(k, columns)
        true, pred = int(y_true[k]), int(y_pred[k])
        axes.text(col * cell_w + size / 2, row * cell_h + label - 1.5, f"{classes[true]}\n{classes[pred]}",
                  ha="center", va="bottom", fontsize=7, color=RIGHT if true == pred else WRONG)
    if title:
        figure.suptitle(title)
    return _save(figure, path)
