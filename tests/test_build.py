"""The import-time guard: an extension built against another torch is refused with rebuild advice."""

import importlib

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
