"""Fused linear + activation against eager PyTorch (F.linear + activation) and torch.compile of it, at the
tutorial models' layer shapes, forward and forward+backward.

    python -m fastmnist.bench.linear_act [--quick] [--no-compile] [--out DIR]
"""

import argparse

import torch

import fastmnist
from fastmnist.reference import linear_act_reference

from .harness import RESULTS_DIR, Case, run_cases, time_compile, write_results

# (in, out, activation) of the tutorial models' layers
SHAPES = [
    (784, 400, "relu"), (400, 200, "relu"), (200, 100, "relu"), (100, 10, "identity"),  # mlp
    (784, 200, "sigmoid"),  # classifier hidden layer
    (784, 50, "sigmoid"),  # twolayer hidden layer
    (784, 10, "identity"),  # softmax regression
]
BATCHES = [1, 64, 256]


def make_case(batch, n_in, n_out, activation, backward, with_compile):
    gen = torch.Generator().manual_seed(batch * 1000 + n_out)
    x = torch.randn(batch, n_in, generator=gen)
    w = (torch.randn(n_out, n_in, generator=gen) / n_in**0.5).requires_grad_(backward)
    b = torch.randn(n_out, generator=gen).requires_grad_(backward)
    grad = torch.randn(batch, n_out, generator=gen)

    def step(f):
        if not backward:
            return lambda: f(x, w, b, activation)

        def run():
            w.grad = b.grad = None
            f(x, w, b, activation).backward(grad)

        return run

    candidates = [("fused", step(fastmnist.linear_act))]
    info = {"batch": batch, "in": n_in, "out": n_out, "activation": activation,
            "pass": "fwd+bwd" if backward else "fwd"}
    if with_compile:
        torch._dynamo.reset()
        compiled = step(torch.compile(linear_act_reference, dynamic=False))
        info["compile_s"] = time_compile(compiled)
        candidates.append(("torch.compile", compiled))
    name = f"{n_in}->{n_out} {activation} b={batch} {info['pass']}"
    return Case(name, ("eager", step(linear_act_reference)), candidates, info)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="batch 64 only, fewer rounds, no torch.compile")
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile candidate")
    parser.add_argument("--out", default=str(RESULTS_DIR), help="folder for the JSON and Markdown results")
    args = parser.parse_args(argv)
    batches = [64] if args.quick else BATCHES
    with_compile = not (args.quick or args.no_compile)
    rows = []
    for batch in batches:
        for n_in, n_out, activation in SHAPES:
            for backward in (False, True):
                case = make_case(batch, n_in, n_out, activation, backward, with_compile)
                rows += run_cases([case], rounds=3 if args.quick else 7, min_run_time=0.05 if args.quick else 0.2)
    name = "linear_act_quick" if args.quick else "linear_act"
    path = write_results(name, rows, args.out)
    print(f"results written to {path} and {path.with_suffix('.md')}")


if __name__ == "__main__":
    main()
