"""The K-FAC block products ``G⁻¹ V A⁻ᵀ`` of a stack of equal-shaped layers, one layer after another.

:func:`block_apply` computes ``Y[b] = G[b] @ V[b] @ At[b]`` for a ``(B, q, q)`` stack ``G``, a list of
``B`` ``(q, p)`` blocks ``V`` and a ``(B, p, p)`` stack ``At`` (NumPy float arrays of one dtype) into a new
``(B, q, p)`` stack, and returns ``(Y, b)`` with ``b`` the first layer whose result holds a NaN or an
infinity (``None`` when all are finite): :meth:`kronlin.BlockDiagInverse.apply`'s products and its
finiteness test of the results in one pass.

The reference is the Python loop of ``np.matmul`` calls with the intermediate ``G[b] @ V[b]`` in one reused
buffer, then one finiteness test.  The compiled kernel (``csrc/cpu/block_apply_cpu.cpp``) makes two BLAS
``?gemm`` calls per layer from one C++ loop, SciPy's own routine reached through
``scipy.linalg.cython_blas``, and tests each result while it is in cache.  The GEMMs of the two may come from
different OpenBLAS builds (NumPy's and SciPy's), so they agree to rounding, not bit for bit.
"""

from __future__ import annotations

import numpy as np

from .._backend import native_float
from .._validate import first_nonfinite
from ._dispatch import kernel
from ._scipy_capi import routine_address

__all__ = ["COMPILED_MAX_ORDER", "block_apply", "block_apply_compiled", "block_apply_reference", "gemm_address"]

#: The compiled loop serves blocks up to this order (``max(q, p)``): there the NumPy loop's per-call costs
#: weigh.  Kernel / reference, one thread, medians of 31-41 paired calls (float32, float64): 500 × 16² 0.20,
#: 0.31; 200 × 64² 0.76, 0.93-0.96; 100 × 96² 0.89, 1.00; 100 × 128² 1.00, 0.98; and above it SciPy's
#: ``?gemm`` (OpenBLAS 0.3.30) is no faster than NumPy's (0.3.31), in float32 slower: 50 × 256² 1.04,
#: 20 × 128 × 512 1.18, 50 × 32 × 200 1.07.
COMPILED_MAX_ORDER = 96


def gemm_address(dtype) -> int | None:
    """The address of SciPy's C-callable ``?gemm`` for ``dtype`` (float32 or float64), or None."""
    name = {np.dtype(np.float32): "sgemm", np.dtype(np.float64): "dgemm"}.get(np.dtype(dtype))
    if name is None:
        return None
    return routine_address("cython_blas", name, lambda sig: sig.startswith("void (char *, char *, int *, int *, int *, ")
                           and sig.count("*") == 13)


def block_apply_reference(G, V, At):
    """``(Y, b)``: the loop of ``np.matmul`` calls the compiled kernel replaces, then the finiteness test of
    the results (:func:`kronlin._validate.first_nonfinite`)."""
    B, q, p = len(V), G.shape[-1], At.shape[-1]
    Y = np.empty((B, q, p), dtype=G.dtype)
    tmp = np.empty((q, p), dtype=G.dtype)
    with np.errstate(over="ignore", invalid="ignore"):
        for b, v in enumerate(V):
            np.matmul(G[b], v, out=tmp)
            np.matmul(tmp, At[b], out=Y[b])
    # the stack decided at once (one sum: the all-finite case), its layers searched only when it holds a NaN
    # or an infinity (a test per layer made the main job's apply 1.07x against 1.01x)
    return Y, None if first_nonfinite(np, [Y]) is None else first_nonfinite(np, list(Y))


def block_apply_compiled(G, V, At):
    """``(Y, b)`` as :func:`block_apply` from the compiled loop, or None where it does not serve these arrays: no
    extension, blocks wider than :data:`COMPILED_MAX_ORDER`, ``G`` and ``At`` not C-contiguous native float
    stacks of one dtype, or a block ``V[b]`` that is not a ``numpy.ndarray`` (no subclass), aligned,
    C-contiguous, ``(q, p)``, of their dtype.  The blocks are judged by the kernel itself, at a few nanoseconds
    each (the Python test per block it replaced cost about 0.2 µs a block, 2% of a 200 × 64² float32 apply)."""
    if max(G.shape[-1], At.shape[-1]) > COMPILED_MAX_ORDER:
        return None
    run = kernel(np, "block_apply")
    address = gemm_address(G.dtype) if run is not None else None
    if (address is None or not native_float(G) or At.dtype != G.dtype
            or not (G.flags.c_contiguous and At.flags.c_contiguous)):
        return None
    Y = np.empty((len(V), G.shape[-1], At.shape[-1]), dtype=G.dtype)
    b = run(G, V if type(V) is list else list(V), At, Y, address)
    if b == -2:  # a block the kernel does not read in place
        return None
    return Y, (None if b < 0 else int(b))


def block_apply(G, V, At):
    """``(Y, b)`` with ``Y[b] = G[b] @ V[b] @ At[b]`` and ``b`` the first non-finite result's index (or None);
    compiled where :func:`block_apply_compiled` serves the arrays, else :func:`block_apply_reference`."""
    got = block_apply_compiled(G, V, At)
    return block_apply_reference(G, V, At) if got is None else got
