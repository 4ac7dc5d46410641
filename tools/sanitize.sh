#!/usr/bin/env bash
# Builds the C++ kernels once with AddressSanitizer and UndefinedBehaviorSanitizer (FASTMNIST_SANITIZE=1) in a
# scratch copy of the tree, and runs the kernels' tests under them: any out-of-bounds access or undefined
# behaviour fails the run. The normal build in this tree is left alone.
# Usage: tools/sanitize.sh [pytest args]   (default: the tests of every op's CPU kernels, and the fused step's
# indexed-batch tests)
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
scratch=$(mktemp -d)
trap 'rm -rf "$scratch"' EXIT
git ls-files -z | xargs -0 cp --parents -t "$scratch"
cd "$scratch"
echo "sanitize: building with ASan + UBSan in $scratch"
FASTMNIST_SANITIZE=1 FASTMNIST_FORCE_CUDA=0 "$PYTHON" setup.py -q build_ext --inplace > build.log 2>&1 \
  || { tail -40 build.log >&2; echo "sanitize: the build failed" >&2; exit 1; }
grep "fastmnist build" build.log
tests=("$@")
if [ ${#tests[@]} -eq 0 ]; then
  # and the fused step's indexed batches, which the linear kernels read in place from the whole data set, its
  # cross-entropy head's row chunks, and its direct entry point in fastmnist._C
  tests=(tests/test_conv_act_pool.py tests/test_linear_act.py tests/test_cross_entropy.py tests/test_sigmoid_bce.py
         tests/test_linear_cross_entropy.py tests/test_fused_step.py::test_indexed_step_equals_the_gathered_batch
         tests/test_fused_step.py::test_rejects_bad_indices tests/test_fused_step.py::test_parity_head_in_row_chunks
         tests/test_fused_step.py::test_ignored_targets_match_eager
         tests/test_fused_step.py::test_direct_call_and_method_call_agree)
fi
# Python itself is not instrumented: preload the runtimes; leaks of the interpreter are not ours to report.
LD_PRELOAD="$(gcc -print-file-name=libasan.so) $(gcc -print-file-name=libubsan.so)" \
ASAN_OPTIONS=detect_leaks=0:abort_on_error=1 UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1 \
  "$PYTHON" -m pytest -q -p no:cacheprovider "${tests[@]}"
