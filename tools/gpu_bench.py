"""The fused ops on a CUDA GPU against eager PyTorch, forward and forward+backward, through the benchmark harness
(torch.utils.benchmark, a device synchronisation after every call, interleaved rounds, medians): both LeNet
blocks, linear + relu at the mlp's first layer, and softmax cross-entropy at the tutorial and the large shapes.
For cross-entropy at 8192 x 32000 it also prints the floor the issue names: the time to read the logits once and
write their gradient once at the bandwidth of a device-to-device copy measured in the same process.

    python tools/gpu_bench.py [--out DIR]          # writes gpu_ops.json / gpu_ops.md
"""

import argparse
import sys

import torch

import fastmnist
from fastmnist.bench.harness import RESULTS_DIR, Case, run_cases, write_results
from fastmnist.reference import conv_act_pool_reference, linear_act_reference, softmax_cross_entropy_reference


def grad_step(f, args, diff):
    def run():
        for i in diff:
            args[i].grad = None
        f(*args).sum().backward()

    return run


def case(name, fused, eager, args, diff, backward):
    if backward:
        for i in diff:
            args[i].requires_grad_()
        return Case(f"{name} fwd+bwd", ("eager", grad_step(eager, args, diff)),
                    [("fused", grad_step(fused, args, diff))])
    return Case(f"{name} fwd", ("eager", lambda: eager(*args)), [("fused", lambda: fused(*args))])


def cases(device):
    out = []
    for backward in (False, True):
        for batch in (64, 256):
            for label, c_in, c_out, size, pad in (("conv1 1->6 28x28", 1, 6, 28, 2),
                                                  ("conv2 6->16 14x14", 6, 16, 14, 0)):
                x = torch.randn(batch, c_in, size, size, device=device)
                w = torch.randn(c_out, c_in, 5, 5, device=device) / (c_in * 25) ** 0.5
                b = torch.randn(c_out, device=device)
                diff = (0, 1, 2) if c_in > 1 else (1, 2)
                out.append(case(f"{label} b={batch}", lambda *a, p=pad: fastmnist.conv_act_pool(*a, p, "sigmoid"),
                                lambda *a, p=pad: conv_act_pool_reference(*a, p, "sigmoid"), [x, w, b], diff, backward))
        x = torch.randn(64, 784, device=device)
        w = torch.randn(400, 784, device=device) / 28
        b = torch.randn(400, device=device)
        out.append(case("linear 64x784->400 relu", lambda *a: fastmnist.linear_act(*a, "relu"),
                        lambda *a: linear_act_reference(*a, "relu"), [x, w, b], (0, 1, 2), backward))
        for n, c in ((256, 10), (8192, 32000)):
            logits = torch.randn(n, c, device=device)
            target = torch.randint(0, c, (n,), device=device)
            out.append(case(f"cross_entropy {n}x{c}", fastmnist.softmax_cross_entropy,
                            softmax_cross_entropy_reference, [logits, target], (0,), backward))
    return out


def copy_bandwidth(device):
    """Bytes read + written per second by a 2 GiB device-to-device copy (median of 20)."""
    src = torch.empty(2**29, device=device)
    dst = torch.empty_like(src)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(22):
        start.record()
        dst.copy_(src)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    times = sorted(times[2:])
    return 2 * src.numel() * 4 / times[len(times) // 2]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=str(RESULTS_DIR))
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit("gpu_bench: no CUDA device")
    device = "cuda"
    torch.manual_seed(0)
    rows = run_cases(cases(device), rounds=5, min_run_time=0.2, device=device)
    bandwidth = copy_bandwidth(device)
    floor_us = 2 * 8192 * 32000 * 4 / bandwidth * 1e6  # read the logits once, write the gradient once
    ce = next(r for r in rows if r["case"] == "cross_entropy 8192x32000 fwd+bwd")
    fused_us = ce["timings"]["fused"]["median_us"]
    note = (f"copy bandwidth {bandwidth / 1e12:.2f} TB/s; CE 8192x32000 fwd+bwd floor {floor_us:.1f} us, "
            f"fused {fused_us:.1f} us = {fused_us / floor_us:.2f}x the floor")
    print(note)
    path = write_results("gpu_ops", rows, args.out, device=device,
                         extra={"copy_bandwidth_Bps": bandwidth, "ce_floor_us": floor_us, "note": note})
    print(f"results written to {path}")


if __name__ == "__main__":
    main()
