"""Benchmarks: one harness (harness.py, on torch.utils.benchmark) and one module per op plus the end-to-end
training epochs; each module runs as `python -m fastmnist.bench.<name>`, and `fastmnist bench` runs them.
Results are committed under benchmarks/results/ in the source tree."""

# the per-op benchmark modules that `fastmnist bench` runs after the epochs (imported there, not here, so that
# `python -m fastmnist.bench.<name>` runs cleanly); each has main(argv) with --quick and --out
OP_BENCHMARKS = ("linear_act", "losses", "conv_act_pool")
