"""Loads fastmnist's compiled library, which registers the torch.ops.fastmnist ops.

The library is linked against the torch it was compiled with; a different torch at run time can crash or
misbehave, so a mismatch is an ImportError that says how to rebuild. A missing library (a source tree that was
never built) is not an error here: the pure-Python parts stay usable, `LOADED` is False, and calling an op
raises with build instructions.
"""

import importlib
import torch

REBUILD_HINT = "rebuild it with: pip install --no-build-isolation -e .  (from the fastmnist source folder)"

try:
    from . import _build_info
except ImportError:  # never built in this tree
    _build_info = None

LOADED = False
WITH_CUDA = False
LOAD_ERROR = "fastmnist's compiled extension (fastmnist._C) is not built; " + REBUILD_HINT

if _build_info is not None:
    if _build_info.TORCH_VERSION != torch.__version__:
        raise ImportError(
            f"fastmnist was built against torch {_build_info.TORCH_VERSION} but torch {torch.__version__} is "
            f"running; {REBUILD_HINT}"
        )
    try:
        importlib.import_module("fastmnist._C")
    except ImportError as error:
        LOAD_ERROR = f"fastmnist's compiled extension failed to load ({error}); {REBUILD_HINT}"
    else:
        LOADED = True
        WITH_CUDA = _build_info.WITH_CUDA


def require_library():
    if not LOADED:
        raise RuntimeError(LOAD_ERROR)
