"""The Kronecker operator ``Kron(A, G) = A ⊗ G`` (K-FAC §3, §4.2; DESIGN §1).

``A`` (p, p) is the input/activation factor and ``G`` (q, q) the output/gradient
factor.  The operator acts on weight-shaped matrices ``X`` (q, p) through
``Kron(A, G) @ X == G @ X @ A.T``, which is ``np.kron(A, G) @ X.flatten("F")``
reshaped back (``vec`` stacks columns).  Leading batch dimensions on ``X`` are
broadcast; the factors may themselves be stacks ``(..., p, p)`` and
``(..., q, q)``, which is how many equal-shaped layers are decomposed and
solved in one batched LAPACK call instead of a Python loop.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from ._backend import Ctx, context, mT, trace
from ._linalg import Factor, eigh
from ._validate import LinAlgError, check_finite, check_square, check_symmetric, shape_str

if TYPE_CHECKING:  # pragma: no cover
    from .kron_eigh import KronEigh

__all__ = ["Kron", "DENSE_LIMIT"]

#: ``to_dense()`` refuses results with more entries than this (2**24 entries
#: is 128 MiB in float64, ``p*q = 4096``) unless called with ``allow_large=True``.
DENSE_LIMIT = 2**24


def _batch_shape(A, G, nameA="A", nameG="G"):
    try:
        return tuple(np.broadcast_shapes(tuple(A.shape[:-2]), tuple(G.shape[:-2])))
    except ValueError:
        raise ValueError(
            f"the batch dimensions of {nameA} {shape_str(A)} and {nameG} {shape_str(G)} do not broadcast"
        ) from None


class _KronShaped:
    """Right-hand-side handling shared by the Kronecker-structured operators."""

    _ctx: Ctx
    p: int
    q: int
    batch_shape: tuple

    @property
    def shape(self) -> tuple:
        """Shape ``(p*q, p*q)`` of the (unbatched) matrix the operator represents."""
        n = self.p * self.q
        return (n, n)

    @property
    def dtype(self):
        return self._ctx.dtype

    def _rhs(self, X, name: str = "X"):
        """Convert ``X`` to a ``(..., q, p)`` array; return it and whether it was flat."""
        X = self._ctx.asarray(X, name)
        p, q = self.p, self.q
        if X.ndim == 1:
            if X.shape[0] != p * q:
                raise ValueError(
                    f"{name} is a flat vector of length {X.shape[0]}, but the operator needs length "
                    f"p*q = {p * q} (column-stacked), or shape (..., q, p) = (..., {q}, {p})"
                )
            check_finite(self._ctx.xp, X, name)
            return mT(self._ctx.xp.reshape(X, (p, q))), True
        if X.ndim < 2 or tuple(X.shape[-2:]) != (q, p):
            raise ValueError(
                f"{name} must have shape (..., q, p) = (..., {q}, {p}) or be a flat column-stacked vector "
                f"of length {p * q}; got shape {shape_str(X)}"
            )
        check_finite(self._ctx.xp, X, name)
        return X, False

    def _ret(self, Y, flat: bool):
        xp = self._ctx.xp
        if flat:
            Y = xp.reshape(mT(Y), tuple(Y.shape[:-2]) + (self.p * self.q,))
        return self._ctx.out(Y)

    def matmat(self, V):
        """Apply the operator to the columns of ``V`` (p*q, k) (flat column-stacked vectors)."""
        return self._flat_columns(V, lambda X: self._apply_matrix(X))

    def _flat_columns(self, V, fn):
        xp = self._ctx.xp
        V = self._ctx.asarray(V, "V")
        n = self.p * self.q
        if V.ndim != 2 or V.shape[0] != n:
            raise ValueError(f"V must have shape (p*q, k) = ({n}, k); got {shape_str(V)}")
        check_finite(xp, V, "V")
        k = V.shape[1]
        X = mT(xp.reshape(mT(V), (k, self.p, self.q)))
        Y = fn(X)
        return self._ctx.out(mT(xp.reshape(mT(Y), (k, n))))

    def aslinearoperator(self):
        """A ``scipy.sparse.linalg.LinearOperator`` (CuPy: ``cupyx``'s) on flat column-stacked vectors."""
        from .linop import make_linear_operator

        return make_linear_operator(self)


class Kron(_KronShaped):
    """The Kronecker product ``A ⊗ G`` of an input factor ``A`` and an output factor ``G``.

    Parameters
    ----------
    A : array (p, p) or (..., p, p)
        Input-side (activation) factor, e.g. ``Ā = E[ā āᵀ]`` (K-FAC eq. 1).
    G : array (q, q) or (..., q, q)
        Output-side (gradient) factor, e.g. ``G = E[g gᵀ]``.

    Notes
    -----
    ``Kron(A, G) @ X == G @ X @ A.T`` for ``X`` of shape ``(..., q, p)``, and a
    flat vector of length ``p*q`` is read in column-stacking order (DESIGN §1).
    Factorizations (Cholesky for symmetric positive definite factors, LU
    otherwise; the eigendecomposition) are computed once and cached.

    Examples
    --------
    >>> import numpy as np, kronlin
    >>> A, G = np.diag([1.0, 2.0]), np.diag([3.0, 4.0, 5.0])
    >>> X = np.ones((3, 2))
    >>> np.allclose(kronlin.Kron(A, G) @ X, G @ X @ A.T)
    True
    """

    def __init__(self, A, G):
        ctx, (A, G) = context(("A", A), ("G", G))
        p = check_square(A, "A")
        q = check_square(G, "G")
        self.batch_shape = _batch_shape(A, G)
        check_finite(ctx.xp, A, "A")
        check_finite(ctx.xp, G, "G")
        self._init(ctx, A, G, p, q)

    def _init(self, ctx, A, G, p, q):
        self._ctx, self._A, self._G, self.p, self.q = ctx, A, G, p, q
        self.batch_shape = _batch_shape(A, G)
        self._fa = self._fg = None
        self._eigh = {}
        return self

    @classmethod
    def _trusted(cls, ctx, A, G):
        return cls.__new__(cls)._init(ctx, A, G, int(A.shape[-1]), int(G.shape[-1]))

    def __repr__(self) -> str:
        b = f", batch={self.batch_shape}" if self.batch_shape else ""
        return f"Kron(p={self.p}, q={self.q}{b}, dtype={self.dtype}, backend={self._ctx.name})"

    @property
    def A(self):
        """The input factor, in the caller's library."""
        return self._ctx.out(self._A)

    @property
    def G(self):
        """The output factor, in the caller's library."""
        return self._ctx.out(self._G)

    # -- products -----------------------------------------------------------
    def _apply_matrix(self, X):
        return self._G @ X @ mT(self._A)

    def __matmul__(self, X):
        """``(A ⊗ G) vec(X)``, i.e. ``G @ X @ A.T``."""
        X, flat = self._rhs(X)
        return self._ret(self._apply_matrix(X), flat)

    matvec = __matmul__

    @property
    def T(self) -> "Kron":
        """``(A ⊗ G)ᵀ = Aᵀ ⊗ Gᵀ``."""
        return Kron._trusted(self._ctx, mT(self._A), mT(self._G))

    def rmatmat(self, V):
        """Apply the transpose to the columns of ``V`` (p*q, k)."""
        return self.T.matmat(V)

    # -- factorizations -------------------------------------------------------
    def _factors(self):
        if self._fa is None:
            self._fa = Factor(self._ctx.xp, self._A, "A")
            self._fg = Factor(self._ctx.xp, self._G, "G")
        return self._fa, self._fg

    def solve(self, X):
        """``(A ⊗ G)⁻¹ vec(X)``, i.e. ``G⁻¹ X A⁻ᵀ`` (Cholesky for SPD factors, LU otherwise)."""
        X, flat = self._rhs(X)
        fa, fg = self._factors()
        Z = fg.solve(X)
        return self._ret(mT(fa.solve(mT(Z))), flat)

    def inv(self) -> "Kron":
        """``(A ⊗ G)⁻¹ = A⁻¹ ⊗ G⁻¹`` as a new operator."""
        fa, fg = self._factors()
        return Kron._trusted(self._ctx, fa.inv(), fg.inv())

    def slogdet(self):
        """``(sign, log|det(A ⊗ G)|)`` with ``det(A ⊗ G) = det(A)^q det(G)^p``."""
        xp = self._ctx.xp
        fa, fg = self._factors()
        sa, la = fa.slogdet()
        sg, lg = fg.slogdet()
        sign = (sa**self.q) * (sg**self.p)
        return self._ctx.out(sign), self._ctx.out(self.q * la + self.p * lg + xp.zeros_like(sign))

    def logdet(self):
        """``log det(A ⊗ G) = q log det A + p log det G``; raises if the determinant is not positive."""
        xp = self._ctx.xp
        fa, fg = self._factors()
        sa, la = fa.slogdet()
        sg, lg = fg.slogdet()
        if bool(xp.any((sa**self.q) * (sg**self.p) <= 0)):
            raise LinAlgError("det(A ⊗ G) is not positive, so its log is undefined; use slogdet()")
        return self._ctx.out(self.q * la + self.p * lg)

    def trace(self):
        """``tr(A ⊗ G) = tr(A) tr(G)``."""
        xp = self._ctx.xp
        return self._ctx.out(trace(xp, self._A) * trace(xp, self._G))

    def to_dense(self, allow_large: bool = False):
        """The dense ``(p*q, p*q)`` matrix ``np.kron(A, G)`` (batched: ``(..., p*q, p*q)``).

        Refuses more than :data:`DENSE_LIMIT` entries unless ``allow_large=True``.
        """
        n = self.p * self.q
        if n * n > DENSE_LIMIT and not allow_large:
            raise ValueError(
                f"to_dense() would build a {n}x{n} matrix ({n * n} entries > DENSE_LIMIT = {DENSE_LIMIT}); "
                f"pass allow_large=True if you really want it"
            )
        xp = self._ctx.xp
        K = self._A[..., :, None, :, None] * self._G[..., None, :, None, :]
        return self._ctx.out(xp.reshape(K, tuple(K.shape[:-4]) + (n, n)))

    def eigh(self, psd: bool = True) -> "KronEigh":
        """Eigendecomposition ``A = Qa diag(la) Qaᵀ``, ``G = Qg diag(lg) Qgᵀ`` (cached).

        Both factors must be symmetric.  With ``psd=True`` (curvature factors)
        round-off negative eigenvalues are clipped to zero and clearly negative
        ones raise; float32 failures are retried in float64.
        """
        from .kron_eigh import KronEigh

        if psd not in self._eigh:
            xp = self._ctx.xp
            check_symmetric(xp, self._A, "A")
            check_symmetric(xp, self._G, "G")
            la, Qa = eigh(xp, self._A, "A", psd=psd)
            lg, Qg = eigh(xp, self._G, "G", psd=psd)
            self._eigh[psd] = KronEigh._trusted(self._ctx, Qa, la, Qg, lg)
        return self._eigh[psd]
