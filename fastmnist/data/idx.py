"""IDX files (the MNIST format), raw or gzip-compressed: reading with checks, and writing.

An IDX file is a 4-byte magic number (two zero bytes, a type code, the number of dimensions), one big-endian
uint32 size per dimension, then the values, big-endian, row-major. Compression is recognised by content (the
gzip signature), not by the file name.
"""

import gzip
import os
import tempfile
import zlib

import numpy as np
import torch

from .errors import DatasetError

# IDX type code -> (big-endian numpy dtype, torch dtype of the result)
_TYPES = {
    0x08: (np.dtype("u1"), torch.uint8),
    0x09: (np.dtype("i1"), torch.int8),
    0x0B: (np.dtype(">i2"), torch.int16),
    0x0C: (np.dtype(">i4"), torch.int32),
    0x0D: (np.dtype(">f4"), torch.float32),
    0x0E: (np.dtype(">f8"), torch.float64),
}
_CODES = {torch_dtype: code for code, (_, torch_dtype) in _TYPES.items()}

IMAGES_MAGIC = 0x00000803  # unsigned bytes, 3 dimensions (count, rows, columns)
LABELS_MAGIC = 0x00000801  # unsigned bytes, 1 dimension (count)

_GZIP_SIGNATURE = b"\x1f\x8b"


def default_file_mode():
    """0o666 less the process umask: the mode open() would give a new file (mkstemp gives 0o600). The umask is
    read from /proc (os.umask would have to change it, racing other threads); 0o644 where that is unavailable."""
    try:
        with open("/proc/self/status") as f:
            umask = next(int(line.split()[1], 8) for line in f if line.startswith("Umask:"))
    except (OSError, StopIteration, ValueError, IndexError):
        return 0o644
    return 0o666 & ~umask


def read_bytes(path):
    """The file's contents, decompressed when it is gzip data."""
    with open(path, "rb") as f:
        raw = f.read()
    if raw[:2] == _GZIP_SIGNATURE:
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError, zlib.error) as error:
            raise DatasetError(f"{path}: corrupt or truncated gzip data ({error})") from None
    return raw


def read_idx(path, expected_magic=None):
    """Read an IDX file into a tensor of its own shape and type (uint8 for the MNIST files).

    expected_magic: when given (IMAGES_MAGIC, LABELS_MAGIC), the file's magic number must be exactly this.
    Raises DatasetError, naming the file, for a wrong magic number, a short header, and data shorter or longer
    than the header's sizes say.
    """
    raw = read_bytes(path)
    if len(raw) < 4:
        raise DatasetError(f"{path}: truncated: {len(raw)} bytes, too short for an IDX header")
    magic = int.from_bytes(raw[:4], "big")
    code, ndim = raw[2], raw[3]
    valid = raw[:2] == b"\0\0" and code in _TYPES and ndim >= 1
    if expected_magic is not None and magic != expected_magic:
        valid = False
    if not valid:
        expected = f"0x{expected_magic:08x}" if expected_magic is not None else "0x0000TTDD (an IDX file)"
        raise DatasetError(f"{path}: wrong magic number 0x{magic:08x}, expected {expected}; not an IDX file of "
                           "this kind")
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DatasetError(f"{path}: truncated: the IDX header needs {header} bytes, the file has {len(raw)}")
    shape = tuple(int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    np_dtype, _ = _TYPES[code]
    expected_bytes = int(np.prod(shape, dtype=np.int64)) * np_dtype.itemsize
    have = len(raw) - header
    if have < expected_bytes:
        raise DatasetError(f"{path}: truncated: the header announces shape {shape} ({expected_bytes} bytes of data) "
                           f"but only {have} bytes follow")
    if have > expected_bytes:
        raise DatasetError(f"{path}: {have - expected_bytes} unexpected bytes after the {expected_bytes} bytes of "
                           f"data announced for shape {shape}")
    array = np.frombuffer(raw, dtype=np_dtype, count=expected_bytes // np_dtype.itemsize, offset=header)
    array = array.astype(np_dtype.newbyteorder("="), copy=True)  # native order, writable
    return torch.from_numpy(array.reshape(shape))


def read_idx_images(path):
    """uint8 images (N, rows, columns) from an idx3-ubyte file."""
    return read_idx(path, IMAGES_MAGIC)


def read_idx_labels(path):
    """uint8 labels (N,) from an idx1-ubyte file (not range-checked here)."""
    return read_idx(path, LABELS_MAGIC)


def write_idx(path, tensor, compresslevel=9):
    """Write `tensor` as an IDX file; gzip-compressed (reproducibly: no name, mtime 0) when path ends in .gz.

    Written to a temporary file in the same folder and renamed into place, so no half-written file is left.
    """
    tensor = torch.as_tensor(tensor)
    if tensor.dtype not in _CODES:
        raise TypeError(f"write_idx: dtype {tensor.dtype} has no IDX type code; use one of {list(_CODES)}")
    if tensor.dim() < 1 or tensor.dim() > 255:
        raise ValueError(f"write_idx: tensor must have 1 to 255 dimensions, got {tensor.dim()}")
    code = _CODES[tensor.dtype]
    np_dtype, _ = _TYPES[code]
    header = bytes([0, 0, code, tensor.dim()]) + b"".join(int(s).to_bytes(4, "big") for s in tensor.shape)
    payload = header + tensor.detach().cpu().contiguous().numpy().astype(np_dtype, copy=False).tobytes()
    if str(path).endswith(".gz"):
        payload = gzip.compress(payload, compresslevel=compresslevel, mtime=0)
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=folder, prefix="." + os.path.basename(path) + ".", suffix=".part")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(payload)
        os.chmod(tmp, default_file_mode())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
