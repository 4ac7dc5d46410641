"""Datasets held whole in memory as two tensors, and loading them from IDX files, CSV files or the bundled sample.

Where `load_dataset(name, root)` looks, in this order (the first folder with all four IDX files wins):
  root/<MNIST|FashionMNIST>/raw   (torchvision's layout; where `download` writes)
  root/raw
  root                            (a flat folder)
Each IDX file may be raw or .gz (train-images-idx3-ubyte[.gz], also the train-images.idx3-ubyte spelling).
Failing that, CSV files in root: <name>_train.csv and <name>_test.csv (mnist_train.csv, fashion-mnist_train.csv,
also fashion_mnist_train.csv), or train.csv and test.csv, each possibly .gz.
With root=None, the MNIST sample bundled in fastmnist/data/sample is used, and one line says so.
"""

import os
import sys
from dataclasses import dataclass, field
from typing import NamedTuple

import torch

from .catalog import IDX_FILES, MNIST_CLASSES, dataset_info
from .csvfile import read_csv
from .errors import DatasetError
from .idx import read_idx_images, read_idx_labels

IMAGE_SIZE = 28
SAMPLE_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "sample")


@dataclass
class Dataset:
    """One split, whole: images uint8 (N, 28, 28) with values 0-255, or float32 (N, 28, 28) in [0, 1];
    labels int64 (N,) in 0-9."""

    images: torch.Tensor
    labels: torch.Tensor
    classes: tuple = MNIST_CLASSES
    name: str = "mnist"
    source: str = ""  # where it was read from, for messages
    num_classes: int = field(init=False)

    def __post_init__(self):
        if not isinstance(self.images, torch.Tensor) or not isinstance(self.labels, torch.Tensor):
            raise TypeError("Dataset: images and labels must be tensors")
        if self.images.dim() != 3:
            raise ValueError(f"Dataset: images must have shape (N, H, W), got {tuple(self.images.shape)}")
        if self.images.dtype != torch.uint8 and not self.images.is_floating_point():
            raise TypeError(f"Dataset: images must be uint8 or floating point, got {self.images.dtype}")
        if self.labels.dim() != 1 or self.labels.dtype != torch.int64:
            raise ValueError(f"Dataset: labels must be int64 of shape (N,), got {self.labels.dtype} "
                             f"{tuple(self.labels.shape)}")
        if len(self.images) != len(self.labels):
            raise ValueError(f"Dataset: {len(self.images)} images but {len(self.labels)} labels")
        self.num_classes = len(self.classes)

    def __len__(self):
        return len(self.labels)

    def tensors(self, flatten=True, device=None, dtype=torch.float32):
        """(x, y): x float in [0, 1], (N, 784) when flatten else (N, 1, 28, 28); y int64 (N,). Moved to `device`
        (once, whole) when given."""
        x = self.images.to(device=device)
        x = x.to(dtype) / 255 if x.dtype == torch.uint8 else x.to(dtype)
        x = x.reshape(len(x), -1) if flatten else x.unsqueeze(1)
        return x.contiguous(), self.labels.to(device=device)

    def take(self, n):
        """The first n examples (a view), e.g. for a quick run."""
        return Dataset(self.images[:n], self.labels[:n], self.classes, self.name, self.source)

    def class_counts(self):
        return torch.bincount(self.labels, minlength=self.num_classes)


class DataSplits(NamedTuple):
    train: Dataset
    test: Dataset


def _check_pair(images, labels, images_path, labels_path):
    if images.shape[1:] != (IMAGE_SIZE, IMAGE_SIZE):
        raise DatasetError(f"{images_path}: images are {images.shape[1]}x{images.shape[2]}; fastmnist expects "
                           f"{IMAGE_SIZE}x{IMAGE_SIZE}")
    if len(images) != len(labels):
        raise DatasetError(f"{images_path} has {len(images)} images but {labels_path} has {len(labels)} labels")
    if len(labels) and int(labels.max()) > 9:
        index = int(torch.argmax((labels > 9).to(torch.uint8)))
        raise DatasetError(f"{labels_path}: label {int(labels[index])} at index {index} is outside 0-9")


def load_idx(images_path, labels_path, name="mnist"):
    """A Dataset from an images file and a labels file (IDX, raw or .gz), checked for consistency."""
    info = dataset_info(name)
    images = read_idx_images(images_path)
    labels = read_idx_labels(labels_path)
    _check_pair(images, labels, images_path, labels_path)
    return Dataset(images, labels.to(torch.int64), info.classes, info.name, str(images_path))


def load_csv(path, name="mnist"):
    """A Dataset from a CSV file (label first; see fastmnist.data.csvfile for the format)."""
    info = dataset_info(name)
    images, labels = read_csv(path)
    return Dataset(images, labels, info.classes, info.name, str(path))


def _idx_candidates(folder, stem):
    dotted = stem.replace("-idx", ".idx")  # train-images.idx3-ubyte, as some copies spell it
    return [os.path.join(folder, n) for n in (stem, stem + ".gz", dotted, dotted + ".gz")]


def find_idx_files(root, name="mnist"):
    """{"train": (images, labels), "test": (images, labels)} paths of the first folder under root that holds all
    four IDX files (see the module docstring for the search order), or None when no folder does."""
    info = dataset_info(name)
    for folder in (os.path.join(root, info.folder, "raw"), os.path.join(root, "raw"), root):
        found = {}
        for split, stems in IDX_FILES.items():
            paths = [next((p for p in _idx_candidates(folder, s) if os.path.isfile(p)), None) for s in stems]
            if None in paths:
                break
            found[split] = tuple(paths)
        else:
            return found
    return None


def find_csv_files(root, name="mnist"):
    """{"train": path, "test": path} of the CSV pair in root, or None."""
    info = dataset_info(name)
    prefixes = [info.name + "_", info.name.replace("-", "_") + "_", ""]
    for prefix in dict.fromkeys(prefixes):
        found = {}
        for split in ("train", "test"):
            path = next((p for p in (os.path.join(root, f"{prefix}{split}.csv{gz}") for gz in ("", ".gz"))
                         if os.path.isfile(p)), None)
            if path is None:
                break
            found[split] = path
        else:
            return found
    return None


def _default_log(message):
    print(message, file=sys.stderr, flush=True)


def load_sample(log=_default_log):
    """The MNIST sample bundled with fastmnist (5000 train / 1000 test images, the first of each split)."""
    splits = DataSplits(*(load_idx(*(os.path.join(SAMPLE_DIR, s + ".gz") for s in IDX_FILES[split]), "mnist")
                          for split in ("train", "test")))
    if log is not None:
        log(f"no data given: using the bundled MNIST sample ({len(splits.train)} train / {len(splits.test)} test "
            "images)")
    return splits


def load_dataset(name="mnist", root=None, log=_default_log):
    """DataSplits(train, test) of dataset `name` ("mnist" or "fashion-mnist") found under `root`.

    root=None: the bundled MNIST sample (MNIST only), announced in one line through `log` (default: stderr;
    log=None for silence). Raises DatasetError when root holds no complete dataset, naming where it looked.
    """
    info = dataset_info(name)
    if root is None:
        if info.name != "mnist":
            raise DatasetError(f"no {info.title} data given and the bundled sample is MNIST only; download it with "
                               f"`fastmnist download --dataset {info.name} --root DIR` and pass that DIR")
        return load_sample(log)
    root = os.fspath(root)
    if not os.path.isdir(root):
        raise DatasetError(f"{root}: no such folder")
    idx = find_idx_files(root, info.name)
    if idx is not None:
        return DataSplits(*(load_idx(*idx[split], info.name) for split in ("train", "test")))
    csv = find_csv_files(root, info.name)
    if csv is not None:
        return DataSplits(*(load_csv(csv[split], info.name) for split in ("train", "test")))
    raise DatasetError(
        f"{root}: no {info.title} data found; looked for the four IDX files (train-images-idx3-ubyte[.gz], "
        f"train-labels-idx1-ubyte[.gz], t10k-images-idx3-ubyte[.gz], t10k-labels-idx1-ubyte[.gz]) in "
        f"{os.path.join(root, info.folder, 'raw')}, {os.path.join(root, 'raw')} and {root}, and for "
        f"{info.name}_train.csv / {info.name}_test.csv or train.csv / test.csv in {root}; "
        f"`fastmnist download --dataset {info.name} --root {root}` fetches the IDX files")
