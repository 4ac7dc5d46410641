"""The build and import guards: an extension built against another torch is refused with rebuild advice, and
setup.py refuses a build setting it does not know."""

import importlib
import os
import subprocess
import sys
from pathlib import Path

import pytest

import fastmnist
from fastmnist import _build_info, _lib


def test_import_refuses_an_extension_built_for_another_torch(monkeypatch):
    monkeypatch.setattr(_build_info, "TORCH_VERSION", "1.0.0+other")
    try:
        with pytest.raises(ImportError, match=r"built against torch 1\.0\.0\+other but torch .* is running; "
                                              r"rebuild it with: pip install --no-build-isolation -e \."):
            importlib.reload(_lib)
    finally:
        monkeypatch.undo()
        importlib.reload(_lib)
    assert _lib.LOADED and fastmnist._lib is _lib


def test_build_refuses_an_unknown_cpu_optimization_level(tmp_path):
    """FASTMNIST_CPU_OPT takes 0-3; anything else stops setup.py before it compiles, saying what it takes."""
    root = Path(fastmnist.__file__).resolve().parents[1]
    env = dict(os.environ, FASTMNIST_CPU_OPT="fast", FASTMNIST_FORCE_CUDA="0")
    proc = subprocess.run([sys.executable, str(root / "setup.py"), "build_ext", "--build-temp", str(tmp_path)],
                          cwd=root, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    assert "FASTMNIST_CPU_OPT must be 0, 1, 2 or 3, got 'fast'" in proc.stderr
