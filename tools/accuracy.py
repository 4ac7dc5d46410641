"""Train every tutorial model on a full dataset with both backends and tabulate issue 5's accuracy goals.

    python tools/accuracy.py --data ../shared/data/mnist [--models mlp lenet] [--out runs/accuracy]

Each run is the CLI's own `fastmnist train --model M --backend B --dataset mnist --data DIR --seed 0` (the
model's recipe otherwise), so the table can be reproduced one command at a time. Writes
benchmarks/results/accuracy.{md,json}: final test accuracy per backend, their difference, and the
relative difference of the first-epoch training losses.
"""
import argparse
import json
import os
import platform
import subprocess
import sys

# Issue 5's goals: test accuracy of the fused backend on the full MNIST.
GOALS = {"mlp": 0.980, "lenet": 0.980, "twolayer": 0.950, "softmax": 0.920, "classifier": 0.970}
# Epochs where the tutorial's recipe stops short of the goal on MNIST (softmax's recipe is for Fashion-MNIST:
# 0.911 after its 5 epochs; twolayer: 0.946 after its 16; lenet: 0.970 after its 10 and 0.979 after 20, the
# sigmoid net sits at chance for its first three); every other setting is the recipe's.
EPOCHS = {"softmax": 30, "twolayer": 40, "lenet": 30}
MAX_BACKEND_GAP = 0.003          # fused and eager end within 0.3 points
MAX_FIRST_LOSS_REL_DIFF = 1e-3   # and agree on the first epoch's loss
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def train_command(model, backend, data, out):
    return [sys.executable, "-m", "fastmnist", "train", "--model", model, "--backend", backend,
            "--dataset", "mnist", "--data", data, "--seed", "0", "--no-progress", "--no-plots", "--out", out] + (
               ["--epochs", str(EPOCHS[model])] if model in EPOCHS else [])


def run(model, backend, data, out_root, reuse):
    out = os.path.join(out_root, f"{model}-{backend}")
    command = train_command(model, backend, data, out)
    if not (reuse and os.path.exists(os.path.join(out, "metrics.json"))):
        print("$", " ".join(command), flush=True)
        # one thread: on a shared machine, two-thread parallel regions stall whenever another process holds a core
        subprocess.run(command, check=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    with open(os.path.join(out, "metrics.json")) as f:
        metrics = json.load(f)
    return {"command": " ".join(["fastmnist"] + command[3:]), "test_acc": metrics["final"]["test_acc"],
            "first_epoch_loss": metrics["epochs"][0]["loss"],
            "recipe": metrics["recipe"], "options": metrics["options"], "step": metrics["step"]}


def summarise(model, fused, eager):
    gap = fused["test_acc"] - eager["test_acc"]
    loss_diff = abs(fused["first_epoch_loss"] - eager["first_epoch_loss"]) / abs(eager["first_epoch_loss"])
    return {"model": model, "goal": GOALS[model], "fused": fused, "eager": eager, "gap": gap,
            "first_loss_rel_diff": loss_diff,
            "met": fused["test_acc"] >= GOALS[model] and abs(gap) <= MAX_BACKEND_GAP
            and loss_diff <= MAX_FIRST_LOSS_REL_DIFF}


def markdown(rows, data):
    lines = [
        "# Accuracy on the full MNIST (issue 5)", "",
        f"Data: `{data}` (60,000 train / 10,000 test). Made by `python tools/accuracy.py --data {data}` on "
        f"{platform.node()} ({platform.processor() or platform.machine()}), torch {torch_version()}; "
        "each row's runs are the commands below. Goal met: fused >= goal, |fused - eager| <= 0.3 points, "
        "first-epoch losses within 1e-3 relative.", "",
        "| model | recipe | goal | fused | eager | fused - eager | first-epoch loss rel. diff | met |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        recipe = r["fused"]["recipe"]
        what = (f"{recipe['epochs']} ep, batch {recipe['batch_size']}, {recipe['optimizer']} lr {recipe['lr']:g}"
                + (f", {r['fused']['options']}" if r["fused"]["options"] else ""))
        lines.append(
            f"| {r['model']} | {what} | {r['goal']:.3f} | {r['fused']['test_acc']:.4f} | {r['eager']['test_acc']:.4f} "
            f"| {100 * r['gap']:+.2f} pt | {r['first_loss_rel_diff']:.1e} | {'yes' if r['met'] else 'NO'} |")
    lines += ["", "Commands:", ""] + [f"    {r[b]['command']}" for r in rows for b in ("fused", "eager")]
    return "\n".join(lines) + "\n"


def torch_version():
    import torch

    return torch.__version__


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True, help="folder with the full MNIST IDX files")
    parser.add_argument("--models", nargs="+", choices=list(GOALS), default=list(GOALS))
    parser.add_argument("--out", default=os.path.join("runs", "accuracy"), help="training runs' folder")
    parser.add_argument("--results", default=os.path.join(REPO, "benchmarks", "results"))
    parser.add_argument("--reuse", action="store_true", help="reuse runs already finished in --out")
    args = parser.parse_args()
    rows = [summarise(m, *(run(m, backend, args.data, args.out, args.reuse) for backend in ("fused", "eager")))
            for m in args.models]
    os.makedirs(args.results, exist_ok=True)
    with open(os.path.join(args.results, "accuracy.json"), "w") as f:
        json.dump({"data": args.data, "torch": torch_version(), "rows": rows}, f, indent=2)
        f.write("\n")
    text = markdown(rows, args.data)
    with open(os.path.join(args.results, "accuracy.md"), "w") as f:
        f.write(text)
    print(text)
    return 0 if all(r["met"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
