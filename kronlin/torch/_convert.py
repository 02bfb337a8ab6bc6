"""Moving tensors between torch and kronlin's core (NumPy on the CPU, CuPy on the GPU).

CPU tensors go to NumPy without a copy (``Tensor.numpy()`` shares memory) and
results come back with ``torch.from_numpy`` (no copy either).  CUDA tensors go
through DLPack to CuPy, the GPU library kronlin's core computes with, and back
to torch through DLPack; without CuPy a CUDA tensor raises a clear error.
"""

from __future__ import annotations

import numpy as np
import torch

__all__ = ["to_array", "from_array", "SUPPORTED_DTYPES"]

SUPPORTED_DTYPES = (torch.float32, torch.float64)


def _cupy():
    try:
        import cupy
    except ImportError:  # pragma: no cover - exercised only on GPU machines without CuPy
        raise RuntimeError(
            "kronlin.torch got CUDA tensors, but kronlin computes on the GPU through CuPy, which is not "
            "installed; install it (pip install 'kronlin[cuda]') or move the model to the CPU"
        ) from None
    return cupy


def to_array(t: torch.Tensor):
    """The data of ``t`` as a NumPy (CPU) or CuPy (CUDA) array sharing its memory."""
    t = t.detach()
    if t.device.type == "cpu":
        return t.numpy()
    if t.device.type == "cuda":  # pragma: no cover - needs a GPU
        return _cupy().from_dlpack(t)
    raise RuntimeError(f"kronlin.torch supports CPU and CUDA tensors; got a tensor on {t.device}")


def from_array(x, like: torch.Tensor) -> torch.Tensor:
    """A torch tensor on ``like``'s device holding the NumPy/CuPy array ``x`` (shared memory when possible)."""
    if isinstance(x, np.ndarray):
        if not x.flags.writeable:  # torch.from_numpy warns on read-only memory; copy instead
            x = x.copy()
        return torch.from_numpy(x)
    return torch.from_dlpack(x)  # pragma: no cover - CuPy arrays, needs a GPU
