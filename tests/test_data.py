"""fastmnist.data: IDX and CSV loaders on generated files, every kind of bad file, the bundled sample, the
batch iterator and the single-image reader."""

import fnmatch
import gzip
import os
import re
import tomllib

import numpy as np
import pytest
import torch
from PIL import Image

from fastmnist.data import (FASHION_MNIST_CLASSES, IDX_FILES, MNIST_CLASSES, SAMPLE_DIR, Batches, Dataset,
                            DatasetError, iterate_batches, load_csv, load_dataset, load_idx, read_idx, read_image,
                            write_idx)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def make_split(n, seed):
    g = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (n, 28, 28), dtype=torch.uint8, generator=g)
    labels = torch.randint(0, 10, (n,), dtype=torch.int64, generator=g)
    return images, labels


def write_split_files(folder, split, images, labels, gz, dotted=False):
    os.makedirs(folder, exist_ok=True)
    paths = []
    for stem, tensor in zip(IDX_FILES[split], (images, labels.to(torch.uint8))):
        name = stem.replace("-idx", ".idx") if dotted else stem
        path = os.path.join(folder, name + (".gz" if gz else ""))
        write_idx(path, tensor)
        paths.append(path)
    return paths


def write_dataset(folder, gz, seed=0, n_train=37, n_test=11, dotted=False):
    train, test = make_split(n_train, seed), make_split(n_test, seed + 1)
    write_split_files(folder, "train", *train, gz=gz, dotted=dotted)
    write_split_files(folder, "test", *test, gz=gz, dotted=dotted)
    return train, test


def assert_split(dataset, expected):
    images, labels = expected
    assert dataset.images.dtype == torch.uint8 and dataset.labels.dtype == torch.int64
    assert torch.equal(dataset.images, images)
    assert torch.equal(dataset.labels, labels)


# ---------------------------------------------------------------------------------------------------- IDX


@pytest.mark.parametrize("gz", [False, True])
@pytest.mark.parametrize("dtype", [torch.uint8, torch.int8, torch.int16, torch.int32, torch.float32, torch.float64])
def test_idx_roundtrip(tmp_path, gz, dtype):
    t = (torch.randn(3, 5, 2, generator=torch.Generator().manual_seed(1)) * 100).to(dtype)
    path = tmp_path / ("x.idx" + (".gz" if gz else ""))
    write_idx(path, t)
    with open(path, "rb") as f:
        assert (f.read(2) == b"\x1f\x8b") == gz
    back = read_idx(path)
    assert back.dtype == dtype and torch.equal(back, t)


@pytest.mark.parametrize("gz", [False, True], ids=["raw", "gz"])
@pytest.mark.parametrize("layout", ["flat", "torchvision", "raw_subfolder"])
def test_load_idx_layouts(tmp_path, gz, layout):
    folder = {"flat": tmp_path, "torchvision": tmp_path / "MNIST" / "raw", "raw_subfolder": tmp_path / "raw"}[layout]
    train, test = write_dataset(str(folder), gz, seed=3)
    splits = load_dataset("mnist", tmp_path, log=None)
    assert_split(splits.train, train)
    assert_split(splits.test, test)
    assert splits.train.classes == MNIST_CLASSES and splits.train.name == "mnist"


def test_load_idx_dotted_names_and_mixed_compression(tmp_path):
    train = make_split(20, 5)
    test = make_split(7, 6)
    write_split_files(str(tmp_path), "train", *train, gz=True, dotted=True)
    write_split_files(str(tmp_path), "test", *test, gz=False)
    splits = load_dataset("mnist", str(tmp_path), log=None)
    assert_split(splits.train, train)
    assert_split(splits.test, test)


def test_fashion_and_mnist_side_by_side(tmp_path):
    mnist = write_dataset(str(tmp_path / "MNIST" / "raw"), gz=True, seed=10)
    fashion = write_dataset(str(tmp_path / "FashionMNIST" / "raw"), gz=True, seed=20)
    m = load_dataset("mnist", tmp_path, log=None)
    f = load_dataset("Fashion_MNIST", tmp_path, log=None)
    assert_split(m.train, mnist[0])
    assert_split(f.train, fashion[0])
    assert_split(f.test, fashion[1])
    assert f.train.classes == FASHION_MNIST_CLASSES and f.train.name == "fashion-mnist"
    assert len(FASHION_MNIST_CLASSES) == 10 and FASHION_MNIST_CLASSES[9] == "Ankle boot"


def idx_bytes(magic, dims, payload):
    return magic.to_bytes(4, "big") + b"".join(d.to_bytes(4, "big") for d in dims) + payload


def write_pair(folder, image_bytes, label_bytes, gz=False):
    """A train pair with the given raw contents, plus a valid test pair, in a flat folder."""
    suffix = ".gz" if gz else ""
    images_path = os.path.join(folder, "train-images-idx3-ubyte" + suffix)
    labels_path = os.path.join(folder, "train-labels-idx1-ubyte" + suffix)
    for path, data in ((images_path, image_bytes), (labels_path, label_bytes)):
        with open(path, "wb") as f:
            f.write(gzip.compress(data) if gz else data)
    write_split_files(folder, "test", *make_split(4, 9), gz=False)
    return images_path, labels_path


GOOD_IMAGES = idx_bytes(0x803, (3, 28, 28), bytes(3 * 784))
GOOD_LABELS = idx_bytes(0x801, (3,), bytes([1, 2, 3]))
BAD_IDX_CASES = {
    "images_magic": (idx_bytes(0x801, (3,), bytes(3)), GOOD_LABELS, "images", r"wrong magic number 0x00000801"),
    "labels_magic": (GOOD_IMAGES, GOOD_IMAGES, "labels", r"wrong magic number 0x00000803"),
    "not_idx": (b"<html>not found</html>", GOOD_LABELS, "images", r"wrong magic number"),
    "int_images": (idx_bytes(0x0C03, (3, 28, 28), bytes(3 * 784 * 4)), GOOD_LABELS, "images", r"wrong magic"),
    "truncated_data": (GOOD_IMAGES[:-1], GOOD_LABELS, "images", r"truncated.*only 2351 bytes follow"),
    "truncated_header": (GOOD_IMAGES[:10], GOOD_LABELS, "images", r"truncated: the IDX header needs 16 bytes"),
    "too_short": (b"\0\0", GOOD_LABELS, "images", r"truncated: 2 bytes"),
    "extra_bytes": (GOOD_IMAGES + b"\0", GOOD_LABELS, "images", r"1 unexpected bytes after"),
    "count_mismatch": (GOOD_IMAGES, idx_bytes(0x801, (2,), bytes([1, 2])), "images",
                       r"has 3 images but .*train-labels-idx1-ubyte\S* has 2 labels"),
    "label_range": (GOOD_IMAGES, idx_bytes(0x801, (3,), bytes([1, 10, 3])), "labels",
                    r"label 10 at index 1 is outside 0-9"),
    "image_size": (idx_bytes(0x803, (3, 28, 27), bytes(3 * 28 * 27)), GOOD_LABELS, "images",
                   r"images are 28x27; fastmnist expects 28x28"),
}


@pytest.mark.parametrize("gz", [False, True], ids=["raw", "gz"])
@pytest.mark.parametrize("case", list(BAD_IDX_CASES))
def test_bad_idx_files(tmp_path, case, gz):
    image_bytes, label_bytes, culprit, message = BAD_IDX_CASES[case]
    images_path, labels_path = write_pair(str(tmp_path), image_bytes, label_bytes, gz)
    named = images_path if culprit == "images" else labels_path
    with pytest.raises(DatasetError, match=re.escape(named) + ".*" + message):
        load_dataset("mnist", tmp_path, log=None)


def test_good_pair_helper_loads(tmp_path):
    """The bad-file cases above differ from this valid pair only in the broken part."""
    write_pair(str(tmp_path), GOOD_IMAGES, GOOD_LABELS, gz=True)
    splits = load_dataset("mnist", tmp_path, log=None)
    assert splits.train.labels.tolist() == [1, 2, 3]


def test_corrupt_gzip(tmp_path):
    images_path, labels_path = write_pair(str(tmp_path), GOOD_IMAGES, GOOD_LABELS, gz=True)
    data = open(images_path, "rb").read()
    with open(images_path, "wb") as f:
        f.write(data[: len(data) // 2])
    with pytest.raises(DatasetError, match=re.escape(images_path) + ": corrupt or truncated gzip"):
        load_idx(images_path, labels_path)


def test_missing_data_errors(tmp_path):
    with pytest.raises(DatasetError, match="no such folder"):
        load_dataset("mnist", tmp_path / "nope", log=None)
    write_split_files(str(tmp_path), "train", *make_split(3, 1), gz=True)  # test split missing
    with pytest.raises(DatasetError, match=r"no MNIST data found; looked for .*t10k-images.*fastmnist download"):
        load_dataset("mnist", tmp_path, log=None)
    with pytest.raises(DatasetError, match="bundled sample is MNIST only"):
        load_dataset("fashion-mnist", None, log=None)
    with pytest.raises(ValueError, match="unknown dataset 'cifar'"):
        load_dataset("cifar", tmp_path, log=None)


# ---------------------------------------------------------------------------------------------------- CSV


def csv_text(images, labels, header):
    rows = [",".join(["label"] + [f"{r}x{c}" for r in range(1, 29) for c in range(1, 29)])] if header else []
    flat = images.reshape(len(images), -1)
    rows += [",".join(str(v) for v in [int(lab)] + flat[i].tolist()) for i, lab in enumerate(labels)]
    return "\n".join(rows) + "\n"


@pytest.mark.parametrize("header", [False, True], ids=["no_header", "header"])
@pytest.mark.parametrize("naming", ["mnist_", "", "gz"])
def test_load_csv(tmp_path, header, naming):
    train, test = make_split(9, 30), make_split(4, 31)
    for split, (images, labels) in (("train", train), ("test", test)):
        text = csv_text(images, labels, header)
        if naming == "gz":
            with open(tmp_path / f"mnist_{split}.csv.gz", "wb") as f:
                f.write(gzip.compress(text.encode()))
        else:
            (tmp_path / f"{naming}{split}.csv").write_text(text)
    splits = load_dataset("mnist", tmp_path, log=None)
    assert_split(splits.train, train)
    assert_split(splits.test, test)


def test_csv_float_pixels_and_blank_lines(tmp_path):
    g = torch.Generator().manual_seed(4)
    unit = torch.rand(5, 784, generator=g, dtype=torch.float64)
    labels = torch.randint(0, 10, (5,), generator=g)
    path = tmp_path / "unit.csv"
    rows = [",".join([str(int(labels[i]))] + [repr(v) for v in unit[i].tolist()]) for i in range(5)]
    path.write_text("\n" + "\n\n".join(rows) + "\n\n")
    data = load_csv(path)
    assert data.images.dtype == torch.float32 and torch.equal(data.labels, labels)
    torch.testing.assert_close(data.images.reshape(5, -1), unit.float())
    x, _ = data.tensors()
    torch.testing.assert_close(x, unit.float())
    # non-integer values above 1 are on the 0-255 scale
    path.write_text("\n".join(",".join([str(int(labels[i]))] + [repr(v * 255) for v in unit[i].tolist()])
                              for i in range(5)))
    torch.testing.assert_close(load_csv(path).images.reshape(5, -1), unit.float())


def bad_csv_rows():
    good = ["3"] + ["0"] * 784
    cases = {
        "short_row": (["3"] + ["0"] * 783, r"line 3 has 784 values; expected 785"),
        "long_row": (good + ["1"], r"line 3 has 786 values; expected 785"),
        "non_numeric": (["3"] + ["0"] * 100 + ["abc"] + ["0"] * 683, r"line 3, column 102: 'abc' is not a number"),
        "empty_cell": (["3"] + ["0"] * 5 + [""] + ["0"] * 778, r"line 3, column 7: '' is not a number"),
        "nan": (["3"] + ["0"] * 9 + ["nan"] + ["0"] * 774, r"line 3, column 11: non-finite value nan"),
        "inf": (["3"] + ["inf"] + ["0"] * 783, r"line 3, column 2: non-finite value inf"),
        "label_high": (["10"] + ["0"] * 784, r"line 3: label 10 is not an integer 0-9"),
        "label_negative": (["-1"] + ["0"] * 784, r"line 3: label -1 is not an integer 0-9"),
        "label_fraction": (["2.5"] + ["0"] * 784, r"line 3: label 2.5 is not an integer 0-9"),
        "pixel_range": (["3"] + ["0"] * 3 + ["256"] + ["0"] * 780, r"line 3, column 5: pixel value 256 is outside"),
    }
    return good, cases


@pytest.mark.parametrize("case", list(bad_csv_rows()[1]))
def test_bad_csv(tmp_path, case):
    good, cases = bad_csv_rows()
    row, message = cases[case]
    path = tmp_path / "bad.csv"
    path.write_text("\n".join([",".join(["label"] + [f"p{i}" for i in range(784)]), ",".join(good), ",".join(row),
                               ",".join(good)]) + "\n")
    with pytest.raises(DatasetError, match=re.escape(str(path)) + ": " + message):
        load_csv(path)


def test_bad_csv_consistent_wrong_width_and_empty(tmp_path):
    path = tmp_path / "narrow.csv"
    path.write_text("1,2,3\n4,5,6\n")
    with pytest.raises(DatasetError, match=re.escape(str(path)) + r": line 1 has 3 values; expected 785"):
        load_csv(path)
    path = tmp_path / "empty.csv"
    path.write_text("label,pixel0\n\n")
    with pytest.raises(DatasetError, match=re.escape(str(path)) + ": no data rows"):
        load_csv(path)
    path = tmp_path / "binary.csv"
    path.write_bytes(b"\xff\xfe\x00\x81" * 10)
    with pytest.raises(DatasetError, match=re.escape(str(path)) + ": not a text"):
        load_csv(path)


# --------------------------------------------------------------------------------------- bundled sample


def test_bundled_sample(capsys):
    splits = load_dataset()
    err = capsys.readouterr().err
    assert err == "no data given: using the bundled MNIST sample (5000 train / 1000 test images)\n"
    assert (len(splits.train), len(splits.test)) == (5000, 1000)
    for data in splits:
        assert data.images.shape[1:] == (28, 28) and data.images.dtype == torch.uint8
        assert int(data.labels.min()) >= 0 and int(data.labels.max()) <= 9
        counts = data.class_counts()
        assert (counts > 0).all(), counts
        assert int(counts.min()) > len(data) // 20  # no class starved (real MNIST: ~10% each)
        assert 0.05 < data.tensors()[0].mean() < 0.3  # real digits: mostly black background
    assert not torch.equal(splits.train.images[:1000], splits.test.images)
    messages = []
    load_dataset("mnist", log=messages.append)
    assert len(messages) == 1 and "bundled MNIST sample" in messages[0]


def test_sample_files_are_package_data():
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        patterns = tomllib.load(f)["tool"]["setuptools"]["package-data"]["fastmnist"]
    package_dir = os.path.join(ROOT, "fastmnist")
    names = sorted(os.listdir(SAMPLE_DIR))
    assert names == sorted(n + ".gz" for pair in IDX_FILES.values() for n in pair)
    for name in names:
        rel = os.path.relpath(os.path.join(SAMPLE_DIR, name), package_dir)
        assert any(fnmatch.fnmatch(rel, p) for p in patterns), (rel, patterns)
    assert sum(os.path.getsize(os.path.join(SAMPLE_DIR, n)) for n in names) < 2_000_000


# ------------------------------------------------------------------------------------------- tensors


def test_dataset_tensors():
    images, labels = make_split(6, 40)
    data = Dataset(images, labels)
    x, y = data.tensors()
    assert x.shape == (6, 784) and x.dtype == torch.float32 and y is not None and torch.equal(y, labels)
    torch.testing.assert_close(x, images.reshape(6, -1).float() / 255, rtol=0, atol=0)
    assert 0 <= float(x.min()) and float(x.max()) <= 1
    x4, _ = data.tensors(flatten=False, dtype=torch.float64)
    assert x4.shape == (6, 1, 28, 28) and x4.dtype == torch.float64
    torch.testing.assert_close(x4.reshape(6, -1), x.double())
    floaty = Dataset(images.float() / 255, labels)
    torch.testing.assert_close(floaty.tensors()[0], x)
    assert len(data.take(4)) == 4
    with pytest.raises(ValueError, match="6 images but 5 labels"):
        Dataset(images, labels[:5])
    with pytest.raises(ValueError, match="labels must be int64"):
        Dataset(images, labels.int())


# ------------------------------------------------------------------------------------------- batches


@pytest.mark.parametrize("n,batch_size", [(1, 1), (10, 3), (64, 16), (100, 7), (5, 8)])
@pytest.mark.parametrize("shuffle", [False, True])
def test_batches_cover_every_index_once(n, batch_size, shuffle):
    x = torch.arange(n).repeat_interleave(3).reshape(n, 3).float()
    y = torch.arange(n)
    g = torch.Generator().manual_seed(n + batch_size)
    orders = []
    for _ in range(3):
        batches = list(iterate_batches(x, y, batch_size, shuffle=shuffle, generator=g))
        assert len(batches) == -(-n // batch_size)
        assert [len(b[1]) for b in batches[:-1]] == [batch_size] * (len(batches) - 1)  # only the last is partial
        seen = torch.cat([yb for _, yb in batches])
        assert torch.equal(torch.sort(seen).values, y)  # every index exactly once
        for xb, yb in batches:
            assert torch.equal(xb[:, 0], yb.float())  # rows stay paired with their labels
        orders.append(seen)
    if not shuffle:
        assert torch.equal(orders[0], y)
    elif n >= 10:
        assert not torch.equal(orders[0], orders[1])  # reshuffled each epoch


def test_batches_seeded_drop_last_and_class():
    x, y = torch.randn(50, 4), torch.arange(50)
    a = [yb for _, yb in iterate_batches(x, y, 8, True, torch.Generator().manual_seed(7))]
    b = [yb for _, yb in iterate_batches(x, y, 8, True, torch.Generator().manual_seed(7))]
    assert all(torch.equal(p, q) for p, q in zip(a, b))
    dropped = list(iterate_batches(x, y, 8, shuffle=True, drop_last=True, device="cpu"))
    assert len(dropped) == 6 and all(len(yb) == 8 for _, yb in dropped)
    loader = Batches(x, y, 8, shuffle=True, generator=torch.Generator().manual_seed(1), device="cpu")
    assert len(loader) == 7 and len(Batches(x, y, 8, drop_last=True)) == 6
    epochs = [torch.cat([yb for _, yb in loader]) for _ in range(2)]
    assert all(torch.equal(torch.sort(e).values, y) for e in epochs)
    assert not torch.equal(epochs[0], epochs[1])


def test_batches_bad_arguments():
    x, y = torch.randn(5, 2), torch.arange(5)
    with pytest.raises(ValueError, match="batch_size must be a positive integer, got 0"):
        list(iterate_batches(x, y, 0))
    with pytest.raises(ValueError, match="batch_size must be a positive integer"):
        list(iterate_batches(x, y, 2.0))
    with pytest.raises(ValueError, match="same first dimension"):
        list(iterate_batches(x, y[:4], 2))
    with pytest.raises(TypeError, match="must be tensors"):
        Batches(x.numpy(), y, 2)


# ----------------------------------------------------------------------------------------- read_image


def test_read_image_gray_28(tmp_path):
    pixels = np.random.default_rng(0).integers(0, 256, (28, 28), dtype=np.uint8)
    pixels[0, :] = pixels[-1, :] = pixels[:, 0] = pixels[:, -1] = 0  # dark border: not inverted
    Image.fromarray(pixels, "L").save(tmp_path / "digit.png")
    x = read_image(tmp_path / "digit.png")
    assert x.shape == (28, 28) and x.dtype == torch.float32
    torch.testing.assert_close(x, torch.from_numpy(pixels).float() / 255, rtol=0, atol=0)
    torch.testing.assert_close(read_image(tmp_path / "digit.png", invert=True), 1 - x)


def test_read_image_rgb_resize_and_auto_invert(tmp_path):
    gray = np.full((56, 56), 255, dtype=np.uint8)  # black digit on white, twice the size
    gray[10:46, 24:32] = 0
    rgb = np.stack([gray] * 3, axis=-1)
    Image.fromarray(rgb, "RGB").save(tmp_path / "big.png")
    x = read_image(tmp_path / "big.png")
    assert x.shape == (28, 28)
    assert float(x[0].max()) < 0.05 and float(x[14, 14]) > 0.9  # inverted: white stroke on black
    assert float(read_image(tmp_path / "big.png", invert=False)[0].min()) > 0.95
    rgba = np.zeros((28, 28, 4), dtype=np.uint8)  # black stroke on a transparent background
    rgba[5:23, 12:16, 3] = 255
    Image.fromarray(rgba, "RGBA").save(tmp_path / "alpha.png")
    y = read_image(tmp_path / "alpha.png")
    assert float(y[0].max()) == 0 and float(y[10, 13]) == 1
    deep = np.arange(28 * 28, dtype=np.uint16).reshape(28, 28) * 80  # 16-bit PNG
    Image.fromarray(deep).save(tmp_path / "deep.png")
    z = read_image(tmp_path / "deep.png", invert=False)
    assert abs(float(z.max()) - 1) < 1e-6 and float(z.min()) == 0


def test_read_image_errors(tmp_path):
    (tmp_path / "fake.png").write_bytes(b"not a png")
    with pytest.raises(DatasetError, match=re.escape(str(tmp_path / "fake.png")) + ": not an image"):
        read_image(tmp_path / "fake.png")
    with pytest.raises(FileNotFoundError):
        read_image(tmp_path / "missing.png")
