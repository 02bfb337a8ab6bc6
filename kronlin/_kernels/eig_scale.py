"""Eigenbasis scaling: ``Y[..., i, j] *= (lg[..., i] * la[..., j] + shift) ** power``.

The middle step of ``KronEigh.solve/power`` (K-FAC §4.2, appendix B): after
``Y = Qgᵀ X Qa`` every entry is scaled by a function of the eigenvalue
products.  The compiled kernels (``csrc/cpu/eig_scale_cpu.cpp``,
``csrc/cuda/eig_scale_cuda.cu``) do it in place in one pass and never hold the
``(q, p)`` array of denominators; :func:`eig_scale_reference` is the
array-API composition they are tested against.
"""

from __future__ import annotations

from .._backend import native_float
from ._dispatch import kernel

__all__ = ["eig_scale", "eig_scale_reference"]


def eig_scale_reference(xp, Y, lg, la, shift: float, power: float):
    """Array-API reference; returns a new array (``Y`` is not modified)."""
    d = lg[..., :, None] * la[..., None, :] + shift
    if power == -1.0:
        return Y / d
    if power == 1.0:
        return Y * d
    if power == 0.5:
        return Y * xp.sqrt(d)
    if power == -0.5:
        return Y / xp.sqrt(d)
    return Y * d**power


def _flatten_eig(xp, v, batch, n):
    """Eigenvalues (..., n) as a (B, n) array matching Y's batch (a view when no broadcasting is needed)."""
    if v.ndim == 1 and not batch:
        return xp.reshape(v, (1, n))
    if tuple(v.shape[:-1]) == batch:
        return xp.reshape(v, (-1, n))
    return xp.reshape(xp.broadcast_to(v, batch + (n,)), (-1, n))


def eig_scale(xp, Y, lg, la, shift: float, power: float):
    """Scale ``Y`` (..., q, p) by ``(lg ⊗ la + shift) ** power``; may work in place on ``Y``.

    ``Y`` must be a fresh array owned by the caller (it is overwritten when a
    compiled kernel runs).  ``lg`` (..., q) and ``la`` (..., p) broadcast
    against ``Y``'s batch dimensions; they are cast to ``Y``'s dtype (a
    float32 operator applied to a float64 right-hand side computes in
    float64), so every backend sees operands of one dtype.  Returns the
    scaled array.
    """
    q, p = Y.shape[-2], Y.shape[-1]
    batch = tuple(Y.shape[:-2])
    run = kernel(xp, "eig_scale")
    if (run is not None and Y.size > 0 and native_float(Y) and Y.flags.c_contiguous
            and getattr(Y.flags, "writeable", True)):
        g = xp.ascontiguousarray(_flatten_eig(xp, lg, batch, q).astype(Y.dtype, copy=False))
        a = xp.ascontiguousarray(_flatten_eig(xp, la, batch, p).astype(Y.dtype, copy=False))
        run(Y.reshape(-1, q, p), g, a, float(shift), float(power))
        return Y
    return eig_scale_reference(xp, Y, lg, la, shift, power)
