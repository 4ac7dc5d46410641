# The two commands of the README. Each does the whole set-up first (tools/setup.sh), so either works on a
# fresh machine.
PYTHON ?= python3
export PYTHON

.PHONY: setup demo test

setup:
	./tools/setup.sh

# The main job: train the MLP with the fused backend on the bundled MNIST sample (checkpoint, metrics and plots
# in runs/demo), then time one epoch of it against the eager backend (and the other fused variants).
demo: setup
	$(PYTHON) -m fastmnist train --model mlp --epochs 5 --out runs/demo
	$(PYTHON) -m fastmnist bench --quick --models mlp --no-ops --out runs/demo/bench

test: setup
	$(PYTHON) -m pytest -q
