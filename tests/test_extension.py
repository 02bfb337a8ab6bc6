"""The build: the CPU extension is in use, and the CUDA module was compiled wherever nvcc exists."""

from __future__ import annotations

import os
import shutil

import pytest

import kronlin
from kronlin import _ext


def test_cpu_extension_loaded_unless_disabled():
    info = kronlin.extension_info()
    if _ext.ext_disabled_by_env:
        assert info["disabled"]
    else:
        assert info["cpu_extension"] and not info["disabled"], _ext.cpu_import_error


@pytest.mark.skipif(shutil.which("nvcc") is None and not os.environ.get("CUDA_HOME"), reason="no CUDA compiler here")
def test_cuda_module_compiled_and_linked():
    """CMake builds kronlin._cuda whenever it finds nvcc (KRONLIN_CUDA=AUTO); importing it proves it linked."""
    if os.environ.get("KRONLIN_CUDA", "AUTO").upper() == "OFF":
        pytest.skip("built with KRONLIN_CUDA=OFF")
    assert _ext.cuda_import_error is None, f"kronlin._cuda failed to import: {_ext.cuda_import_error}"
    from kronlin import _cuda

    n = _cuda.device_count()  # the call itself proves the CUDA runtime links; 0 without a GPU
    assert isinstance(n, int) and kronlin.extension_info()["cuda_devices"] == n


def test_cuda_dispatch_absent_without_device():
    cuda = pytest.importorskip("kronlin._cuda")
    if cuda.device_count() == 0:
        assert _ext.cuda() is None  # CuPy inputs then take the reference path
