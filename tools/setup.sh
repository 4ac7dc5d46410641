#!/usr/bin/env bash
# Sets up a fresh machine for fastmnist: torch (reused when installed; otherwise torch==2.13.0, which this
# project's machines hold as a local CPU wheel), the build and test tools, then an editable build of the
# extension against that torch. Idempotent, but not incremental: pip's editable build starts from an empty build
# folder, so a second run compiles the whole extension again (~15 min at -O3 on a 2-core Zen 3).
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
# --no-build-isolation: compile against the torch installed above, not one pip would fetch for the build.
"$PYTHON" -m pip install --quiet --no-build-isolation -e .
"$PYTHON" -c "import fastmnist, torch; fastmnist._lib.require_library(); print('setup: fastmnist', fastmnist.__version__, 'built against torch', torch.__version__)"
