"""The fastmnist command end to end, in temporary folders, on the bundled MNIST sample."""

import contextlib
import csv
import io
import json
import os
import subprocess
import sys

import pytest
import torch
from PIL import Image

import fastmnist.nn as fnn
from fastmnist import cli, data, models
from helpers import one_thread  # noqa: F401 (autouse fixture: the tests run on one thread)

TRAIN_MLP = ["train", "--model", "mlp", "--backend", "eager", "--limit", "1000", "--epochs", "2",
             "--optimizer", "adam", "--lr", "0.001", "--no-progress"]
PLOTS = ("curves.png", "confusion.png", "samples.png")


def run(capsys, *argv):
    """(exit status, stdout, stderr) of `fastmnist argv...`, in process."""
    status = cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return status, out, err


def fails(capsys, *argv, match):
    status, out, err = run(capsys, *argv)
    assert status == 2, (status, out, err)
    assert "Traceback" not in err and err.strip().splitlines()[-1].startswith(f"fastmnist {argv[0]}: error: ")
    assert match in err, err
    return err


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """An mlp trained by the CLI (eager), shared by the tests below: (output folder, stdout, stderr). A module
    fixture cannot use capsys, so it redirects the streams itself."""
    out = tmp_path_factory.mktemp("run") / "mlp"
    stdout, stderr = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        status = cli.main(TRAIN_MLP + ["--out", str(out)])
    assert status == 0, stderr.getvalue()
    return out, stdout.getvalue(), stderr.getvalue()


@pytest.fixture(scope="module")
def test_split():
    return data.load_dataset("mnist", None, log=None).test


def assert_png(path):
    assert os.path.getsize(path) > 0
    with Image.open(path) as img:
        assert img.format == "PNG" and img.width > 100 and img.height > 100


def load(path):
    return torch.load(path, map_location="cpu", weights_only=True)


# ---- train -----------------------------------------------------------------------------------------------------

def test_train_writes_checkpoint_metrics_and_plots(trained, test_split):
    out, stdout, stderr = trained
    assert sorted(os.listdir(out)) == sorted(["checkpoint.pt", "metrics.csv", "metrics.json", *PLOTS])
    assert "bundled MNIST sample" in stderr
    lines = stdout.strip().splitlines()
    assert lines[-1].endswith(str(out)) and lines[1].startswith("epoch 1/2  loss ")
    assert lines[2].startswith("epoch 2/2  loss ")
    for name in PLOTS:
        assert_png(out / name)

    checkpoint = load(out / "checkpoint.pt")
    assert checkpoint["format"] == cli.CHECKPOINT_FORMAT and checkpoint["model"] == "mlp"
    assert checkpoint["backend"] == "eager" and checkpoint["options"] == {}
    assert checkpoint["classes"] == list(data.MNIST_CLASSES) and checkpoint["dataset"] == "mnist"
    assert checkpoint["recipe"]["epochs"] == 2 and checkpoint["recipe"]["optimizer"] == "adam"
    assert checkpoint["recipe"]["lr"] == 0.001 and checkpoint["recipe"]["batch_size"] == 64
    assert checkpoint["metrics"]["test_acc"] > 0.5

    with open(out / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["epoch"]) for r in rows] == [1, 2]
    summary = json.loads((out / "metrics.json").read_text())
    assert summary["train_images"] == 1000 and summary["step"] == "autograd"
    assert [e["test_acc"] for e in summary["epochs"]] == [float(r["test_acc"]) for r in rows]
    assert summary["final"]["test_acc"] == checkpoint["metrics"]["test_acc"] == float(rows[-1]["test_acc"])

    # the checkpoint's weights reproduce the recorded test accuracy
    model = models.create_model("mlp", "eager")
    model.load_state_dict(checkpoint["state_dict"])
    x, y = test_split.tensors(flatten=False)
    with torch.no_grad():
        accuracy = (model(x).argmax(1) == y).double().mean().item()
    assert accuracy == pytest.approx(checkpoint["metrics"]["test_acc"])


def test_train_is_reproducible_and_seeded(tmp_path, capsys, trained):
    out, _, _ = trained
    quick = [*TRAIN_MLP, "--epochs", "1", "--limit", "300", "--no-plots"]
    assert run(capsys, *quick, "--out", tmp_path / "a")[0] == 0
    assert run(capsys, *quick, "--out", tmp_path / "b")[0] == 0
    assert run(capsys, *quick, "--seed", "1", "--out", tmp_path / "c")[0] == 0
    assert sorted(os.listdir(tmp_path / "a")) == ["checkpoint.pt", "metrics.csv", "metrics.json"]
    a, b, c = (load(tmp_path / n / "checkpoint.pt")["state_dict"] for n in "abc")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["fc1.weight"], c["fc1.weight"])


def test_train_fashion_recipe_without_data_falls_back_to_the_sample(tmp_path, capsys):
    status, out, err = run(capsys, "train", "--model", "softmax", "--backend", "eager", "--limit", "500",
                           "--epochs", "1", "--no-plots", "--out", tmp_path)
    assert status == 0, err
    assert "bundled MNIST sample" in err and "in place of Fashion-MNIST" in err
    assert load(tmp_path / "checkpoint.pt")["dataset"] == "mnist"
    assert out.strip().splitlines()[-1].endswith(str(tmp_path))
    # asking for Fashion-MNIST explicitly without data is an error, not a silent fallback
    fails(capsys, "train", "--model", "softmax", "--dataset", "fashion-mnist", "--out", tmp_path,
          match="no Fashion-MNIST data given")


def test_train_classifier_options(tmp_path, capsys):
    status, _, err = run(capsys, "train", "--model", "classifier", "--backend", "eager", "--hidden", "sigmoid",
                         "--loss", "mse", "--limit", "200", "--epochs", "1", "--no-plots", "--out", tmp_path)
    assert status == 0, err
    checkpoint = load(tmp_path / "checkpoint.pt")
    assert checkpoint["options"] == {"hidden": "sigmoid", "loss": "mse"}
    assert checkpoint["recipe"]["batch_size"] == 1 and checkpoint["recipe"]["optimizer"] == "adam"
    assert "fc1_act" in str(models.create_model("classifier", "eager", **checkpoint["options"]))
    fails(capsys, "train", "--model", "mlp", "--hidden", "sigmoid", "--out", tmp_path,
          match="--hidden and --loss are classifier options")


def test_train_data_errors(tmp_path, capsys):
    fails(capsys, "train", "--model", "mlp", "--data", tmp_path / "nowhere", "--out", tmp_path,
          match="no such folder")
    fails(capsys, "train", "--model", "mlp", "--data", tmp_path, "--out", tmp_path / "o", match="no MNIST data found")


def test_train_rejects_bad_options(capsys):
    for argv in (["--epochs", "0"], ["--lr", "-1"], ["--optimizer", "rmsprop"], ["--backend", "cuda"]):
        with pytest.raises(SystemExit) as error:
            cli.main(["train", "--model", "mlp", *argv])
        assert error.value.code == 2
    capsys.readouterr()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message for a machine without CUDA")
def test_cuda_unavailable_is_a_clear_error(tmp_path, capsys):
    fails(capsys, "train", "--model", "mlp", "--device", "cuda", "--out", tmp_path, match="CUDA is not available")


def test_auto_device_picks_cpu_without_cuda():
    assert cli.resolve_device("auto") == torch.device("cuda" if torch.cuda.is_available() else "cpu")
    assert cli.resolve_device("cpu") == torch.device("cpu")


@pytest.mark.parametrize("fused_step", [True, False])
def test_train_fused_backend(tmp_path, capsys, fused_step):
    missing = [n for n in ("SoftmaxCrossEntropyLoss",) if not hasattr(fnn, n)]
    if missing:
        pytest.skip(f"the fused mlp needs fastmnist.nn.{missing[0]}, not on this branch yet")
    import fastmnist
    argv = ["train", "--model", "mlp", "--limit", "1000", "--epochs", "1", "--optimizer", "adam", "--lr", "0.001",
            "--no-plots", "--out", tmp_path] + ([] if fused_step else ["--no-fused-step"])
    status, out, err = run(capsys, *argv)
    assert status == 0, err
    summary = json.loads((tmp_path / "metrics.json").read_text())
    if fused_step and hasattr(fastmnist, "fused_step"):
        assert summary["step"] == "fused training step"
    else:
        assert summary["step"].startswith("autograd")
    assert summary["final"]["test_acc"] > 0.5
    assert load(tmp_path / "checkpoint.pt")["backend"] == "fused"


# ---- eval ------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", [None, "eager", "fused"])
def test_eval_reports_the_checkpoint_accuracy_with_either_backend(trained, capsys, backend):
    out, _, _ = trained
    argv = ["eval", out / "checkpoint.pt", "--model", "mlp"] + (["--backend", backend] if backend else [])
    status, stdout, err = run(capsys, *argv)
    assert status == 0, err
    expected = load(out / "checkpoint.pt")["metrics"]["test_acc"]
    assert f"test accuracy {expected:.4f} on 1000 mnist test images" in stdout


def test_eval_bad_checkpoints(trained, tmp_path, capsys):
    out, _, _ = trained
    fails(capsys, "eval", tmp_path / "missing.pt", match="no such checkpoint file")
    fails(capsys, "eval", tmp_path, match="is a folder")
    (tmp_path / "garbage.pt").write_bytes(os.urandom(3000))
    fails(capsys, "eval", tmp_path / "garbage.pt", match="cannot read the checkpoint")
    whole = (out / "checkpoint.pt").read_bytes()
    (tmp_path / "truncated.pt").write_bytes(whole[:len(whole) // 2])
    fails(capsys, "eval", tmp_path / "truncated.pt", match="cannot read the checkpoint")
    torch.save({"state_dict": {}}, tmp_path / "other.pt")
    fails(capsys, "eval", tmp_path / "other.pt", match="not a fastmnist checkpoint")
    torch.save(models.create_model("mlp", "eager").state_dict(), tmp_path / "bare.pt")
    fails(capsys, "eval", tmp_path / "bare.pt", match="not a fastmnist checkpoint")
    checkpoint = load(out / "checkpoint.pt")
    checkpoint["state_dict"] = models.create_model("twolayer", "eager").state_dict()
    torch.save(checkpoint, tmp_path / "mismatch.pt")
    fails(capsys, "eval", tmp_path / "mismatch.pt", match="checkpoint weights do not fit model 'mlp'")
    fails(capsys, "eval", out / "checkpoint.pt", "--model", "lenet", match="checkpoint of model 'mlp', not 'lenet'")
    fails(capsys, "predict", out / "checkpoint.pt", "--model", "softmax", "0", match="not 'softmax'")


def test_eval_data_errors(trained, tmp_path, capsys):
    out, _, _ = trained
    fails(capsys, "eval", out / "checkpoint.pt", "--data", tmp_path / "nowhere", match="no such folder")
    fails(capsys, "eval", out / "checkpoint.pt", "--dataset", "fashion-mnist", match="no Fashion-MNIST data given")


# ---- predict ---------------------------------------------------------------------------------------------------

def test_predict_indices_and_png_agree_with_the_model(trained, test_split, tmp_path, capsys):
    out, _, _ = trained
    indices = [0, 7, 999]
    paths = []
    for i in indices:
        path = tmp_path / f"test{i}.png"
        Image.fromarray(test_split.images[i].numpy()).save(path)
        paths.append(path)
    status, stdout, err = run(capsys, "predict", out / "checkpoint.pt", *indices, *paths)
    assert status == 0, err
    lines = stdout.strip().splitlines()
    assert len(lines) == 2 * len(indices)

    model = models.create_model("mlp", "eager")
    model.load_state_dict(load(out / "checkpoint.pt")["state_dict"])
    x, y = test_split.tensors(flatten=False)
    with torch.no_grad():
        probabilities = torch.softmax(model(x[indices]), dim=1)
    confidence, predicted = probabilities.max(1)
    for k, i in enumerate(indices):
        expected = f"{predicted[k].item()}  p={confidence[k].item():.4f}"
        assert lines[k] == f"test[{i}]: {expected}  (true {y[i].item()})"
        assert lines[len(indices) + k] == f"{paths[k]}: {expected}"


def test_predict_bad_inputs(trained, tmp_path, capsys):
    out, _, _ = trained
    ckpt = out / "checkpoint.pt"
    fails(capsys, "predict", ckpt, "1000", match="index 1000 is out of range: the mnist test set has 1000 images")
    fails(capsys, "predict", ckpt, "-1", match="index -1 is out of range")
    (tmp_path / "fake.png").write_text("not an image")
    fails(capsys, "predict", ckpt, tmp_path / "fake.png", match="not an image file Pillow can read")
    fails(capsys, "predict", ckpt, tmp_path / "absent.png", match="no such image file")
    fails(capsys, "predict", tmp_path / "absent.pt", "0", match="no such checkpoint file")


# ---- download, the command's entry points ----------------------------------------------------------------------

def test_download_calls_the_data_layer(monkeypatch, tmp_path, capsys):
    calls = []

    def fake_download(dataset, root):
        calls.append((dataset, root))
        folder = os.path.join(root, data.dataset_info(dataset).folder, "raw")
        return [os.path.join(folder, name) for name in data.dataset_info(dataset).md5]

    monkeypatch.setattr(data, "download", fake_download)
    status, stdout, _ = run(capsys, "download", "--dataset", "fashion-mnist", "--root", tmp_path)
    assert status == 0 and calls == [("fashion-mnist", str(tmp_path))]
    assert "fashion-mnist: 4 files in" in stdout and "FashionMNIST" in stdout

    def failing(dataset, root):
        raise data.DownloadError("train-images-idx3-ubyte.gz: every mirror failed")

    monkeypatch.setattr(data, "download", failing)
    fails(capsys, "download", "--root", tmp_path, match="every mirror failed")


def test_commands_table_and_module_entry_point(capsys):
    assert set(cli.COMMANDS) >= {"train", "eval", "predict", "download"}
    with pytest.raises(SystemExit) as error:
        cli.main([])
    assert error.value.code == 2 and "required" in capsys.readouterr().err
    result = subprocess.run([sys.executable, "-m", "fastmnist", "--help"], capture_output=True, text=True,
                            cwd=os.path.dirname(os.path.dirname(os.path.abspath(cli.__file__))), timeout=120)
    assert result.returncode == 0 and "train" in result.stdout and "predict" in result.stdout
