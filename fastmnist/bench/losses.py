"""The fused losses against eager PyTorch and torch.compile of it, forward and forward+backward:
softmax cross-entropy (F.cross_entropy), sigmoid BCE (F.binary_cross_entropy_with_logits) and the classifier
head (F.linear_cross_entropy, or its composition on torch without it), at the tutorial shapes (N = 64, 256,
1024 with C = 10) and at large shapes (4096 x 1000, 8192 x 32000). For the classifier head it also measures
the peak memory (resident set growth of a fresh process) of one forward+backward.

    python -m fastmnist.bench.losses [--quick] [--no-compile] [--no-huge] [--out DIR]
"""

import argparse
import multiprocessing

import torch

import fastmnist
from fastmnist.reference import (linear_cross_entropy_reference, sigmoid_bce_reference,
                                 softmax_cross_entropy_reference)

from .harness import RESULTS_DIR, Case, run_cases, time_compile, write_results

TUTORIAL = [(64, 10), (256, 10), (1024, 10)]
LARGE = [(4096, 1000), (8192, 32000)]
HEAD_IN = {10: 100, 1000: 256, 32000: 256}  # in_features of the classifier head per class count


def _inputs(kind, n, c, gen):
    if kind == "ce":
        return (torch.randn(n, c, generator=gen), torch.randint(0, c, (n,), generator=gen))
    if kind == "bce":
        x = torch.randn(n, c, generator=gen)
        return (x, torch.nn.functional.one_hot(torch.randint(0, c, (n,), generator=gen), c).float())
    k = HEAD_IN[c]
    return (torch.randn(n, k, generator=gen), torch.randn(c, k, generator=gen) / k**0.5,
            torch.randint(0, c, (n,), generator=gen))


FUSED = {"ce": fastmnist.softmax_cross_entropy, "bce": fastmnist.sigmoid_bce, "head": fastmnist.linear_cross_entropy}
EAGER = {"ce": softmax_cross_entropy_reference, "bce": sigmoid_bce_reference, "head": linear_cross_entropy_reference}
# inputs that get gradients
DIFF = {"ce": (0,), "bce": (0,), "head": (0, 1)}


def make_case(kind, n, c, backward, with_compile):
    gen = torch.Generator().manual_seed(n + c)
    args = list(_inputs(kind, n, c, gen))
    for i in DIFF[kind]:
        args[i].requires_grad_(backward)

    def step(f):
        if not backward:
            return lambda: f(*args)

        def run():
            for i in DIFF[kind]:
                args[i].grad = None
            f(*args).backward()

        return run

    info = {"loss": kind, "N": n, "C": c, "pass": "fwd+bwd" if backward else "fwd"}
    if kind == "head":
        info["in_features"] = HEAD_IN[c]
    candidates = [("fused", step(FUSED[kind]))]
    if with_compile:
        torch._dynamo.reset()
        compiled = step(torch.compile(EAGER[kind], dynamic=False))
        info["compile_s"] = time_compile(compiled)
        candidates.append(("torch.compile", compiled))
    return Case(f"{kind} {n}x{c} {info['pass']}", ("eager", step(EAGER[kind])), candidates, info)


def _peak_probe(which, n, c, queue):
    """In a fresh process: resident-set growth during one forward+backward of the classifier head."""
    gen = torch.Generator().manual_seed(0)
    x, w, t = _inputs("head", n, c, gen)
    x.requires_grad_()
    w.requires_grad_()
    f = FUSED["head"] if which == "fused" else EAGER["head"]
    f(x[:2], w, t[:2]).backward()  # first-call allocations, lazy initialisation
    x.grad = w.grad = None

    def rss(field):
        for line in open("/proc/self/status"):
            if line.startswith(field):
                return int(line.split()[1]) * 1024
        return 0

    with open("/proc/self/clear_refs", "w") as fh:  # resets the high-water mark VmHWM
        fh.write("5")
    base = rss("VmRSS:")
    f(x, w, t).backward()
    queue.put(rss("VmHWM:") - base)


def peak_memory(n, c):
    ctx = multiprocessing.get_context("spawn")
    out = {}
    for which in ("eager", "fused"):
        queue = ctx.Queue()
        proc = ctx.Process(target=_peak_probe, args=(which, n, c, queue))
        proc.start()
        out[which] = queue.get()
        proc.join()
    return out


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tutorial shapes only, fewer rounds, no compile")
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile candidate")
    parser.add_argument("--no-huge", action="store_true", help="skip 8192 x 32000")
    parser.add_argument("--out", default=str(RESULTS_DIR), help="folder for the JSON and Markdown results")
    args = parser.parse_args(argv)
    with_compile = not (args.quick or args.no_compile)
    shapes = TUTORIAL if args.quick else TUTORIAL + [s for s in LARGE if not (args.no_huge and s[1] == 32000)]
    rows = []
    for kind in ("ce", "bce", "head"):
        for n, c in shapes:
            huge = c == 32000
            if huge and kind == "bce":
                continue  # 3 GB per (N, C) tensor: the 4096 x 1000 case measures the same passes
            for backward in (False, True):
                case = make_case(kind, n, c, backward, with_compile and not huge)
                rounds, min_time = (3, 0.05) if args.quick else ((3, 0.0) if huge else (5, 0.2))
                rows += run_cases([case], rounds=rounds, min_run_time=min_time)
    memory = {}
    if not args.quick:
        for n, c in [(4096, 1000)] + ([] if args.no_huge else [(8192, 32000)]):
            memory[f"head {n}x{c} fwd+bwd"] = peak_memory(n, c)
            print(f"peak memory, head {n}x{c}: {memory[f'head {n}x{c} fwd+bwd']}", flush=True)
    name = "losses_quick" if args.quick else "losses"
    path = write_results(name, rows, args.out, extra={"peak_memory_bytes": memory})
    if memory:
        with open(path.with_suffix(".md"), "a") as fh:
            fh.write("\nPeak memory of one classifier-head forward+backward (resident-set growth, MiB):\n\n")
            fh.write("| case | eager | fused |\n|---|---|---|\n")
            for case, m in memory.items():
                fh.write(f"| {case} | {m['eager'] / 2**20:.0f} | {m['fused'] / 2**20:.0f} |\n")
    print(f"results written to {path} and {path.with_suffix('.md')}")


if __name__ == "__main__":
    main()
