#!/usr/bin/env bash
# Sets up a fresh machine for fastmnist: torch (reused when installed; otherwise torch==2.13.0, which this
# project's machines hold as a local CPU wheel), the build and test tools, then an editable build of the
# extension against that torch. Idempotent, and the build is skipped when this tree's editable install is in
# place, loads, and its library is newer than every source it is built from (pip's editable build starts from an
# empty build folder, so a rebuild compiles everything again: ~15 min at -O3 on a 2-core Zen 3).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}

if "$PYTHON" -c "import torch" 2>/dev/null; then
  echo "setup: reusing the installed torch $("$PYTHON" -c 'import torch; print(torch.__version__)')"
else
  echo "setup: no torch installed; installing torch==2.13.0"
  "$PYTHON" -m pip install --quiet "torch==2.13.0"
fi
"$PYTHON" -m pip install --quiet "setuptools>=77" wheel ninja numpy tqdm matplotlib pillow pytest hypothesis expecttest
# The built library is current when pip's editable install of fastmnist is this folder, the library loads (same
# torch as at build time: fastmnist/_lib.py checks), and no source it is built from changed since.
built_here_and_current() {
  local library location
  library=$(ls fastmnist/_C.*.so 2>/dev/null | head -n 1) || return 1
  [ -n "$library" ] || return 1
  location=$("$PYTHON" -m pip show fastmnist 2>/dev/null | sed -n 's/^Editable project location: //p')
  [ "$location" = "$PWD" ] || return 1
  "$PYTHON" -c "import fastmnist; fastmnist._lib.require_library()" 2>/dev/null || return 1
  [ -z "$(find csrc setup.py pyproject.toml -newer "$library" -print -quit)" ]
}
if built_here_and_current; then
  echo "setup: the extension is built from the current sources; not rebuilding (delete fastmnist/_C.*.so to force)"
else
  # --no-build-isolation: compile against the torch installed above, not one pip would fetch for the build.
  "$PYTHON" -m pip install --quiet --no-build-isolation -e .
fi
"$PYTHON" -c "import fastmnist, torch; fastmnist._lib.require_library(); print('setup: fastmnist', fastmnist.__version__, 'built against torch', torch.__version__)"
