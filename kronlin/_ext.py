"""Loading of the compiled extensions and the switch that forces the NumPy reference.

``kronlin._C`` (CPU, C++17/OpenMP) is built with every install;
``kronlin._cuda`` whenever the build found a CUDA compiler.  Setting the
environment variable ``KRONLIN_DISABLE_EXT=1`` before import forces the
array-API reference implementation of every kernel; :func:`disabled` does the
same temporarily (tests use it to compare kernel and reference).
"""

from __future__ import annotations

import contextlib
import os

__all__ = ["cpu", "cuda", "ext_disabled_by_env", "disabled", "enabled", "info"]

ext_disabled_by_env = os.environ.get("KRONLIN_DISABLE_EXT", "0").strip().lower() not in ("", "0", "false", "no")

try:
    from . import _C as _cpu_module
except ImportError as _exc:  # pragma: no cover - exercised by the fallback CI job
    _cpu_module = None
    cpu_import_error = _exc
else:
    cpu_import_error = None

try:
    from . import _cuda as _cuda_module
except ImportError as _exc:
    _cuda_module = None
    cuda_import_error = _exc
else:
    cuda_import_error = None

_state = {"on": not ext_disabled_by_env}


def enabled() -> bool:
    """True when compiled kernels may be used."""
    return _state["on"]


def cpu():
    """The CPU extension module, or None when absent or disabled."""
    return _cpu_module if _state["on"] else None


def _cuda_devices() -> int:
    """Visible CUDA devices, asked once (every kernel dispatch on CuPy arrays checks it)."""
    if "cuda_devices" not in _state:
        _state["cuda_devices"] = _cuda_module.device_count() if _cuda_module is not None else 0
    return _state["cuda_devices"]


def cuda():
    """The CUDA extension module, or None when absent, disabled or without a device."""
    if not _state["on"] or _cuda_module is None:
        return None
    return _cuda_module if _cuda_devices() > 0 else None


@contextlib.contextmanager
def disabled():
    """Temporarily force the reference implementations."""
    old = _state["on"]
    _state["on"] = False
    try:
        yield
    finally:
        _state["on"] = old


def info() -> dict:
    """What was built and what is in use (for ``python -m kronlin`` and bench records)."""
    return {
        "cpu_extension": _cpu_module is not None,
        "cpu_openmp": bool(getattr(_cpu_module, "has_openmp", False)),
        "cuda_extension": _cuda_module is not None,
        "cuda_devices": _cuda_devices(),
        "disabled": not _state["on"],
    }
