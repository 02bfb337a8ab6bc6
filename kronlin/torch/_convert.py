"""Moving tensors between torch and kronlin's core, through the core's own conversion path.

There is one conversion path in kronlin (``kronlin/_backend.py``, docs/design.md
"data path of a call"): CPU tensors are taken zero-copy by DLPack into NumPy,
CUDA tensors into CuPy (a clear error names the fix when CuPy is missing), and
results go back through torch's ``from_dlpack``.  This module only names the
two directions for the binding; it adds no conversion rules of its own.
"""

from __future__ import annotations

import sys

import numpy as np
import torch

from .._backend import Ctx, context

__all__ = ["to_array", "from_array", "array_namespace", "SUPPORTED_DTYPES"]

SUPPORTED_DTYPES = (torch.float32, torch.float64)


def to_array(t: torch.Tensor, name: str = "tensor"):
    """The data of ``t`` as a NumPy (CPU) or CuPy (CUDA) array sharing its memory."""
    _, (arr,) = context((name, t.detach()))
    return arr


def from_array(x) -> torch.Tensor:
    """``x`` (a NumPy/CuPy array computed by the core) as a torch tensor, sharing memory where possible.

    The device follows ``x``: NumPy ↦ CPU, CuPy ↦ the CUDA device the array
    lives on, which is where the tensors the core was given live.
    """
    return Ctx(array_namespace(x), x.dtype, torch).out(x)


def array_namespace(x):
    """NumPy or CuPy: the library of an array the core computed (from :func:`to_array`'s tensors)."""
    return np if isinstance(x, np.ndarray) else sys.modules["cupy"]
