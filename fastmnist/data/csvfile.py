"""CSV datasets: one image per row, the label first, then the 784 pixels of a 28x28 image row by row.

This is the layout of the widely shared mnist_train.csv / fashion-mnist_train.csv files. A header row is
recognised by its first cell not being a number, and skipped. Blank lines are ignored. The file may be gzipped.

Pixel scale: if every pixel value is an integer, the values are 0-255 and become uint8 images. Otherwise
(non-integer values) they must lie in [0, 1] (already normalised) or in [0, 255], and become float32 images in
[0, 1]. Labels must be integers 0-9.
"""

import numpy as np
import torch

from .errors import DatasetError
from .idx import read_bytes

IMAGE_SIZE = 28
ROW_LENGTH = 1 + IMAGE_SIZE * IMAGE_SIZE


def _is_number(cell):
    try:
        float(cell)
    except ValueError:
        return False
    return True


def _find_bad_row(path, lines, line_numbers):
    """The first row of the wrong length or with a non-numeric cell, as a DatasetError (None if there is none)."""
    for text, number in zip(lines, line_numbers):
        cells = text.split(",")
        if len(cells) != ROW_LENGTH:
            return DatasetError(f"{path}: line {number} has {len(cells)} values; expected {ROW_LENGTH} "
                                f"(a label, then {ROW_LENGTH - 1} pixels)")
        for column, cell in enumerate(cells, 1):
            if not _is_number(cell):
                return DatasetError(f"{path}: line {number}, column {column}: {cell.strip()!r} is not a number")
    return None


def read_csv(path):
    """(images, labels) from a CSV file: images uint8 or float32 (N, 28, 28), labels int64 (N,).

    Raises DatasetError naming the file and line for a row of the wrong length, a non-numeric or non-finite
    cell, a label that is not an integer 0-9, a pixel out of range, or a file with no rows.
    """
    try:
        text = read_bytes(path).decode("utf-8-sig")
    except UnicodeDecodeError as error:
        raise DatasetError(f"{path}: not a text (CSV) file ({error})") from None
    lines, line_numbers = [], []
    for number, line in enumerate(text.splitlines(), 1):
        if line.strip():
            lines.append(line)
            line_numbers.append(number)
    if lines and not _is_number(lines[0].split(",", 1)[0]):  # header row
        lines, line_numbers = lines[1:], line_numbers[1:]
    if not lines:
        raise DatasetError(f"{path}: no data rows")

    try:
        data = np.loadtxt(lines, delimiter=",", dtype=np.float64, ndmin=2, comments=None)
    except ValueError as error:
        raise (_find_bad_row(path, lines, line_numbers) or DatasetError(f"{path}: cannot parse as CSV: {error}"))
    if data.shape[1] != ROW_LENGTH:
        raise _find_bad_row(path, lines, line_numbers)

    finite = np.isfinite(data)
    if not finite.all():
        row, column = np.argwhere(~finite)[0]
        raise DatasetError(f"{path}: line {line_numbers[row]}, column {column + 1}: non-finite value "
                           f"{data[row, column]}")

    labels = data[:, 0]
    bad = (labels != np.round(labels)) | (labels < 0) | (labels > 9)
    if bad.any():
        row = int(np.argmax(bad))
        raise DatasetError(f"{path}: line {line_numbers[row]}: label {labels[row]:g} is not an integer 0-9")

    pixels = data[:, 1:]
    bad = (pixels < 0) | (pixels > 255)
    if bad.any():
        row, column = np.argwhere(bad)[0]
        raise DatasetError(f"{path}: line {line_numbers[row]}, column {column + 2}: pixel value "
                           f"{pixels[row, column]:g} is outside 0-255")
    shape = (len(pixels), IMAGE_SIZE, IMAGE_SIZE)
    if (pixels == np.round(pixels)).all():
        images = torch.from_numpy(pixels.astype(np.uint8).reshape(shape))
    else:
        scale = 1.0 if pixels.max() <= 1.0 else 255.0
        images = torch.from_numpy((pixels / scale).astype(np.float32).reshape(shape))
    return images, torch.from_numpy(labels.astype(np.int64))
