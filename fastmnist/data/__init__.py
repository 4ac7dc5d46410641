"""fastmnist's data layer: MNIST / Fashion-MNIST from IDX or CSV files or the bundled sample, held whole as
tensors; mini-batches as index slices; downloading with checksums; reading a single image for prediction.

    splits = load_dataset("mnist", root=None)       # DataSplits(train, test); root=None -> bundled sample
    x, y = splits.train.tensors(flatten=True)        # float32 (N, 784) in [0, 1], int64 (N,)
    for xb, yb in iterate_batches(x, y, 128, shuffle=True, generator=g): ...
"""

from .batches import Batches, iterate_batches, shuffled_batch_indices
from .catalog import (DATASET_NAMES, DATASETS, FASHION_MNIST_CLASSES, IDX_FILES, MNIST_CLASSES, DatasetInfo,
                      dataset_info)
from .csvfile import read_csv
from .dataset import (SAMPLE_DIR, Dataset, DataSplits, find_csv_files, find_idx_files, load_csv, load_dataset,
                      load_idx, load_sample)
from .download import download, file_md5
from .errors import DatasetError, DownloadError
from .idx import read_idx, read_idx_images, read_idx_labels, write_idx
from .image import read_image

__all__ = [
    "Batches", "DATASETS", "DATASET_NAMES", "DataSplits", "Dataset", "DatasetError", "DatasetInfo",
    "DownloadError", "FASHION_MNIST_CLASSES", "IDX_FILES", "MNIST_CLASSES", "SAMPLE_DIR", "dataset_info", "download",
    "file_md5", "find_csv_files", "find_idx_files", "iterate_batches", "load_csv", "load_dataset", "load_idx",
    "load_sample", "read_csv", "read_idx", "read_idx_images", "read_idx_labels", "read_image",
    "shuffled_batch_indices", "write_idx",
]
