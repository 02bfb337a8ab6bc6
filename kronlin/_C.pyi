"""Stubs of kronlin._C, the private CPU extension (C++17, OpenMP)."""

import numpy as np
import numpy.typing as npt

has_openmp: bool

def eig_scale(
    Y: npt.NDArray[np.floating], lg: npt.NDArray[np.floating], la: npt.NDArray[np.floating], shift: float, power: float
) -> None:
    """In place: ``Y[b, i, j] *= (lg[b, i] * la[b, j] + shift) ** power``.

    ``Y`` (B, q, p), ``lg`` (B, q), ``la`` (B, p): C-contiguous, one dtype (float32 or float64).
    """

def openmp_max_threads() -> int: ...
