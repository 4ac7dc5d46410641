"""Downloading MNIST / Fashion-MNIST from the public mirrors torchvision uses, with MD5 checks.

Files go to root/<MNIST|FashionMNIST>/raw (torchvision's layout, which load_dataset reads), gzipped as served.
Each file is streamed into a temporary file in that folder and renamed into place only once complete and its MD5
matches, so a loader never sees a partial or corrupt file under a real name. A file already present with the
right MD5 is not fetched again. On any failure (network error, HTTP error, short transfer, wrong checksum) the
next mirror is tried; when all fail, DownloadError lists what happened at each.
"""

import hashlib
import http.client
import os
import sys
import tempfile
import urllib.request

from .catalog import dataset_info
from .errors import DownloadError
from .idx import default_file_mode

USER_AGENT = "fastmnist/0.1 (urllib)"
_CHUNK = 1 << 16


def _default_log(message):
    print(message, file=sys.stderr, flush=True)


def file_md5(path):
    h = hashlib.md5()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _progress_bar(show, total, desc):
    if not show:
        return None
    try:
        from tqdm import tqdm
    except ImportError:
        return None
    return tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc=desc, leave=False,
                file=sys.stderr)


def _fetch(url, path, expected_md5, timeout, show_progress):
    """Download url to path atomically, or raise (leaving nothing behind)."""
    folder, name = os.path.split(path)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{name}.", suffix=".part")
    try:
        h = hashlib.md5()
        received = 0
        request = urllib.request.Request(url, headers={"User-Agent": USER_AGENT})
        with os.fdopen(fd, "wb") as out, urllib.request.urlopen(request, timeout=timeout) as response:
            length = response.headers.get("Content-Length")
            total = int(length) if length and length.isdigit() else None
            bar = _progress_bar(show_progress, total, name)
            try:
                while chunk := response.read(_CHUNK):
                    out.write(chunk)
                    h.update(chunk)
                    received += len(chunk)
                    if bar is not None:
                        bar.update(len(chunk))
            finally:
                if bar is not None:
                    bar.close()
            if total is not None and received != total:
                raise DownloadError(f"transfer interrupted: received {received} of {total} bytes")
            out.flush()
            os.fsync(out.fileno())
        digest = h.hexdigest()
        if digest != expected_md5:
            raise DownloadError(f"checksum mismatch: MD5 {digest}, expected {expected_md5} ({received} bytes)")
        os.chmod(tmp, default_file_mode())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def download(dataset, root, mirrors=None, md5=None, timeout=60.0, progress=None, log=_default_log):
    """Fetch the four .gz files of `dataset` ("mnist" or "fashion-mnist") into root/<folder>/raw.

    mirrors: base URLs tried in order (default: the dataset's public mirrors). md5: {file name: MD5} of the files
    to fetch (default: the four standard files with torchvision's checksums); both are there for tests and
    private mirrors. progress: tqdm bar per file (default: when stderr is a terminal). log: one line per step
    (default: stderr; None for silence). Returns the paths of the files, in md5's order.
    Raises DownloadError naming the file and every mirror's failure when a file cannot be fetched intact.
    """
    info = dataset_info(dataset)
    mirrors = tuple(info.mirrors if mirrors is None else mirrors)
    md5 = dict(info.md5 if md5 is None else md5)
    if not mirrors:
        raise ValueError("download: mirrors must not be empty")
    if progress is None:
        progress = sys.stderr.isatty()
    log = log or (lambda message: None)
    folder = os.path.join(os.fspath(root), info.folder, "raw")
    os.makedirs(folder, exist_ok=True)
    paths = []
    for name, expected in md5.items():
        path = os.path.join(folder, name)
        paths.append(path)
        if os.path.isfile(path):
            if file_md5(path) == expected:
                log(f"{path}: already present, checksum OK")
                continue
            log(f"{path}: present but its checksum is wrong; downloading it again")
        failures = []
        for mirror in mirrors:
            url = mirror.rstrip("/") + "/" + name
            log(f"downloading {url}")
            try:
                _fetch(url, path, expected, timeout, progress)
            except (OSError, http.client.HTTPException, DownloadError) as error:
                failures.append(f"{url}: {error}")
                log(f"  failed: {error}")
                continue
            break
        else:
            raise DownloadError(f"{info.title} file {name} could not be downloaded intact from any mirror:\n  "
                                + "\n  ".join(failures))
    log(f"{info.title}: {len(paths)} files in {folder}")
    return paths
