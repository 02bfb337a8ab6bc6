"""The Kronecker operator ``Kron(A, G) = A ⊗ G`` (K-FAC §3, §4.2; docs/design.md §1).

``A`` (p, p) is the input/activation factor and ``G`` (q, q) the output/gradient
factor.  The operator acts on weight-shaped matrices ``X`` (q, p) through
``Kron(A, G) @ X == G @ X @ A.T``, which is ``np.kron(A, G) @ X.flatten("F")``
reshaped back (``vec`` stacks columns).  Leading batch dimensions on ``X`` are
broadcast; the factors may themselves be stacks ``(..., p, p)`` and
``(..., q, q)``, which is how many equal-shaped layers are decomposed and
solved in one batched LAPACK call instead of a Python loop.
"""

from __future__ import annotations

from ._backend import context, diagonal, mT, trace
from ._linalg import Factor, eigh
from ._operator import KronShaped, batch_shape_of
from ._validate import (
    LinAlgError,
    check_finite,
    check_flag,
    check_nonempty,
    check_not_subnormal,
    check_result,
    check_square,
    check_symmetric,
)
from .kron_eigh import KronEigh

__all__ = ["Kron", "DENSE_LIMIT"]

#: ``to_dense()`` refuses results with more entries than this (2**24 entries
#: is 128 MiB in float64, ``p*q = 4096``) unless called with ``allow_large=True``.
DENSE_LIMIT = 2**24


class Kron(KronShaped):
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
    flat vector of length ``p*q`` is read in column-stacking order (docs/design.md §1).
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

    _operands = "the factors A and G"

    def __init__(self, A, G):
        ctx, (A, G) = context(("A", A), ("G", G), snapshot=True)
        p = check_square(A, "A")
        q = check_square(G, "G")
        batch_shape_of(A, G)
        check_nonempty(A, "A")
        check_nonempty(G, "G")
        # the plain finiteness test, not check_finite_measured: measuring the symmetry here would save a
        # factorization one pass, but cost every operator that is only applied (construction + one product:
        # 1.02-1.17x at 64²-1024²), and the symmetry test is compute-bound (about 2x the finiteness pass)
        check_finite(ctx.xp, A, "A")
        check_finite(ctx.xp, G, "G")
        self._init(ctx, A, G, p, q)

    def _init(self, ctx, A, G, p, q):
        self._set_shape(ctx, p, q, batch_shape_of(A, G))
        self._A, self._G = A, G
        self._fac = None  # (Factor of A, Factor of G), published together
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
        """A copy of the input factor, in the caller's library."""
        return self._ctx.out_copy(self._A)

    @property
    def G(self):
        """A copy of the output factor, in the caller's library."""
        return self._ctx.out_copy(self._G)

    # -- products -----------------------------------------------------------
    def _apply_matrix(self, X):
        return self._G @ X @ mT(self._A)

    def __matmul__(self, X):
        """``(A ⊗ G) vec(X)``, i.e. ``G @ X @ A.T``."""
        (X,), fmt = self._rhs(X)
        return self._ret([self._apply_matrix(X)], fmt)

    matvec = __matmul__

    @property
    def T(self) -> "Kron":
        """``(A ⊗ G)ᵀ = Aᵀ ⊗ Gᵀ``."""
        return Kron._trusted(self._ctx, mT(self._A), mT(self._G))

    # -- factorizations -------------------------------------------------------
    def _factors(self):
        fac = self._fac
        if fac is None:  # built into locals, published as one tuple: other threads see both or neither
            fac = self._fac = self._new_factors()
        return fac

    def _new_factors(self, judge_by_inverse: bool = False):
        xp = self._ctx.xp
        check_not_subnormal(xp, self._A, "A")
        check_not_subnormal(xp, self._G, "G")
        return (Factor(xp, self._A, "A", judge_by_inverse=judge_by_inverse),
                Factor(xp, self._G, "G", judge_by_inverse=judge_by_inverse))

    _fa = property(lambda self: self._factors()[0], doc="The cached factorization of A.")
    _fg = property(lambda self: self._factors()[1], doc="The cached factorization of G.")

    def solve(self, X):
        """``(A ⊗ G)⁻¹ vec(X)``, i.e. ``G⁻¹ X A⁻ᵀ`` (Cholesky for SPD factors, LU otherwise)."""
        (X,), fmt = self._rhs(X)
        fa, fg = self._factors()
        Z = fg.solve(X)
        return self._ret([mT(fa.solve(mT(Z)))], fmt)

    def inv(self) -> "Kron":
        """``(A ⊗ G)⁻¹ = A⁻¹ ⊗ G⁻¹`` as a new operator.

        Without cached factorizations (no ``solve``/``logdet`` before) the factors are factored for this
        call only and inverted in the factorizations' own memory (``Factor.inv(overwrite=True)``): one
        copy of each factor less; a later ``solve`` factors them then, as it would have anyway.  Such a
        factor whose pivots leave a doubt is judged singular or not by the condition of the inverse it
        gives (``judge_by_inverse``), not by a condition estimate first."""
        cached = self._fac is not None
        fa, fg = self._factors() if cached else self._new_factors(judge_by_inverse=True)
        kinds = (fa.kind, fg.kind)
        Ai, Gi = fa.inv(overwrite=not cached), fg.inv(overwrite=not cached)
        xp = self._ctx.xp
        for M, kind, name in ((Ai, kinds[0], "A"), (Gi, kinds[1], "G")):  # a tiny factor's inverse overflows
            # an SPD inverse is PSD, |M_ij| <= sqrt(M_ii M_jj): its diagonal decides (O(n), not O(n²))
            check_result(xp, diagonal(xp, M) if kind == "cholesky" else M, f"Kron.inv(): {name}⁻¹",
                         f"{name} is too small in magnitude for its inverse: rescale {name}")
        return Kron._trusted(self._ctx, Ai, Gi)

    def slogdet(self):
        """``(sign, log|det(A ⊗ G)|)`` with ``det(A ⊗ G) = det(A)^q det(G)^p``."""
        xp = self._ctx.xp
        fa, fg = self._factors()
        sa, la = fa.slogdet()
        sg, lg = fg.slogdet()
        sign = (sa**self.q) * (sg**self.p)
        return self._scalar(sign), self._scalar(self.q * la + self.p * lg + xp.zeros_like(sign))

    def logdet(self):
        """``log det(A ⊗ G) = q log det A + p log det G``; raises if the determinant is not positive."""
        xp = self._ctx.xp
        fa, fg = self._factors()
        sa, la = fa.slogdet()
        sg, lg = fg.slogdet()
        if bool(xp.any((sa**self.q) * (sg**self.p) <= 0)):
            raise LinAlgError("det(A ⊗ G) is not positive, so its log is undefined; use slogdet()")
        return self._scalar(self.q * la + self.p * lg)

    def trace(self):
        """``tr(A ⊗ G) = tr(A) tr(G)``."""
        xp = self._ctx.xp
        return self._scalar(trace(xp, self._A) * trace(xp, self._G))

    def to_dense(self, allow_large: bool = False):
        """The dense ``(p*q, p*q)`` matrix ``np.kron(A, G)`` (batched: ``(..., p*q, p*q)``).

        Refuses more than :data:`DENSE_LIMIT` entries unless ``allow_large=True``.
        """
        return self._out(self._dense(allow_large))

    def _dense(self, allow_large: bool):
        allow_large = check_flag(allow_large, "allow_large")
        n = self.p * self.q
        if n * n > DENSE_LIMIT and not allow_large:
            raise ValueError(
                f"to_dense() would build a {n}x{n} matrix ({n * n} entries > DENSE_LIMIT = {DENSE_LIMIT}); "
                f"pass allow_large=True if you really want it"
            )
        xp = self._ctx.xp
        K = self._A[..., :, None, :, None] * self._G[..., None, :, None, :]
        return xp.reshape(K, tuple(K.shape[:-4]) + (n, n))

    def eigh(self, psd: bool = True) -> "KronEigh":
        """Eigendecomposition ``A = Qa diag(la) Qaᵀ``, ``G = Qg diag(lg) Qgᵀ`` (cached).

        Both factors must be symmetric.  With ``psd=True`` (curvature factors)
        round-off negative eigenvalues are clipped to zero and clearly negative
        ones raise; float32 failures are retried in float64.
        """
        psd = check_flag(psd, "psd")
        E = self._eigh.get(psd)
        if E is None:  # built whole, then published (one dict item)
            xp = self._ctx.xp
            check_symmetric(xp, self._A, "A")
            check_symmetric(xp, self._G, "G")
            check_not_subnormal(xp, self._A, "A")
            check_not_subnormal(xp, self._G, "G")
            la, Qa = eigh(xp, self._A, "A", psd=psd)
            lg, Qg = eigh(xp, self._G, "G", psd=psd)
            E = KronEigh._trusted(self._ctx, Qa, la, Qg, lg)
            self._eigh[psd] = E
        return E
