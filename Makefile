# The two commands of the README. Each does the whole set-up first (tools/setup.sh), so either works on a
# fresh machine.
PYTHON ?= python3
export PYTHON

.PHONY: setup demo test

setup:
	./tools/setup.sh

# The main job: benchmark the fused linear layers against eager PyTorch.
demo: setup
	$(PYTHON) -m fastmnist.bench.linear_act --quick --out runs/bench

test: setup
	$(PYTHON) -m pytest -q
