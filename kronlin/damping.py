"""Factored Tikhonov damping of a Kronecker block (K-FAC §6.3, eq. after (6); Botev et al. B.1 eq. 36–38).

Adding ``γ² I`` to ``A ⊗ G`` exactly needs an eigendecomposition; K-FAC instead
damps each factor,

    (A + π γ I) ⊗ (G + (γ/π) I) = A ⊗ G + γ² I ⊗ I + π γ I ⊗ G + (γ/π) A ⊗ I,

and chooses π to minimise the triangle-inequality bound on the residual
``π γ I⊗G + (γ/π) A⊗I`` in a norm ``‖·‖_v``:  ``π = sqrt(‖A ⊗ I_q‖_v / ‖I_p ⊗ G‖_v)``.
With ``A`` (p, p) and ``G`` (q, q):

* ``"trace"`` (K-FAC's recommendation; for PSD factors the trace norm is the
  trace): ``‖A ⊗ I_q‖ = q tr A``, so ``π = sqrt((tr A / p) / (tr G / q))``;
* ``"fro"``: ``‖A ⊗ I_q‖_F = √q ‖A‖_F``, so ``π = sqrt(√q ‖A‖_F / (√p ‖G‖_F))``;
* ``"spectral"``: ``‖A ⊗ I‖_2 = ‖A‖_2``, so ``π = sqrt(‖A‖_2 / ‖G‖_2)``.
"""

from __future__ import annotations

import math

from ._backend import context, matrix_norm, mT, trace
from ._operator import KronShaped, batch_shape_of
from ._validate import (
    check_choice,
    check_finite,
    check_nonempty,
    check_nonneg_scalar,
    check_positive_scalar,
    check_result,
    check_square,
    quiet_overflow,
    shape_str,
)
from .kron import Kron

__all__ = ["pi_factor", "factored_damping", "DampedKron", "NORMS"]

NORMS = ("trace", "fro", "spectral")


def _factor_norms(xp, A, G, norm):
    p, q = A.shape[-1], G.shape[-1]
    if norm == "trace":
        return q * trace(xp, A), p * trace(xp, G), "trace"
    if norm == "fro":
        return (
            math.sqrt(q) * matrix_norm(xp, A, "fro"),
            math.sqrt(p) * matrix_norm(xp, G, "fro"),
            "Frobenius norm",
        )
    if norm == "spectral":
        return matrix_norm(xp, A, 2), matrix_norm(xp, G, 2), "spectral norm"
    raise ValueError(f"norm must be one of {NORMS}; got {norm!r}")  # pragma: no cover - checked by callers


def _pi(ctx, A, G, norm, nameA: str = "A", nameG: str = "G"):
    xp = ctx.xp
    with quiet_overflow():
        nA, nG, what = _factor_norms(xp, A, G, norm)
    for val, name, M in ((nA, nameA, A), (nG, nameG, G)):
        if not bool(xp.all(xp.isfinite(val))):  # else π would come out 0 or inf, silently
            raise FloatingPointError(
                f"the {what} of {name} (shape {shape_str(M)}) overflows {M.dtype}, so π cannot be formed; rescale "
                f"{name} (the solution of a problem scaled by c is the solution divided by c), or pass pi"
            )
        if not bool(xp.all(val > 0)):
            raise ValueError(
                f"{name} (shape {shape_str(M)}) has {what} {float(xp.min(val)):.3g} <= 0, so π is undefined; "
                f"a curvature factor must be positive semi-definite and nonzero"
            )
    pv = xp.sqrt(nA) / xp.sqrt(nG)  # not sqrt(nA / nG): the ratio of two representable norms may overflow
    check_result(xp, pv, f"π = sqrt({what} of {nameA} ⊗ I / {what} of I ⊗ {nameG})",
                 f"the norms of {nameA} and {nameG} are too large or too far apart for the dtype: rescale them (or pass pi)")
    return pv


def pi_value(ctx, A, G, pi, nameA: str = "A", nameG: str = "G"):
    """π of factored damping: ``pi`` a norm name (π from the factors) or a positive number."""
    if isinstance(pi, str):
        check_choice(pi, NORMS, "pi")
        return _pi(ctx, A, G, pi, nameA, nameG)
    return ctx.xp.asarray(check_positive_scalar(pi, "pi"), dtype=ctx.dtype)


def check_damping_terms(xp, gamma: float, pv, dtype, pi_name: str = "pi") -> None:
    """``π·γ`` and ``γ/π`` must be representable in ``dtype`` (refuse ``pi=5e-324``, ``gamma=1e300/π``)."""
    if gamma == 0.0:
        return
    big = float(xp.finfo(dtype).max)
    lo, hi = float(xp.min(pv)), float(xp.max(pv))
    if not (lo > 0 and gamma * hi < big and gamma / lo < big):
        raise ValueError(
            f"factored damping overflows {dtype}: π·γ = {gamma * hi:.3g} and γ/π = {(gamma / lo) if lo > 0 else float('inf'):.3g} "
            f"(gamma={gamma:.3g}, {pi_name} from {lo:.3g} to {hi:.3g}); pass a moderate gamma and a pi near 1"
        )


def _prepare(A, G):
    ctx, (A, G) = context(("A", A), ("G", G))
    check_square(A, "A")
    check_square(G, "G")
    batch_shape_of(A, G)
    check_nonempty(A, "A")
    check_nonempty(G, "G")
    check_finite(ctx.xp, A, "A")
    check_finite(ctx.xp, G, "G")
    return ctx, A, G


def pi_factor(A, G, norm: str = "trace"):
    """The factored-damping split π of K-FAC §6.3: ``sqrt(‖A ⊗ I‖ / ‖I ⊗ G‖)``.

    Parameters
    ----------
    A : (p, p) or (..., p, p) input factor
    G : (q, q) or (..., q, q) output factor
    norm : {"trace", "fro", "spectral"}
        The norm whose residual bound π minimises; ``"trace"`` gives
        ``sqrt((tr A / p) / (tr G / q))``.

    Returns
    -------
    float (unbatched factors) or array of the batch shape.
    """
    check_choice(norm, NORMS, "norm")
    ctx, A, G = _prepare(A, G)
    value = _pi(ctx, A, G, norm)
    return float(value) if value.ndim == 0 else ctx.out(value)  # a parameter (a Python float), not a result


def factored_damping(A, G, gamma: float, pi="trace") -> Kron:
    """``Kron(A + π·γ·I, G + (γ/π)·I)`` (K-FAC §6.3 with γ of §6.6; Botev eq. 36).

    Parameters
    ----------
    A, G : input and output factors (square, optionally batched)
    gamma : float >= 0
        The damping strength γ (K-FAC's ``sqrt(λ + η)`` before §6.6).
    pi : {"trace", "fro", "spectral"} or float > 0
        A norm for :func:`pi_factor`, or π itself.
    """
    gamma = check_nonneg_scalar(gamma, "gamma")
    ctx, A, G = _prepare(A, G)
    xp = ctx.xp
    pv = xp.astype(pi_value(ctx, A, G, pi), ctx.dtype)
    if gamma == 0.0:  # no damping: π plays no part (γ/π would be 0/0 for a π that underflows the dtype)
        pv = xp.ones_like(pv)
    check_damping_terms(xp, gamma, pv, ctx.dtype, "pi")
    pv = pv[..., None, None]
    Ia = xp.eye(A.shape[-1], dtype=ctx.dtype)
    Ig = xp.eye(G.shape[-1], dtype=ctx.dtype)
    return Kron._trusted(ctx, A + (gamma * pv) * Ia, G + (gamma / pv) * Ig)


class DampedKron(KronShaped):
    """A Kronecker curvature block with Tikhonov damping ``λ``, exact or factored, behind one switch.

    ``mode="exact"``: the matrix ``A ⊗ G + λ I`` (K-FAC eq. 6 with the
    ``(λ + η) I`` term; Benzing §3 shows this differs materially from the
    heuristic); solves are exact through the eigenbasis,
    ``KronEigh.solve(X, damping=λ)`` — the fastest correct path (four GEMMs and
    the fused divide once the eigendecomposition is cached).

    ``mode="factored"``: K-FAC §6.3's ``(A + π√λ I) ⊗ (G + (√λ/π) I)`` with
    ``γ = √λ`` and π from ``pi`` (a norm name or a number); solves are two
    Cholesky solves.

    Both modes offer ``solve(X)`` (the damped inverse applied to ``X``),
    ``@`` and ``matmat`` (the damped matrix), ``to_dense()`` (the damped
    matrix) and ``aslinearoperator()`` (the damped *inverse*, for iterative
    solvers that want a preconditioner), so an optimizer compares them by
    changing ``mode`` only.
    """

    MODES = ("exact", "factored")
    _operands = "the factors A and G (or damping)"

    def __init__(self, A, G, damping: float, mode: str = "exact", pi="trace"):
        self.damping = check_nonneg_scalar(damping, "damping")
        self.mode = check_choice(mode, self.MODES, "mode")
        if mode == "exact":
            self.kron = Kron(A, G)
            self._eig = self.kron.eigh()
        else:
            self.kron = factored_damping(A, G, math.sqrt(self.damping), pi=pi)
        self._set_shape(self.kron._ctx, self.kron.p, self.kron.q, self.kron.batch_shape)

    @property
    def T(self) -> "DampedKron":
        """The damped block is symmetric when its factors are; ``T`` is its transpose."""
        new = DampedKron.__new__(DampedKron)
        new.damping, new.mode, new.kron = self.damping, self.mode, self.kron.T
        if self.mode == "exact":
            new._eig = self._eig
        new._set_shape(self._ctx, self.p, self.q, self.batch_shape)
        return new

    def _apply_matrix(self, X):
        Y = self.kron._apply_matrix(X)
        return Y + self.damping * X if self.mode == "exact" else Y

    def _solve_matrix(self, X, trans: bool = False):
        if self.mode == "exact":
            return self._eig._damped_solve(X, self.damping)
        fa, fg = self.kron._factors()
        return mT(fa.solve(mT(fg.solve(X, trans)), trans))

    def solve(self, X):
        """The damped block's inverse applied to ``X`` (..., q, p) or a flat vector."""
        (X,), fmt = self._rhs(X)
        return self._ret([self._solve_matrix(X)], fmt)

    def __matmul__(self, X):
        """The damped matrix applied to ``X``."""
        (X,), fmt = self._rhs(X)
        return self._ret([self._apply_matrix(X)], fmt)

    def to_dense(self, allow_large: bool = False):
        """The dense damped matrix."""
        D = self.kron._dense(allow_large)
        if self.mode == "exact":
            xp = self._ctx.xp
            D = D + self.damping * xp.eye(self.p * self.q, dtype=self.dtype)
        return self._out(D)

    def aslinearoperator(self):
        """The damped *inverse* as a ``LinearOperator`` on flat column-stacked vectors."""
        from .linop import make_linear_operator

        return make_linear_operator(
            self, lambda Xs: [self._solve_matrix(Xs[0])], lambda Xs: [self._solve_matrix(Xs[0], True)]
        )
