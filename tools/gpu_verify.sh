#!/usr/bin/env bash
# Verification of the CUDA kernels on a machine with a GPU, a CUDA build of torch and the CUDA toolkit:
#   1. build the extension in place with the CUDA kernels (pip install --no-build-isolation -e .),
#   2. run the test suite (tests/test_cuda.py first, then everything),
#   3. run the CUDA op tests under compute-sanitizer memcheck and racecheck, with PyTorch's caching allocator off
#      (PYTORCH_NO_CUDA_MEMORY_CACHING=1) so that out-of-bounds accesses hit unallocated memory.
# Logs go to $OUT (if set) or ./gpu_verify_logs. Exits non-zero if any step fails; prints a summary.
# Environment: PYTHON (default python), SANITIZER (default compute-sanitizer on PATH or in $CUDA_HOME/bin),
# TORCH_CUDA_ARCH_LIST (default: the visible GPU's).
set -uo pipefail

cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python}
LOGS=${OUT:-$PWD/gpu_verify_logs}
mkdir -p "$LOGS"
declare -A RESULT=()
FAILED=0

step() {  # name, command...: runs it with its output in $LOGS/<name>.log
  local name=$1; shift
  local start=$(date +%s)
  echo "== $name: $*"
  if "$@" >"$LOGS/$name.log" 2>&1; then RESULT[$name]="ok"; else RESULT[$name]="FAILED (rc $?)"; FAILED=1; fi
  RESULT[$name]+=" in $(( $(date +%s) - start )) s"
  echo "   ${RESULT[$name]}; tail of $LOGS/$name.log:"
  tail -n 5 "$LOGS/$name.log" | sed 's/^/   | /'
}

{
  nvidia-smi || true
  "$PYTHON" -c 'import torch; print(torch.__version__, torch.version.cuda, torch.cuda.is_available(), torch.cuda.device_count())'
  nvcc --version || true
} >"$LOGS/environment.log" 2>&1
cat "$LOGS/environment.log"

step build env FASTMNIST_FORCE_CUDA=1 "$PYTHON" -m pip install --no-build-isolation -v -e .
step import "$PYTHON" -c 'import torch, fastmnist
from fastmnist import _lib
assert _lib.WITH_CUDA, "built without the CUDA kernels"
x = torch.randn(4, 3, device="cuda")
print(fastmnist.linear_act(x, torch.randn(2, 3, device="cuda"), None, "relu"))'
step pytest_cuda "$PYTHON" -m pytest tests/test_cuda.py -q -rs
step pytest_all "$PYTHON" -m pytest tests -q -rs -x

SANITIZER=${SANITIZER:-$(command -v compute-sanitizer || echo "${CUDA_HOME:-/usr/local/cuda}/bin/compute-sanitizer")}
# The sanitizers slow kernels ~10-100x: the float32/float64 comparisons and the low-precision cases, not the
# subprocess test (a deliberate device-side assert) nor the second GPU.
SELECT=(tests/test_cuda.py -q -x -k "cuda:0 and not asserts_on_device and not compile")
for tool in memcheck racecheck; do
  extra=()
  [[ $tool == memcheck ]] && extra=(--leak-check no --check-device-heap yes)
  step "sanitizer_$tool" env PYTORCH_NO_CUDA_MEMORY_CACHING=1 \
    "$SANITIZER" --tool "$tool" "${extra[@]}" --error-exitcode 99 --print-limit 50 \
    "$PYTHON" -m pytest "${SELECT[@]}"
done

echo
echo "gpu_verify summary (logs in $LOGS):"
for name in build import pytest_cuda pytest_all sanitizer_memcheck sanitizer_racecheck; do
  printf '  %-20s %s\n' "$name" "${RESULT[$name]:-not run}"
done | tee "$LOGS/summary.txt"
exit $FAILED
