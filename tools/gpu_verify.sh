#!/usr/bin/env bash
# Verification of the CUDA kernels on a machine with a GPU, a CUDA build of torch and the CUDA toolkit, sized to
# fit one short lease of such a machine (every step has a time limit):
#   1. build the extension in place with the CUDA kernels (setup.py build_ext --inplace, objects in build/gpu,
#      so that a second run on the same machine only recompiles what changed). The C++ kernels, only the CUDA
#      tests' reference here, are built at -O0 (FASTMNIST_CPU_OPT=0): at -O3 the LeNet block's file alone took
#      over 6 minutes on the H200 machine's CPU (2026-12-04), the CUDA files under 6 minutes all together;
#   2. run tests/test_cuda.py,
#   3. run the CUDA op tests under compute-sanitizer memcheck and racecheck, with PyTorch's caching allocator off
#      (PYTORCH_NO_CUDA_MEMORY_CACHING=1) so that out-of-bounds accesses hit unallocated memory,
#   4. time the ops against eager on the GPU (tools/gpu_bench.py),
#   5. (only when STEPS names it) the rest of the test suite, slow with -O0 kernels: FASTMNIST_CPU_OPT=3 for it.
# Logs go to $OUT (if set) or ./gpu_verify_logs. Exits non-zero if any step fails; prints a summary.
# Environment: PYTHON (default python3), SANITIZER (default compute-sanitizer on PATH or in $CUDA_HOME/bin),
# TORCH_CUDA_ARCH_LIST (default: the visible GPU's), FASTMNIST_CPU_OPT (default 0), STEPS (default: build import
# pytest_cuda sanitizer_memcheck sanitizer_racecheck gpu_bench; pytest_rest may be added).
set -uo pipefail

cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
LOGS=${OUT:-$PWD/gpu_verify_logs}
STEPS=${STEPS:-build import pytest_cuda sanitizer_memcheck sanitizer_racecheck gpu_bench}
mkdir -p "$LOGS"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
declare -A RESULT=()
FAILED=0

step() {  # name, time limit in seconds, command...: runs it with its output in $LOGS/<name>.log
  local name=$1 limit=$2; shift 2
  [[ " $STEPS " == *" $name "* ]] || return 0
  local start=$(date +%s)
  echo "== $name (limit ${limit} s): $*"
  if timeout "$limit" "$@" >"$LOGS/$name.log" 2>&1; then
    RESULT[$name]="ok"
  else
    RESULT[$name]="FAILED (rc $?)"
    FAILED=1
  fi
  RESULT[$name]+=" in $(( $(date +%s) - start )) s"
  echo "   ${RESULT[$name]}; tail of $LOGS/$name.log:"
  tail -n 8 "$LOGS/$name.log" | sed 's/^/   | /'
}

{
  nvidia-smi || true
  "$PYTHON" -c 'import torch; print(torch.__version__, torch.version.cuda, torch.cuda.is_available(), torch.cuda.device_count())'
  nvcc --version || true
  lscpu | grep -E "Model name|^CPU\(s\)|Flags" | cut -c1-200
} >"$LOGS/environment.log" 2>&1
head -n 30 "$LOGS/environment.log"

step build 360 env FASTMNIST_FORCE_CUDA=1 FASTMNIST_CPU_OPT="${FASTMNIST_CPU_OPT:-0}" MAX_JOBS="${MAX_JOBS:-$(nproc)}" \
  "$PYTHON" setup.py build_ext --inplace --build-temp build/gpu
step import 60 "$PYTHON" -c 'import torch, fastmnist
from fastmnist import _lib
assert _lib.WITH_CUDA, "built without the CUDA kernels"
x = torch.randn(4, 3, device="cuda")
print(fastmnist.linear_act(x, torch.randn(2, 3, device="cuda"), None, "relu"))'
step pytest_cuda 150 "$PYTHON" -m pytest tests/test_cuda.py -q -rs

SANITIZER=${SANITIZER:-$(command -v compute-sanitizer || echo "${CUDA_HOME:-/usr/local/cuda}/bin/compute-sanitizer")}
# The sanitizers slow kernels ~10-100x: float32 cases of the comparisons and the low-precision ones, not the
# subprocess test (a deliberate device-side assert), torch.compile, opcheck, nor the second GPU.
SELECT=(tests/test_cuda.py -q -k "cuda:0 and not float64 and not asserts_on_device and not compile and not opcheck")
for tool in memcheck racecheck; do
  extra=() limit=120
  [[ $tool == memcheck ]] && extra=(--leak-check no) limit=150
  step "sanitizer_$tool" "$limit" env PYTORCH_NO_CUDA_MEMORY_CACHING=1 \
    "$SANITIZER" --tool "$tool" "${extra[@]}" --error-exitcode 99 --print-limit 50 \
    "$PYTHON" -m pytest "${SELECT[@]}"
done
step gpu_bench 100 "$PYTHON" tools/gpu_bench.py --out "$LOGS"
step pytest_rest 300 "$PYTHON" -m pytest tests -q -rs -x --ignore tests/test_cuda.py

echo
echo "gpu_verify summary (logs in $LOGS):"
for name in $STEPS; do
  printf '  %-20s %s\n' "$name" "${RESULT[$name]:-not run}"
done | tee "$LOGS/summary.txt"
exit $FAILED
