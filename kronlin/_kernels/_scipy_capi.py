"""Addresses of SciPy's C-callable BLAS and LAPACK routines (``scipy.linalg.cython_blas`` / ``cython_lapack``).

The compiled kernels that loop over many small matrices call these routines themselves, so the extension
links no BLAS or LAPACK of its own and makes the very calls of the Python references.
"""

from __future__ import annotations

import ctypes
from typing import Callable

__all__ = ["routine_address"]

_ADDRESSES: dict = {}


def routine_address(module: str, name: str, accept: Callable[[str], bool]) -> int | None:
    """The address of routine ``name`` of ``scipy.linalg.<module>`` (``"cython_blas"`` or ``"cython_lapack"``),
    or None when SciPy does not export it or its C signature fails ``accept``."""
    key = (module, name)
    if key in _ADDRESSES:
        return _ADDRESSES[key]
    address = None
    try:
        import importlib

        capsule = importlib.import_module(f"scipy.linalg.{module}").__pyx_capi__[name]
        # private prototypes: setting restype/argtypes on ctypes.pythonapi's shared functions would change
        # them for every other user in the process
        get_name = ctypes.PYFUNCTYPE(ctypes.c_char_p, ctypes.py_object)(("PyCapsule_GetName", ctypes.pythonapi))
        get_pointer = ctypes.PYFUNCTYPE(ctypes.c_void_p, ctypes.py_object, ctypes.c_char_p)(
            ("PyCapsule_GetPointer", ctypes.pythonapi))
        signature = get_name(capsule)
        if accept(signature.decode()):
            address = get_pointer(capsule, signature) or None
    except (ImportError, AttributeError, KeyError, ValueError):  # pragma: no cover - SciPy without the C API
        address = None
    _ADDRESSES[key] = address
    return address
