"""Symmetric matrices: the symmetry check of every symmetric input, and the mirror after LAPACK ``potri``.

* :func:`asymmetry` returns ``(max|x − xᵀ|, max|x|)`` of a square matrix or a
  stack of them, which :func:`kronlin._validate.check_symmetric` compares with
  the round-off tolerance (``SYM_RTOL_FACTOR · eps · max|x|``).  A NaN or an
  infinity anywhere gives ``(nan, nan)``: no tolerance accepts it.
* :func:`mirror_lower` copies the lower triangle of a C-contiguous matrix (or
  stack) onto the upper one, in place: ``potri`` returns one triangle of the
  inverse, and the GEMMs that apply it read both.

Both are one O(n²) pass over memory, beside O(n³) factorizations; at 512²
float32 the NumPy compositions cost 10-12% of ``potrf`` + ``potri`` each
(Python-level tiles: a whole transposed read misses the cache once per entry).
The compiled kernels (``csrc/cpu/symmetric_cpu.cpp``, NumPy arrays only; CuPy
and the other namespaces run the references) do each in one tiled pass in C++.
"""

from __future__ import annotations

import math

import numpy as np

from .._backend import is_numpy, mT, native_float
from ._dispatch import kernel

__all__ = ["asymmetry", "asymmetry_reference", "compiled_asymmetry", "mirror_lower", "mirror_lower_reference",
           "stack_asymmetry", "stack_asymmetry_reference"]

#: Tile size of the references: comparing b×b tiles with their mirror images keeps the transposed reads
#: in cache (8-10x faster than ``x - x.T`` at n >= 1024; for the mirror at 1024 float32 row strips took
#: 10.5 ms, 64² tiles 1.4 and 128² tiles 1.5, one thread).
TILE = 128


def asymmetry_reference(xp, x) -> tuple[float, float]:
    """Array-API reference of :func:`asymmetry`."""
    n = x.shape[-1]
    scale = float(xp.max(xp.abs(x))) if math.prod(x.shape) else 0.0
    if not math.isfinite(scale):
        return math.nan, math.nan
    asym = 0.0
    for i in range(0, n, TILE):
        i2 = min(i + TILE, n)
        for j in range(i, n, TILE):
            j2 = min(j + TILE, n)
            t = x[..., i:i2, j:j2] - mT(x[..., j:j2, i:i2])
            asym = max(asym, float(xp.max(xp.abs(t))))
    return asym, scale


def compiled_asymmetry(xp, x) -> tuple[float, float] | None:
    """:func:`asymmetry` of ``x`` where the compiled kernel computes it (a C-contiguous float32/float64 NumPy
    array: one pass over ``x``), else None.  A constructor that must test its square inputs finite calls this
    instead (:func:`kronlin._validate.check_finite_measured`): the one pass also measures their symmetry, which
    a later factorization needs."""
    run = kernel(xp, "asymmetry")
    if run is None or not native_float(x) or not x.flags.c_contiguous:
        return None
    n = x.shape[-1]
    if math.prod(x.shape) == 0:
        return 0.0, 0.0
    if n <= 1:  # nothing off the diagonal; a NaN or infinity still gives (nan, nan), as at every other order
        return asymmetry_reference(xp, x)
    return run(np.reshape(x, (-1, n, n)))


def asymmetry(xp, x) -> tuple[float, float]:
    """``(max|x − xᵀ|, max|x|)`` of a square ``(..., n, n)`` array; ``(nan, nan)`` if any entry is not finite."""
    measured = compiled_asymmetry(xp, x)
    return asymmetry_reference(xp, x) if measured is None else measured


def stack_asymmetry_reference(xp, Ms, out) -> tuple[float, float]:
    """NumPy reference of :func:`stack_asymmetry`: the stack, then :func:`asymmetry_reference` of it."""
    np.stack(Ms, out=out)
    return asymmetry_reference(xp, out)


def stack_asymmetry(xp, Ms, out) -> tuple[float, float]:
    """``out[b] = Ms[b]`` (B square NumPy matrices into the ``(B, n, n)`` NumPy stack ``out``) and
    :func:`asymmetry` of ``out``, each matrix measured while it is in cache (the compiled kernel; at
    200 × 64² the copy and the symmetry test read the stacks once instead of twice)."""
    if not is_numpy(xp):
        raise TypeError("stack_asymmetry writes into a NumPy stack")
    run = kernel(xp, "stack_asymmetry")
    if run is not None and native_float(out) and out.flags.c_contiguous and out.shape[-1] > 1:
        # the kernel judges the matrices itself (None: one is not an aligned C-contiguous ndarray of out's dtype)
        got = run(Ms if type(Ms) is list else list(Ms), out)
        if got is not None:
            return got
    return stack_asymmetry_reference(xp, Ms, out)


def mirror_lower_reference(xp, S):
    """NumPy reference of :func:`mirror_lower` (in place, tile by tile; stacks matrix by matrix)."""
    n = S.shape[-1]
    if S.ndim > 2 and n <= TILE:
        # a stack of small matrices in one select (lower triangle from S, upper from its transpose):
        # a per-matrix mirror costs 1.2-1.4x the whole potri loop at 200 x 64² in Python overheads
        S[...] = np.where(np.tri(n, dtype=bool), S, np.swapaxes(S, -1, -2))
        return S
    for M in (np.reshape(S, (-1, n, n)) if S.ndim > 2 else (S,)):
        for i in range(0, n, TILE):
            i2 = min(i + TILE, n)
            D = M[i:i2, i:i2]
            D[...] = np.tril(D) + np.tril(D, -1).T
            for j in range(i2, n, TILE):
                j2 = min(j + TILE, n)
                M[i:i2, j:j2] = M[j:j2, i:i2].T
    return S


def mirror_lower(xp, S):
    """Copy the lower triangle of the C-contiguous NumPy ``S`` (n, n) or (..., n, n) onto its upper one,
    in place; returns ``S``."""
    if not is_numpy(xp):
        raise TypeError("mirror_lower works in place on NumPy arrays")
    run = kernel(xp, "mirror_lower")
    if run is not None and native_float(S) and S.flags.c_contiguous and S.size:
        run(np.reshape(S, (-1, S.shape[-1], S.shape[-1])))
        return S
    return mirror_lower_reference(xp, S)
