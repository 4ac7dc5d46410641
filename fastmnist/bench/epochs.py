"""One training epoch of each tutorial model, at its tutorial batch size, with four implementations:

    eager          torch.nn modules under autograd, torch.optim step
    torch.compile  the whole eager step compiled (compile time reported separately)
    fused modules  fastmnist layers and losses under autograd, torch.optim step
    fused step     fastmnist.fused_step: forward, loss, backward and update in one call into C++, which also
                   gathers the batch's rows (index=); the others gather with index_select before each step

All candidates of a model start from the same weights and walk the same batches; they are timed interleaved,
round after round, in one process (harness.py), and the ratio is eager time / candidate time.

    python -m fastmnist.bench.epochs [--quick] [--models mlp lenet ...] [--data DIR] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from .. import data, models
from ..fused_step import fused_step
from ..train import make_targets
from .harness import RESULTS_DIR, Case, markdown_table, run_cases, time_compile, write_results

# (model, batch size, options, images): the tutorials' batch sizes, plus the mlp at 256. images: at most this
# many training images per epoch (None: all). The batch-1 epoch is capped: 60,000 eager steps take ~2 minutes,
# and the harness runs each candidate at least six times.
CONFIGS = [
    ("mlp", 64, {}, None),
    ("mlp", 256, {}, None),
    ("lenet", 256, {}, None),
    ("softmax", 256, {}, None),
    ("twolayer", 100, {}, None),
    ("classifier", 1, {"hidden": "leaky_relu_layernorm", "loss": "bce"}, 10000),
]


def _eager_step(model, loss_fn, optimizer):
    def step(x, target):
        optimizer.zero_grad()
        loss = loss_fn(model(x), target)
        loss.backward()
        optimizer.step()
        return loss

    return step


def _epoch(step, x, target, batch_size, order, indexed=False):
    """One pass over the data in the given order, batch by batch: rows gathered from the whole tensors, as
    fastmnist.data.iterate_batches does, or, `indexed`, by the step itself (the fused step's index argument)."""
    for start in range(0, x.shape[0], batch_size):
        idx = order[start:start + batch_size]
        if indexed:
            step(x, target, index=idx)
        else:
            step(x.index_select(0, idx), target.index_select(0, idx))


def make_case(name, batch_size, options, x, y, with_compile, seed=0):
    target = make_targets(y, models.target_kind(name, **options))
    order = torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(seed))
    torch.manual_seed(seed)
    reference = models.create_model(name, "fused", **options)

    def build(backend):
        model = models.create_model(name, backend, **options)
        model.load_state_dict(reference.state_dict())
        optimizer = models.create_optimizer(name, model.parameters())
        return model, models.create_loss(name, backend, **options), optimizer

    def epoch_of(step, indexed=False):
        return lambda: _epoch(step, x, target, batch_size, order, indexed)

    eager = epoch_of(_eager_step(*build("eager")))
    candidates = [
        ("fused modules", epoch_of(_eager_step(*build("fused")))),
        ("fused step", epoch_of(fused_step(*build("fused")), indexed=True)),
    ]
    label = (f"{name} b={batch_size}" + (f" ({options['hidden']}, {options['loss']})" if options else "")
             + f", {x.shape[0]} images")
    info = {"model": name, "batch_size": batch_size, "options": options, "images": int(x.shape[0]),
            "steps": -(-x.shape[0] // batch_size)}
    if with_compile:
        torch._dynamo.reset()
        compiled = epoch_of(torch.compile(_eager_step(*build("eager"))))
        info["compile_s"] = time_compile(compiled)  # the first epoch: compilation (and recompiles) + one epoch
        candidates.insert(0, ("torch.compile", compiled))
    return Case(label, ("eager", eager), candidates, info)


def plot(rows, path, title):
    """A bar chart of each candidate's speed-up over eager, per model."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    labels = [label for label in rows[0]["timings"] if label != rows[0]["baseline"]]
    fig = Figure(figsize=(max(6, 1.6 * len(rows)), 4))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    width = 0.8 / len(labels)
    for i, label in enumerate(labels):
        ratios = [row["timings"].get(label, {}).get("ratio_vs_baseline", 0) for row in rows]
        ax.bar([j + i * width for j in range(len(rows))], ratios, width, label=label)
    ax.axhline(1.0, color="black", linewidth=0.8)
    ax.set_xticks([j + width * (len(labels) - 1) / 2 for j in range(len(rows))])
    ax.set_xticklabels([row["case"] for row in rows], rotation=20, ha="right", fontsize=8)
    ax.set_ylabel("speed-up over eager (x)")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)


def run(model_names=None, quick=False, data_root=None, out=RESULTS_DIR, with_compile=None, rounds=None,
        log=print):
    """Runs the epoch benchmark; returns the JSON path. Writes <name>.json, <name>.md and <name>.png to out."""
    splits = data.load_dataset("mnist", data_root, log=log)
    x, y = splits.train.tensors(flatten=False)
    if quick:
        x, y = x[:1000], y[:1000]
    with_compile = (not quick) if with_compile is None else with_compile
    configs = [c for c in CONFIGS if model_names is None or c[0] in model_names]
    cases = [make_case(name, batch, options, x[:images], y[:images], with_compile)
             for name, batch, options, images in configs]
    rows = run_cases(cases, rounds=rounds or 5, min_run_time=0.0)
    name = "epochs_quick" if quick else "epochs"
    source = "bundled sample" if data_root is None else str(data_root)
    path = write_results(name, rows, out, extra={"data": f"{source}, up to {x.shape[0]} training images per epoch "
                                                         "(column `images`)"})
    stamp = json.loads(path.read_text())["stamp"]
    plot(rows, Path(out) / f"{name}.png",
         f"one epoch ({x.shape[0]} images), {stamp['machine']}, torch {stamp['torch']}, {stamp['commit']}")
    log(markdown_table(rows))
    return path


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="1000 images, no torch.compile")
    parser.add_argument("--models", nargs="+", choices=models.MODELS, help="models to run (default: all)")
    parser.add_argument("--data", help="MNIST folder (default: the bundled sample)")
    parser.add_argument("--out", default=str(RESULTS_DIR))
    args = parser.parse_args(argv)
    path = run(args.models, args.quick, args.data, args.out)
    print(f"results written to {path}, {path.with_suffix('.md')} and {path.with_suffix('.png')}")


if __name__ == "__main__":
    main()
