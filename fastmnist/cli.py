"""The `fastmnist` command: train the tutorial models, evaluate and use checkpoints, download datasets.

    fastmnist train --model mlp [--backend fused|eager] [--epochs N] ... [--out DIR]
    fastmnist eval runs/mlp-fused/checkpoint.pt [--data DIR]
    fastmnist predict runs/mlp-fused/checkpoint.pt digit.png 17
    fastmnist download --dataset fashion-mnist --root data

Each subcommand is a function registered in COMMANDS (name -> (add_arguments, run)); run(args) returns the exit
status. Expected failures (bad checkpoint, bad image, missing data, download failure) print one line
"fastmnist <command>: error: ..." and exit with status 2, without a traceback.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import importlib
import json
import math
import os
import re
import sys
import time

import torch

from . import data, models

CHECKPOINT_FORMAT = "fastmnist-checkpoint"
CHECKPOINT_VERSION = 1
CHECKPOINT_NAME = "checkpoint.pt"
GRID_IMAGES = 32


class CLIError(Exception):
    """An expected failure: reported as one line, exit status 2."""


def _log(message):
    print(message, file=sys.stderr, flush=True)


def resolve_device(name):
    """"auto" -> "cuda" when available, else "cpu"; "cuda" must be available."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise CLIError("--device cuda: CUDA is not available in this torch build / on this machine")
    return torch.device(name)


def _positive_int(text):
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def _positive_float(text):
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}") from None
    if not (value > 0 and math.isfinite(value)):
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text}")
    return value


def _add_data_arguments(parser, dataset_help):
    parser.add_argument("--dataset", choices=data.DATASET_NAMES, help=dataset_help)
    parser.add_argument("--data", metavar="DIR",
                        help="folder with the dataset's IDX or CSV files (default: the bundled MNIST sample)")


def _add_device_argument(parser):
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                        help="auto: cuda when available, else cpu (default)")


# ---- data ---------------------------------------------------------------------------------------------------

def load_splits(dataset, root, fall_back_to_sample=False):
    """DataSplits of `dataset` under root. With no root and a non-MNIST dataset, the bundled MNIST sample when
    fall_back_to_sample (saying so in the one line the data layer prints), else the data layer's DatasetError."""
    if root is None and dataset != "mnist" and fall_back_to_sample:
        title = data.dataset_info(dataset).title
        return data.load_sample(log=lambda line: _log(f"{line}, in place of {title}, which needs --data DIR"))
    return data.load_dataset(dataset, root)


# ---- checkpoints --------------------------------------------------------------------------------------------

def save_checkpoint(path, checkpoint):
    """torch.save to a temporary file in the same folder, then os.replace: never a partial file under `path`."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    tmp = os.path.join(folder, f".{os.path.basename(path)}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            torch.save(checkpoint, f)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def load_checkpoint(path, expected_model=None):
    """The checkpoint dict at `path`, checked; CLIError when it is missing, unreadable, not a fastmnist checkpoint
    or (with expected_model) of another model."""
    if not os.path.exists(path):
        raise CLIError(f"{path}: no such checkpoint file")
    if os.path.isdir(path):
        raise CLIError(f"{path}: is a folder, not a checkpoint file")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch.load raises many types for a damaged file (zip, pickle, EOF, ...)
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise CLIError(f"{path}: cannot read the checkpoint, the file is damaged or not a torch file ({reason})") \
            from None
    if not isinstance(checkpoint, dict) or checkpoint.get("format") != CHECKPOINT_FORMAT:
        raise CLIError(f"{path}: not a fastmnist checkpoint (written by `fastmnist train`)")
    if checkpoint.get("version") != CHECKPOINT_VERSION:
        raise CLIError(f"{path}: checkpoint version {checkpoint.get('version')!r} is not supported "
                       f"(this fastmnist reads version {CHECKPOINT_VERSION})")
    missing = [k for k in ("model", "options", "backend", "state_dict", "classes") if k not in checkpoint]
    if missing or checkpoint["model"] not in models.MODELS:
        raise CLIError(f"{path}: incomplete fastmnist checkpoint (missing {', '.join(missing) or 'a known model'})")
    if expected_model is not None and checkpoint["model"] != expected_model:
        raise CLIError(f"{path}: checkpoint of model {checkpoint['model']!r}, not {expected_model!r}")
    return checkpoint


def model_from_checkpoint(checkpoint, backend=None, device="cpu"):
    """The checkpoint's model for `backend` (default: the one it was trained with) with its weights, eval mode."""
    backend = backend or checkpoint["backend"]
    model = models.create_model(checkpoint["model"], backend, **checkpoint["options"])
    try:
        model.load_state_dict(checkpoint["state_dict"])
    except RuntimeError as error:
        raise CLIError(f"checkpoint weights do not fit model {checkpoint['model']!r}: "
                       f"{str(error).splitlines()[0]}") from None
    return model.to(device).eval()


# ---- train --------------------------------------------------------------------------------------------------

def _train_arguments(parser):
    parser.add_argument("--model", required=True, choices=models.MODELS)
    _add_data_arguments(parser, "default: the model's recipe dataset")
    parser.add_argument("--epochs", type=_positive_int, help="default: the model's recipe")
    parser.add_argument("--batch-size", type=_positive_int, help="default: the model's recipe")
    parser.add_argument("--lr", type=_positive_float, help="learning rate (default: the model's recipe)")
    parser.add_argument("--optimizer", choices=("sgd", "adam"), help="default: the model's recipe")
    parser.add_argument("--backend", choices=models.BACKENDS, default="fused",
                        help="fused: fastmnist's layers (default); eager: plain torch.nn")
    parser.add_argument("--no-fused-step", action="store_true",
                        help="with --backend fused, train the fused modules under autograd instead of the fused "
                             "training step")
    _add_device_argument(parser)
    parser.add_argument("--seed", type=int, default=0, help="seeds the initial weights and batch order (default 0)")
    parser.add_argument("--limit", type=_positive_int, metavar="N", help="train on the first N training images only")
    parser.add_argument("--out", metavar="DIR", help="output folder (default: runs/<model>-<backend>)")
    parser.add_argument("--hidden", choices=models.CLASSIFIER_HIDDEN,
                        help="classifier only: hidden layer (default leaky_relu_layernorm)")
    parser.add_argument("--loss", choices=models.CLASSIFIER_LOSSES, help="classifier only: loss (default bce)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--no-plots", action="store_true", help="write no PNG plots")


def _make_fused_step(model, loss_fn, optimizer):
    """(step or None, description): fastmnist.fused_step when it exists and supports this model/optimizer."""
    import fastmnist

    make = getattr(fastmnist, "fused_step", None)
    if make is None:
        return None, "autograd (fastmnist.fused_step is not available in this build)"
    fusion_error = getattr(fastmnist, "FusionError", None)
    unsupported = (fusion_error,) if isinstance(fusion_error, type) else ()
    try:
        return make(model, loss_fn, optimizer), "fused training step"
    except unsupported as error:
        return None, f"autograd (the fused training step does not support this setup: {error})"


def _write_metrics(out, history, summary):
    rows = history.as_dicts()
    csv_path = os.path.join(out, "metrics.csv")
    with open(csv_path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    json_path = os.path.join(out, "metrics.json")
    with open(json_path, "w") as f:
        json.dump({**summary, "epochs": rows}, f, indent=2)
        f.write("\n")
    return csv_path, json_path


def cmd_train(args):
    from .train import fit

    name = args.model
    if name != "classifier" and (args.hidden or args.loss):
        raise CLIError(f"--hidden and --loss are classifier options; model {name!r} has none")
    options = {} if name != "classifier" else {"hidden": args.hidden or "leaky_relu_layernorm",
                                                "loss": args.loss or "bce"}
    recipe = models.RECIPES[name]
    device = resolve_device(args.device)
    dataset = args.dataset or recipe.dataset
    splits = load_splits(dataset, args.data, fall_back_to_sample=args.dataset is None)
    train_set = splits.train.take(args.limit) if args.limit else splits.train
    classes = tuple(splits.train.classes)
    out = args.out or os.path.join("runs", f"{name}-{args.backend}")
    os.makedirs(out, exist_ok=True)

    torch.manual_seed(args.seed)
    model = models.create_model(name, args.backend, **options).to(device)
    loss_fn = models.create_loss(name, args.backend, **options)
    optimizer = models.create_optimizer(name, model.parameters(), args.optimizer, args.lr)
    step, mode = None, "autograd"
    if args.backend == "fused" and not args.no_fused_step:
        step, mode = _make_fused_step(model, loss_fn, optimizer)
    used = dataclasses.replace(recipe, epochs=args.epochs or recipe.epochs,
                               batch_size=args.batch_size or recipe.batch_size,
                               lr=optimizer.param_groups[0]["lr"],
                               optimizer="adam" if isinstance(optimizer, torch.optim.Adam) else "sgd",
                               dataset=splits.train.name)
    print(f"{name} ({args.backend}, {mode}) on {splits.train.name}: {len(train_set)} train / {len(splits.test)} "
          f"test images, {used.epochs} epochs, batch {used.batch_size}, {used.optimizer} lr {used.lr:g}, "
          f"device {device}", flush=True)

    x_train, y_train = train_set.tensors(flatten=False)
    x_test, y_test = splits.test.tensors(flatten=False)
    start = time.perf_counter()
    history = fit(model, loss_fn, optimizer, (x_train, y_train), (x_test, y_test), epochs=used.epochs,
                  batch_size=used.batch_size, target_kind=models.target_kind(name, **options), device=device, step=step,
                  seed=args.seed, progress=False if args.no_progress else None)
    wall = time.perf_counter() - start
    final = history.final
    metrics = {"loss": final.loss, "train_acc": final.train_acc, "test_acc": final.test_acc,
               "epochs": final.epoch, "train_seconds": sum(e.seconds for e in history.epochs),
               "wall_seconds": wall}
    summary = {"model": name, "options": options, "backend": args.backend, "step": mode, "device": str(device),
               "dataset": splits.train.name, "data": args.data or "bundled sample",
               "train_images": len(train_set), "test_images": len(splits.test), "seed": args.seed,
               "recipe": dataclasses.asdict(used), "final": metrics}

    checkpoint_path = os.path.join(out, CHECKPOINT_NAME)
    save_checkpoint(checkpoint_path, {
        "format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION, "model": name, "options": options,
        "backend": args.backend, "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "recipe": dataclasses.asdict(used), "dataset": splits.train.name, "classes": list(classes),
        "metrics": metrics, "history": history.as_dicts(),
    })
    _write_metrics(out, history, summary)
    if not args.no_plots:
        _write_plots(out, history, x_test, y_test, classes, f"{name} ({args.backend}) on {splits.train.name}")
    print(f"test accuracy {final.test_acc:.4f}; wrote {out}", flush=True)
    return 0


def _write_plots(out, history, x_test, y_test, classes, title):
    from . import plots

    plots.plot_curves(history.epochs, os.path.join(out, "curves.png"), title=title)
    plots.plot_confusion(y_test, history.predictions, classes, os.path.join(out, "confusion.png"), title=title)
    plots.plot_image_grid(x_test[:GRID_IMAGES], y_test[:GRID_IMAGES], history.predictions[:GRID_IMAGES], classes,
                          os.path.join(out, "samples.png"),
                          title="test images: true (top) / predicted (bottom), wrong in red")


# ---- eval / predict -----------------------------------------------------------------------------------------

def _checkpoint_arguments(parser):
    parser.add_argument("checkpoint", metavar="CKPT", help="a checkpoint written by `fastmnist train`")
    parser.add_argument("--model", choices=models.MODELS, help="fail unless the checkpoint is of this model")
    parser.add_argument("--backend", choices=models.BACKENDS,
                        help="run it with this backend (default: the one it was trained with)")
    _add_device_argument(parser)


def _eval_arguments(parser):
    _checkpoint_arguments(parser)
    _add_data_arguments(parser, "default: the dataset the checkpoint was trained on")
    parser.add_argument("--batch-size", type=_positive_int, default=1000)


def _checkpoint_splits(args, checkpoint):
    return load_splits(args.dataset or checkpoint.get("dataset", "mnist"), args.data)


def cmd_eval(args):
    from .train import evaluate

    checkpoint = load_checkpoint(args.checkpoint, args.model)
    device = resolve_device(args.device)
    model = model_from_checkpoint(checkpoint, args.backend, device)
    splits = _checkpoint_splits(args, checkpoint)
    x, y = splits.test.tensors(flatten=False)
    accuracy, _ = evaluate(model, x, y, args.batch_size)
    print(f"{checkpoint['model']} ({args.backend or checkpoint['backend']}) test accuracy {accuracy:.4f} on "
          f"{len(y)} {splits.test.name} test images")
    return 0


def _predict_arguments(parser):
    _checkpoint_arguments(parser)
    parser.add_argument("images", nargs="+", metavar="IMAGE",
                        help="an image file (PNG, ...) or an integer index into the test set")
    _add_data_arguments(parser, "for indices: default the dataset the checkpoint was trained on")


_INDEX = re.compile(r"[+-]?\d+")


def cmd_predict(args):
    checkpoint = load_checkpoint(args.checkpoint, args.model)
    device = resolve_device(args.device)
    classes = list(checkpoint["classes"])
    is_index = [bool(_INDEX.fullmatch(item)) and not os.path.exists(item) for item in args.images]
    test = _checkpoint_splits(args, checkpoint).test if any(is_index) else None
    inputs, truths = [], []
    for item, index in zip(args.images, is_index):
        if index:
            i = int(item)
            if not 0 <= i < len(test):
                raise CLIError(f"index {i} is out of range: the {test.name} test set has {len(test)} images "
                               f"(0-{len(test) - 1})")
            x, y = data.Dataset(test.images[i:i + 1], test.labels[i:i + 1]).tensors(flatten=False)
            inputs.append(x[0])
            truths.append(classes[int(y[0])])
        else:
            try:
                inputs.append(data.read_image(item).unsqueeze(0))
            except FileNotFoundError:
                raise CLIError(f"{item}: no such image file (nor an integer test-set index)") from None
            truths.append(None)
    model = model_from_checkpoint(checkpoint, args.backend, device)
    with torch.no_grad():
        logits = model(torch.stack(inputs).to(device)).float().cpu()
    # The classifier's outputs are independent sigmoids (trained on one-hot targets); the others are a softmax.
    if checkpoint["model"] == "classifier":
        probabilities = torch.sigmoid(logits)
    else:
        probabilities = torch.softmax(logits, dim=1)
    confidence, predicted = probabilities.max(dim=1)
    for item, truth, p, c in zip(args.images, truths, predicted.tolist(), confidence.tolist()):
        label = f"test[{item}]" if truth is not None else item
        extra = f"  (true {truth})" if truth is not None else ""
        print(f"{label}: {classes[p]}  p={c:.4f}{extra}")
    return 0


# ---- download -----------------------------------------------------------------------------------------------

def _download_arguments(parser):
    parser.add_argument("--dataset", choices=data.DATASET_NAMES, default="mnist")
    parser.add_argument("--root", metavar="DIR", required=True,
                        help="files go to DIR/<MNIST|FashionMNIST>/raw; then pass --data DIR")


def cmd_download(args):
    paths = data.download(args.dataset, args.root)
    print(f"{args.dataset}: {len(paths)} files in {os.path.dirname(paths[0])}")
    return 0


def _bench_arguments(parser):
    parser.add_argument("--quick", action="store_true",
                        help="1000 training images, no torch.compile, quick per-op runs: under a minute")
    parser.add_argument("--models", nargs="+", choices=models.MODELS, help="models to time (default: all)")
    parser.add_argument("--data", metavar="DIR", help="MNIST folder (default: the bundled sample)")
    parser.add_argument("--out", metavar="DIR", default=None,
                        help="folder for the JSON, Markdown and PNG results (default: benchmarks/results)")
    parser.add_argument("--no-ops", action="store_true", help="skip the per-op benchmarks")


def cmd_bench(args):
    from .bench import OP_BENCHMARKS, epochs
    from .bench.harness import RESULTS_DIR

    out = args.out or str(RESULTS_DIR)
    path = epochs.run(args.models, quick=args.quick, data_root=args.data, out=out, log=_log)
    print(f"epoch benchmark: {path}, {path.with_suffix('.md')}, {path.with_suffix('.png')}")
    if not args.no_ops:
        for name in OP_BENCHMARKS:
            module = importlib.import_module(f"fastmnist.bench.{name}")
            module.main((["--quick"] if args.quick else []) + ["--out", out])
    return 0


# ---- the command --------------------------------------------------------------------------------------------

COMMANDS = {
    "train": ("train a model and write its checkpoint, metrics and plots", _train_arguments, cmd_train),
    "eval": ("test accuracy of a checkpoint", _eval_arguments, cmd_eval),
    "predict": ("predict the class of images or test-set indices", _predict_arguments, cmd_predict),
    "download": ("download MNIST or Fashion-MNIST", _download_arguments, cmd_download),
    "bench": ("time one training epoch per model (eager, torch.compile, fused) and the fused ops",
              _bench_arguments, cmd_bench),
}


def build_parser():
    parser = argparse.ArgumentParser(prog="fastmnist", description="Fused-kernel MNIST models: train, eval, predict.")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (help_text, add_arguments, _) in COMMANDS.items():
        add_arguments(subparsers.add_parser(name, help=help_text, description=help_text))
    return parser


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return COMMANDS[args.command][2](args)
    except (CLIError, data.DatasetError, data.DownloadError) as error:
        print(f"fastmnist {args.command}: error: {error}", file=sys.stderr)
        return 2
    except FloatingPointError as error:
        print(f"fastmnist {args.command}: error: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"fastmnist {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
