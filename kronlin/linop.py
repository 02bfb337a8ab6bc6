"""``aslinearoperator()``: kronlin operators as SciPy (or cupyx) ``LinearOperator`` objects.

The LinearOperator acts on flat column-stacked vectors (DESIGN §1), so it can be
handed to ``scipy.sparse.linalg.cg``, ``gmres``, ``eigsh`` and friends.
"""

from __future__ import annotations

import numpy as np

from ._backend import is_cupy, is_numpy, mT, to_numpy

__all__ = ["make_linear_operator"]


def _linear_operator_class(xp):
    if is_cupy(xp):
        from cupyx.scipy.sparse.linalg import LinearOperator
    else:
        from scipy.sparse.linalg import LinearOperator
    return LinearOperator


def make_linear_operator(op, fn=None, rfn=None):
    """Wrap a Kronecker-structured operator.

    ``fn``/``rfn`` map ``(k, q, p)`` stacks in the operator's namespace to
    ``(k, q, p)`` stacks (the operator and its transpose); by default the
    operator's own product and that of its ``.T``.
    """
    if op.batch_shape:
        raise ValueError(
            f"a batched operator (batch shape {op.batch_shape}) is not one linear operator; build one per item"
        )
    xp = op._ctx.xp
    p, q, n = op.p, op.q, op.p * op.q
    fn = fn or op._apply_matrix
    if rfn is None:
        rfn = op.T._apply_matrix if hasattr(op, "T") else fn
    native = is_numpy(xp) or is_cupy(xp)

    def wrap(f):
        def matmat(V):
            V = xp.asarray(V if native else np.asarray(V), dtype=op.dtype)
            vec = V.ndim == 1
            V2 = xp.reshape(V, (n, 1)) if vec else V
            k = V2.shape[1]
            X = mT(xp.reshape(mT(V2), (k, p, q)))
            Y = mT(xp.reshape(mT(f(X)), (k, n)))
            Y = xp.reshape(Y, (n,)) if vec else Y
            return Y if native else to_numpy(Y)

        return matmat

    LinearOperator = _linear_operator_class(xp)
    mm, rmm = wrap(fn), wrap(rfn)
    dtype = np.dtype(str(op.dtype).split(".")[-1]) if not native else op.dtype
    return LinearOperator((n, n), matvec=mm, rmatvec=rmm, matmat=mm, rmatmat=rmm, dtype=dtype)
