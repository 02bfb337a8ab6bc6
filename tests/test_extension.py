"""The build: the CPU extension is in use, and the CUDA module was compiled wherever nvcc exists."""

from __future__ import annotations

import os
import shutil

import numpy as np
import pytest

import kronlin
from kronlin import _ext


class _FakeCuda:
    """Just an interface (null pointer): the bindings must reject it before any CUDA call."""

    def __init__(self, shape, typestr="<f8"):
        self.__cuda_array_interface__ = {"shape": shape, "typestr": typestr, "data": (0, False), "version": 3,
                                         "strides": None}


def test_cpu_extension_loaded_unless_disabled():
    info = kronlin.extension_info()
    if _ext.ext_disabled_by_env:
        assert info["disabled"]
    else:
        assert info["cpu_extension"] and not info["disabled"], _ext.cpu_import_error


@pytest.mark.skipif(shutil.which("nvcc") is None and not os.environ.get("CUDA_HOME"), reason="no CUDA compiler here")
def test_cuda_module_compiled_and_linked():
    """CMake builds kronlin._cuda whenever it finds nvcc (KRONLIN_CUDA=AUTO); importing it proves it linked."""
    cpu = pytest.importorskip("kronlin._C")
    if str(getattr(cpu, "cuda_setting", "AUTO")).upper() == "OFF":
        pytest.skip("built with KRONLIN_CUDA=OFF")
    assert cpu.cuda_built, "nvcc is here but the build did not compile kronlin._cuda (was nvcc on PATH at build time?)"
    assert _ext.cuda_import_error is None, f"kronlin._cuda failed to import: {_ext.cuda_import_error}"
    from kronlin import _cuda

    assert isinstance(_cuda.device_count(), int)
    # the typed bindings check their operands before touching the device, so this runs without a GPU
    with pytest.raises(TypeError, match=r"Y must be a CUDA array .*got ndarray"):
        _cuda.eig_scale(np.ones((1, 2, 2)), np.ones((1, 2)), np.ones((1, 2)), 0.0, -1.0, 0)
    with pytest.raises(TypeError, match=r"K must be a CUDA array"):
        _cuda.woodbury_gram_shared(_FakeCuda((1, 2, 3)), _FakeCuda((1, 2, 3)), None, 1.0, 0)


def test_cuda_dispatch_absent_without_device():
    cuda = pytest.importorskip("kronlin._cuda")
    if cuda.device_count() == 0:
        assert _ext.cuda() is None  # CuPy inputs then take the reference path


@pytest.mark.parametrize(
    "Y,lg,la,match",
    [
        (((1, 2, 2), "<f8"), ((1, 2), "<f4"), ((1, 2), "<f8"), r"lg has dtype '<f4' but Y has '<f8'"),
        (((1, 2, 2), "<f4"), ((1, 2), "<f4"), ((1, 2), "<f8"), r"la has dtype '<f8' but Y has '<f4'"),
        (((1, 2, 2), "<f8"), ((1, 3), "<f8"), ((1, 2), "<f8"),
         r"shapes of Y \(1, 2, 2\), lg \(1, 3\) and la \(1, 2\) do not agree"),
        (((2, 2), "<f8"), ((1, 2), "<f8"), ((1, 2), "<f8"), r"Y must have 3 dimensions; got shape \(2, 2\)"),
        (((1, 2, 2), "<i8"), ((1, 2), "<i8"), ((1, 2), "<i8"), r"Y has dtype '<i8'; the CUDA kernels take float32"),
    ],
)
def test_cuda_bindings_check_operands_before_launch(Y, lg, la, match):
    """A float32 buffer can no longer be handed to the float64 kernel (the eig_scale dtype bug)."""
    cuda = pytest.importorskip("kronlin._cuda")
    with pytest.raises(ValueError, match=match):
        cuda.eig_scale(_FakeCuda(*Y), _FakeCuda(*lg), _FakeCuda(*la), 0.0, -1.0, 0)


def test_gram_tile_rule_follows_the_h100_measurements():
    """bench/results/gpu-2026-11-26.md: tile 32 wins at T = 16, 64 at T = 64, 128 from T = 256 on."""
    cuda = pytest.importorskip("kronlin._cuda")
    for dbl in (False, True):
        assert [cuda.gram_tile_for(T, dbl) for T in (1, 16, 32, 33, 64, 127, 128, 256, 1024)] == [
            32, 32, 32, 64, 64, 64, 128, 128, 128]


def test_kernels_module_is_the_public_face_of_the_extension():
    """kronlin.kernels (what bench/ uses) reports and switches what kronlin._ext does."""
    from kronlin import kernels

    info = kernels.load_info()
    assert set(info) == {"cpu_file", "cpu_import_error", "cuda_file", "cuda_import_error", "disabled_by_env"}
    assert kernels.DISABLED_BY_ENV == info["disabled_by_env"] == _ext.ext_disabled_by_env
    assert (info["cpu_file"] is None) == (info["cpu_import_error"] is not None) == (not kronlin.extension_info()["cpu_extension"])
    if info["cpu_file"] is not None:
        assert os.path.exists(info["cpu_file"]) and kernels.openmp_max_threads() >= 1
    assert kernels.compiled(np) is _ext.cpu() and kernels.enabled() == (not kernels.DISABLED_BY_ENV)
    if kernels.compiled(np) is not None:
        assert kernels.kernel(np, "eig_scale").fn is kernels.compiled(np).eig_scale
    with kernels.disabled():
        assert not kernels.enabled() and kernels.compiled(np) is None and kernels.kernel(np, "eig_scale") is None
    assert kernels.compiled(np) is _ext.cpu()  # restored
