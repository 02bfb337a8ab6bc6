"""Shared helpers of the test suite: conversions between libraries, errors and tolerances.

Random problems and their dense references come from :mod:`kronlin.testing`
(shared with the self-check and the benchmarks).
"""

from __future__ import annotations

import numpy as np

from kronlin._backend import is_cupy, to_numpy

__all__ = ["to_np", "on", "rel_err", "tol", "DTYPES", "native", "krylov", "linear_operator"]

DTYPES = ("float64", "float32")


def to_np(x):
    return np.asarray(to_numpy(x))


def on(xp, *arrays, dtype="float64"):
    """Move NumPy arrays into namespace ``xp`` with the given dtype."""
    out = [xp.asarray(np.asarray(a, dtype=dtype)) for a in arrays]
    return out[0] if len(out) == 1 else out


def rel_err(got, ref):
    got, ref = to_np(got).astype(np.float64), to_np(ref).astype(np.float64)
    assert got.shape == ref.shape, (got.shape, ref.shape)
    scale = max(np.abs(ref).max(initial=0.0), np.finfo(np.float64).tiny)
    return float(np.abs(got - ref).max(initial=0.0) / scale)


def tol(dtype, cond=1.0):
    """Relative tolerance for a result whose conditioning is ``cond``.

    The forward error of a backward-stable solve is about cond·eps; the
    constants (1e-10 at cond <= 1e3 in float64, 1e-4 in float32, as the
    foundation issue states) leave room for the p·q-term sums of the GEMMs.
    """
    base = 1e-13 if str(dtype) == "float64" else 2e-6
    return max(base * cond, 1e-12 if str(dtype) == "float64" else 1e-5) * 50


def native(xp, a):
    """A NumPy array as ``aslinearoperator()``'s operator takes it: CuPy for CuPy (cupyx), NumPy otherwise."""
    return xp.asarray(a) if is_cupy(xp) else np.asarray(a)


def _splinalg(xp):
    if is_cupy(xp):
        import cupyx.scipy.sparse.linalg as splinalg
    else:
        import scipy.sparse.linalg as splinalg
    return splinalg


def linear_operator(xp, shape, matvec, dtype):
    """A ``LinearOperator`` of the library ``aslinearoperator()`` uses for ``xp`` (cupyx's for CuPy)."""
    return _splinalg(xp).LinearOperator(shape, matvec=matvec, dtype=dtype)


def krylov(xp, method: str, L, b, **kw):
    """``scipy.sparse.linalg.<method>`` (cupyx's for CuPy) at rtol 1e-12, atol 0; returns ``(x, info)``."""
    import inspect

    fn = getattr(_splinalg(xp), method)
    rtol = "rtol" if "rtol" in inspect.signature(fn).parameters else "tol"
    return fn(L, b, **{rtol: 1e-12, "atol": 0.0}, **kw)
