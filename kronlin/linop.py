"""``aslinearoperator()``: kronlin operators as SciPy (or cupyx) ``LinearOperator`` objects.

The LinearOperator acts on flat column-stacked vectors (docs/design.md §1), so it
can be handed to ``scipy.sparse.linalg.cg``, ``gmres``, ``eigsh`` and friends.
It validates its input like the operator does: a wrong length is reported
with the expected one (not SciPy's bare "dimension mismatch"), NaN/Inf and
complex vectors are rejected; a product that overflows raises
``FloatingPointError`` like the operator's own results.
"""

from __future__ import annotations

import numpy as np

from ._backend import is_cupy, is_numpy, mT, to_numpy
from ._validate import all_finite

__all__ = ["make_linear_operator"]

_CLASSES: dict = {}


def _checked(method, what: str):
    """``method`` of ``LinearOperator`` with the input validated first (``what``: "vector" or "matrix")."""

    def checked(self, x):
        self._kl[2](x, what)
        return method(self, x)

    checked.__name__, checked.__doc__ = method.__name__, method.__doc__
    return checked


def _linear_operator_class(xp):
    """A ``LinearOperator`` subclass (SciPy's, or cupyx's for CuPy) that checks vectors before SciPy does."""
    key = "cupy" if is_cupy(xp) else "scipy"
    if key not in _CLASSES:
        if key == "cupy":
            from cupyx.scipy.sparse.linalg import LinearOperator
        else:
            from scipy.sparse.linalg import LinearOperator

        class KronlinLinearOperator(LinearOperator):
            """A kronlin operator on flat column-stacked vectors; input is validated first."""

            def __init__(self, shape, dtype, fwd, rfwd, check):
                self._kl = (fwd, rfwd, check)
                super().__init__(dtype=dtype, shape=shape)

            def _matvec(self, x):
                return self._kl[0](x)

            def _matmat(self, X):
                return self._kl[0](X)

            def _rmatvec(self, x):
                return self._kl[1](x)

            def _rmatmat(self, X):
                return self._kl[1](X)

            def _adjoint(self):
                fwd, rfwd, check = self._kl
                return KronlinLinearOperator(self.shape[::-1], self.dtype, rfwd, fwd, check)

            _transpose = _adjoint  # real operators: .T is .H, validated the same way

            matvec = _checked(LinearOperator.matvec, "vector")
            rmatvec = _checked(LinearOperator.rmatvec, "vector")
            matmat = _checked(LinearOperator.matmat, "matrix")
            rmatmat = _checked(LinearOperator.rmatmat, "matrix")

        _CLASSES[key] = KronlinLinearOperator
    return _CLASSES[key]


def _checker(n: int, host):
    """Validate a vector (n,)/(n, 1) or a matrix (n, k) handed to the LinearOperator."""

    def check(x, what: str) -> None:
        try:
            shape = tuple(getattr(x, "shape", None) or np.shape(x))
        except ValueError:  # a ragged list
            raise ValueError(f"the {what} is not a rectangular array; pass a {host.__name__} array") from None
        ok = (shape in ((n,), (n, 1))) if what == "vector" else (len(shape) == 2 and shape[0] == n)
        if not ok:
            want = f"({n},) or ({n}, 1)" if what == "vector" else f"({n}, k)"
            raise ValueError(
                f"the LinearOperator acts on column-stacked vectors of length P = {n}: expected a {what} of shape "
                f"{want}; got shape {shape}"
            )
        try:
            dt = np.dtype(x.dtype) if hasattr(x, "dtype") else np.asarray(x).dtype
        except TypeError:  # a torch tensor, ...: not an array SciPy can take
            raise TypeError(
                f"the {what} must be a {host.__name__} array (the LinearOperator computes on {host.__name__}); "
                f"got {type(x).__module__}.{type(x).__name__}"
            ) from None
        kind = dt.kind
        if kind == "f" and dt.itemsize < 4:
            raise TypeError(f"the {what} has dtype {dt}; kronlin computes in float32 or float64, cast it first")
        if kind == "c":
            raise TypeError(
                f"the {what} is complex ({x.dtype}); kronlin operators are real: apply the operator to the real "
                f"and imaginary parts separately"
            )
        if kind not in "fiub":
            raise TypeError(f"the {what} has dtype {x.dtype}; pass a real float32/float64 array")
        xh = host.asarray(x)
        if not bool(host.isfinite(xh).all()):
            raise ValueError(f"the {what} (shape {shape}) contains NaN or infinity; kronlin needs finite input")

    return check


def make_linear_operator(op, fn, rfn):
    """Wrap an :class:`kronlin._operator.Operator` whose hooks map lists of ``(k, q, p)`` blocks.

    ``fn``/``rfn`` are the operator and its transpose on lists of blocks in
    the operator's compute namespace.
    """
    if op.batch_shape:
        raise ValueError(
            f"a batched operator (batch shape {op.batch_shape}) is not one linear operator (its batch dimensions "
            f"come from {op._operands}); build one per item"
        )
    xp = op._ctx.xp
    n = op.n_params
    native = is_numpy(xp) or is_cupy(xp)

    def wrap(f):
        def matmat(V):
            V = xp.asarray(V if native else np.asarray(V), dtype=op.dtype)
            vec = V.ndim == 1
            V2 = xp.reshape(V, (n, 1)) if vec else V
            Y = mT(op._flatten(f(op._unflatten(mT(V2)))))
            if not all_finite(xp, Y):  # finite input (checked), so the product overflowed
                raise op._nonfinite(Y, "aslinearoperator")
            Y = xp.reshape(Y, (n,)) if vec else Y
            return Y if native else to_numpy(Y)

        return matmat

    host = xp if native else np
    cls = _linear_operator_class(xp)
    dtype = op.dtype if native else np.dtype(str(op.dtype).split(".")[-1])
    return cls((n, n), dtype, wrap(fn), wrap(rfn), _checker(n, host))
