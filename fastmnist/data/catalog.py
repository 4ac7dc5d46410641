"""What fastmnist knows about each dataset: class names, file names, torchvision folder, mirrors, checksums."""

from dataclasses import dataclass

MNIST_CLASSES = ("0", "1", "2", "3", "4", "5", "6", "7", "8", "9")
FASHION_MNIST_CLASSES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)

# The four standard IDX files (uncompressed names), per split.
IDX_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}


@dataclass(frozen=True)
class DatasetInfo:
    name: str  # canonical name: "mnist" or "fashion-mnist"
    title: str  # for messages: "MNIST", "Fashion-MNIST"
    folder: str  # torchvision's folder: root/<folder>/raw
    classes: tuple
    mirrors: tuple  # base URLs, tried in order
    md5: dict  # .gz file name -> MD5 of the .gz file as the mirrors serve it (torchvision's values)


DATASETS = {
    "mnist": DatasetInfo(
        name="mnist",
        title="MNIST",
        folder="MNIST",
        classes=MNIST_CLASSES,
        mirrors=("https://ossci-datasets.s3.amazonaws.com/mnist/", "http://yann.lecun.com/exdb/mnist/"),
        md5={
            "train-images-idx3-ubyte.gz": "f68b3c2dcbeaaa9fbdd348bbdeb94873",
            "train-labels-idx1-ubyte.gz": "d53e105ee54ea40749a09fcbcd1e9432",
            "t10k-images-idx3-ubyte.gz": "9fb629c4189551a2d022fa330f9573f3",
            "t10k-labels-idx1-ubyte.gz": "ec29112dd5afa0611ce80d1b7f02629c",
        },
    ),
    "fashion-mnist": DatasetInfo(
        name="fashion-mnist",
        title="Fashion-MNIST",
        folder="FashionMNIST",
        classes=FASHION_MNIST_CLASSES,
        mirrors=("http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",),
        md5={
            "train-images-idx3-ubyte.gz": "8d4fb7e6c68d591d4c3dfef9ec88bf0d",
            "train-labels-idx1-ubyte.gz": "25c81989df183df01b3e8a0aad5dffbe",
            "t10k-images-idx3-ubyte.gz": "bef4ecab320f06d8554ea6380940ec79",
            "t10k-labels-idx1-ubyte.gz": "bb300cfdad3c16e7a12a480ee83cd310",
        },
    ),
}

DATASET_NAMES = tuple(DATASETS)


def dataset_info(name):
    """The DatasetInfo for "mnist" or "fashion-mnist" (case and "-"/"_" insensitive, "fashionmnist" too)."""
    if not isinstance(name, str):
        raise TypeError(f"dataset name must be a string, got {type(name).__name__}")
    key = name.strip().lower().replace("_", "-")
    if key == "fashionmnist":
        key = "fashion-mnist"
    if key not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; expected one of {', '.join(DATASET_NAMES)}")
    return DATASETS[key]
