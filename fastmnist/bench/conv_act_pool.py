"""The fused LeNet block (conv 5x5 -> sigmoid -> 2x2 average pool) against eager PyTorch (conv2d + sigmoid +
avg_pool2d) and torch.compile of it, for both LeNet blocks, forward and forward+backward.

    python -m fastmnist.bench.conv_act_pool [--quick] [--no-compile] [--out DIR]
"""

import torch

import fastmnist
from fastmnist.reference import conv_act_pool_reference

from .harness import Case, op_benchmark_main, time_compile

# (name, in channels, out channels, input size, padding) of LeNet-5's two blocks, 5x5 kernels
BLOCKS = [("conv1 1->6 28x28", 1, 6, 28, 2), ("conv2 6->16 14x14", 6, 16, 14, 0)]


def make_case(batch, name, c_in, c_out, size, padding, backward, with_compile):
    gen = torch.Generator().manual_seed(batch * 100 + c_out)
    # in training the first block's input needs no gradient, the second block's does
    x = torch.randn(batch, c_in, size, size, generator=gen).requires_grad_(backward and c_in > 1)
    w = (torch.randn(c_out, c_in, 5, 5, generator=gen) / (c_in * 25) ** 0.5).requires_grad_(backward)
    b = torch.randn(c_out, generator=gen).requires_grad_(backward)
    out_size = (size + 2 * padding - 4) // 2
    grad = torch.randn(batch, c_out, out_size, out_size, generator=gen)

    def step(f):
        if not backward:
            return lambda: f(x, w, b, padding, "sigmoid")

        def run():
            x.grad = w.grad = b.grad = None
            f(x, w, b, padding, "sigmoid").backward(grad)

        return run

    candidates = [("fused", step(fastmnist.conv_act_pool))]
    info = {"batch": batch, "block": name, "pass": "fwd+bwd" if backward else "fwd"}
    if with_compile:
        torch._dynamo.reset()
        compiled = step(torch.compile(conv_act_pool_reference, dynamic=False))
        info["compile_s"] = time_compile(compiled)
        candidates.append(("torch.compile", compiled))
    return Case(f"{name} b={batch} {info['pass']}", ("eager", step(conv_act_pool_reference)), candidates, info)


def main(argv=None):
    op_benchmark_main(argv, "conv_act_pool", __doc__, BLOCKS, make_case, rounds=5)


if __name__ == "__main__":
    main()
