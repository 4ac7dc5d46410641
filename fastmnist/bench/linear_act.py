"""Fused linear + activation against eager PyTorch (F.linear + activation) and torch.compile of it, at the
tutorial models' layer shapes, forward and forward+backward.

    python -m fastmnist.bench.linear_act [--quick] [--no-compile] [--out DIR]
"""

import torch

import fastmnist
from fastmnist.reference import linear_act_reference

from .harness import Case, op_benchmark_main, time_compile

# (in, out, activation) of the tutorial models' layers
SHAPES = [
    (784, 400, "relu"), (400, 200, "relu"), (200, 100, "relu"), (100, 10, "identity"),  # mlp
    (784, 200, "sigmoid"),  # classifier hidden layer
    (784, 50, "sigmoid"),  # twolayer hidden layer
    (784, 10, "identity"),  # softmax regression
]


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
    op_benchmark_main(argv, "linear_act", __doc__, SHAPES, make_case, rounds=7)


if __name__ == "__main__":
    main()
