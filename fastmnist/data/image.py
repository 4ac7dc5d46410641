"""A single image file (PNG, or anything Pillow reads) as a model input, for `fastmnist predict`."""

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from .errors import DatasetError

IMAGE_SIZE = 28


def read_image(path, invert=None):
    """float32 (28, 28) in [0, 1], light digit on dark background like MNIST.

    Colour images become grayscale (Pillow's "L"); transparent areas count as white; 16-bit and float images
    are scaled by their maximum; other sizes are resized to 28x28 (Lanczos, no aspect-ratio padding).
    invert: True/False forces it; None (default) inverts when the border is mostly light (a dark digit drawn
    on white), since MNIST digits are white on black.
    """
    try:
        with Image.open(path) as img:
            img.load()
    except UnidentifiedImageError:
        raise DatasetError(f"{path}: not an image file Pillow can read") from None
    except OSError as error:
        if isinstance(error, FileNotFoundError):
            raise
        raise DatasetError(f"{path}: cannot read image ({error})") from None
    if img.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N", "F"):
        array = np.asarray(img, dtype=np.float64)
        peak = array.max()
        img = Image.fromarray(np.rint(array * (255.0 / peak if peak > 0 else 0.0)).clip(0, 255).astype(np.uint8))
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        img = Image.alpha_composite(white, rgba)
    img = img.convert("L")
    if img.size != (IMAGE_SIZE, IMAGE_SIZE):
        img = img.resize((IMAGE_SIZE, IMAGE_SIZE), Image.Resampling.LANCZOS)
    x = torch.from_numpy(np.array(img, dtype=np.float32)) / 255
    if invert is None:
        border = torch.cat([x[0], x[-1], x[1:-1, 0], x[1:-1, -1]])
        invert = bool(border.mean() > 0.5)
    return 1 - x if invert else x
