"""Inverses of sums of two Kronecker products: the generalized Stein equation (K-FAC appendix B).

``(A ⊗ B + sign·C ⊗ D) vec(U) = vec(V)``  ⇔  ``B U Aᵀ + sign·D U Cᵀ = V``
with ``A``, ``C`` of shape (p, p), ``B``, ``D`` of shape (q, q) and ``U``, ``V``
of shape (..., q, p) (docs/design.md §1).  K-FAC needs it for exact Tikhonov damping of
a Kronecker block (``Ā ⊗ G + λ I ⊗ I``, eq. 6) and for the conditional
covariances ``Σ_{i|i+1}`` of the block-tridiagonal inverse (a difference, §4.3).

Methods
-------
``"eig"``
    Symmetric positive definite ``A``, ``B``; symmetric ``C``, ``D``.  Appendix
    B's formula from two generalized eigendecompositions; each solve is four
    GEMMs and a fused divide (:mod:`kronlin.stein.eig`).
``"schur"``
    Any real square factors: QZ reductions and a quasi-triangular
    back-substitution (Gardiner, Laub, Amato & Moler 1992;
    :mod:`kronlin.stein.schur`).  The method for non-normal factors.
``"smith"``
    Smith's fixed-point iteration, squared (doubling) by default, for
    contractive problems ``ρ(B⁻¹D)·ρ(A⁻¹C) < 1``; GEMMs only
    (:mod:`kronlin.stein.smith`).
``"auto"``
    ``"eig"`` when all four factors are symmetric and ``A``, ``B`` positive
    definite, otherwise ``"schur"``.
"""

from __future__ import annotations

from .._backend import context, mT
from .._operator import KronShaped
from .._validate import (
    check_choice,
    check_finite_measured,
    check_nonempty,
    check_overflow,
    check_sign,
    check_square,
    check_symmetric,
    shape_str,
    symmetric_within_tol,
)
from .eig import EigStein, NotPositiveDefinite
from .schur import SchurStein
from .smith import SmithStein

__all__ = ["KronSumInverse", "solve_kron_sum", "METHODS"]

METHODS = ("auto", "eig", "schur", "smith")


class KronSumInverse(KronShaped):
    """``(A ⊗ B + sign·C ⊗ D)⁻¹`` with the set-up done once; ``solve(V)`` many times.

    Parameters
    ----------
    A, C : (p, p) arrays
        Input-side factors.
    B, D : (q, q) arrays
        Output-side factors.
    sign : {+1, -1}
        ``+1`` for a sum, ``-1`` for a difference of Kronecker products.
    method : {"auto", "eig", "schur", "smith"}
        See the module docstring.
    tol, max_iter, squared :
        Options of ``method="smith"`` (see :class:`kronlin.stein.smith.SmithStein`).

    Attributes
    ----------
    method : str
        The method in use (``"auto"`` resolved).
    solver : object
        The method's set-up (``EigStein``, ``SchurStein`` or ``SmithStein``),
        with its diagnostics (for example ``solver.iterations`` for Smith).

    Examples
    --------
    Exact Tikhonov damping of a Kronecker block, ``(Ā ⊗ G + λ I ⊗ I)⁻¹``:

    >>> import numpy as np, kronlin
    >>> A, G, lam = np.diag([1.0, 2.0]), np.diag([3.0, 4.0, 5.0]), 0.1
    >>> inv = kronlin.KronSumInverse(A, G, np.eye(2), lam * np.eye(3))
    >>> U = inv.solve(np.ones((3, 2)))
    >>> np.allclose(G @ U @ A.T + lam * U, 1.0)
    True
    """

    _measured = dict.fromkeys("ABCD")  # operators pickled before the constructor measured A, B, C, D measure later

    def __init__(self, A, B, C, D, sign=+1, method="auto", *, tol=None, max_iter=None, squared=True,
                 _factors=None):
        ctx, (A, B, C, D) = context(("A", A), ("B", B), ("C", C), ("D", D), snapshot=True)
        xp = ctx.xp
        p = check_square(A, "A", batch=False)
        q = check_square(B, "B", batch=False)
        for M, name, n, like in ((C, "C", p, "A"), (D, "D", q, "B")):
            if tuple(M.shape) != (n, n):
                raise ValueError(f"{name} must have the shape of {like}, ({n}, {n}); got {shape_str(M)}")
        check_nonempty(A, "A")
        check_nonempty(B, "B")
        # one pass per matrix on NumPy: finiteness, symmetry and max|M| (the overflow check's) measured together
        measured = {name: check_finite_measured(xp, M, name) for M, name in ((A, "A"), (B, "B"), (C, "C"), (D, "D"))}
        big = float(xp.finfo(A.dtype).max)

        def max_abs(M, name):
            return float(xp.max(xp.abs(M))) if measured[name] is None else measured[name][1]

        for X, Y, nx, ny in ((A, B, "A", "B"), (C, D, "C", "D")):
            mx, my = max_abs(X, nx), max_abs(Y, ny)
            check_overflow(mx * my * max(p, q), big, f"{nx} ⊗ {ny} (max|{nx}|·max|{ny}|·max(p, q))",
                           f"rescale {nx} and {ny} (divide V by the same factor and the solution is unchanged)")
        sign = check_sign(sign)
        check_choice(method, METHODS, "method")
        self._set_shape(ctx, p, q)
        self.sign = sign
        self._args = (A, B, C, D)
        self._measured = measured
        self._opts = dict(tol=tol, max_iter=max_iter, squared=squared)
        self._factors = _factors  # internal: cached Factors of A and B from a caller (BlockTridiagInverse)
        if method != "smith" and any(v is not None for v in (tol, max_iter)):
            raise ValueError("tol and max_iter apply to method='smith' only")
        if method == "auto":
            method = "schur"
            if all(symmetric_within_tol(xp, M, measured[name]) for M, name in zip((A, B, C, D), "ABCD")):
                try:
                    self.solver = EigStein(xp, A, B, C, D, sign, self._factors)
                    method = "eig"
                except NotPositiveDefinite:
                    # "eig" needs positive definite A, B and sum; an indefinite (sign=-1) or otherwise
                    # non-SPD problem may be well-posed all the same: "schur" solves it or reports it singular
                    pass
        if method != "eig" or not hasattr(self, "solver"):
            self.solver = self._build(method, A, B, C, D)
        self.method = method
        self._T = None

    def _build(self, method, A, B, C, D):
        xp, sign = self._ctx.xp, self.sign
        if method == "eig":
            for M, name in zip((A, B, C, D), "ABCD"):
                check_symmetric(xp, M, name, self._measured[name])
            return EigStein(xp, A, B, C, D, sign, getattr(self, "_factors", None))
        if method == "schur":
            return SchurStein(xp, A, B, C, D, sign)
        return SmithStein(xp, A, B, C, D, sign, **self._opts)

    def __repr__(self) -> str:
        op = "+" if self.sign > 0 else "-"
        return f"KronSumInverse(p={self.p}, q={self.q}, (A⊗B {op} C⊗D)⁻¹, method={self.method!r}, backend={self._ctx.name})"

    def _apply_matrix(self, V):
        return self.solver.solve(V)

    def solve(self, V):
        """``U`` with ``B U Aᵀ + sign·D U Cᵀ = V``; ``V`` is (..., q, p) or a flat column-stacked vector."""
        (V,), fmt = self._rhs(V, "V")
        return self._ret([self.solver.solve(V)], fmt)

    __matmul__ = solve

    def logdet(self):
        """``log det(A ⊗ B + sign·C ⊗ D)`` (of the operator, not its inverse); ``method="eig"`` only."""
        if self.method != "eig":
            raise NotImplementedError("logdet() is available for method='eig' (symmetric positive definite sums)")
        return self._scalar(self.solver.logdet())

    @property
    def T(self) -> "KronSumInverse":
        """The transpose ``(Aᵀ ⊗ Bᵀ + sign·Cᵀ ⊗ Dᵀ)⁻¹`` (itself for symmetric factors)."""
        if self.method == "eig":
            return self
        if self._T is None:
            A, B, C, D = (mT(M) for M in self._args)
            T = KronSumInverse.__new__(KronSumInverse)
            T._set_shape(self._ctx, self.p, self.q)
            T.sign, T._factors = self.sign, None
            T._args, T._opts, T.method, T._T = (A, B, C, D), self._opts, self.method, self
            T._measured = self._measured  # a transpose measures alike
            T.solver = T._build(self.method, A, B, C, D)
            self._T = T  # published whole
        return self._T

    def operator_matmul(self, U):
        """The forward operator: ``B U Aᵀ + sign·D U Cᵀ`` (to check residuals)."""
        (U,), fmt = self._rhs(U, "U")
        A, B, C, D = self._args
        return self._ret([B @ U @ mT(A) + self.sign * (D @ U @ mT(C))], fmt)


def solve_kron_sum(A, B, C, D, V, sign=+1, method="auto", **options):
    """``U`` with ``B U Aᵀ + sign·D U Cᵀ = V``, i.e. ``(A ⊗ B + sign·C ⊗ D)⁻¹ vec(V)``.

    One-shot form of :class:`KronSumInverse` (see it for the parameters);
    build the class instead when solving with the same factors repeatedly.
    """
    return KronSumInverse(A, B, C, D, sign=sign, method=method, **options).solve(V)
