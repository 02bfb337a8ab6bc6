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
from ._validate import check_finite, check_nonneg_scalar, check_square, shape_str
from .kron import Kron, _batch_shape

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
    raise ValueError(f"norm must be one of {NORMS}; got {norm!r}")


def _pi(ctx, A, G, norm):
    xp = ctx.xp
    nA, nG, what = _factor_norms(xp, A, G, norm)
    for val, name, M in ((nA, "A", A), (nG, "G", G)):
        if not bool(xp.all(val > 0)):
            raise ValueError(
                f"{name} (shape {shape_str(M)}) has {what} {float(xp.min(val)):.3g} <= 0, so π is undefined; "
                f"a curvature factor must be positive semi-definite and nonzero"
            )
    return xp.sqrt(nA / nG)


def _prepare(A, G):
    ctx, (A, G) = context(("A", A), ("G", G))
    check_square(A, "A")
    check_square(G, "G")
    _batch_shape(A, G)
    check_finite(ctx.xp, A, "A")
    check_finite(ctx.xp, G, "G")
    return ctx, A, G


def _as_result(ctx, value):
    return float(value) if value.ndim == 0 else ctx.out(value)


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
    ctx, A, G = _prepare(A, G)
    return _as_result(ctx, _pi(ctx, A, G, norm))


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
    if isinstance(pi, str):
        pv = _pi(ctx, A, G, pi)
    else:
        pv = check_nonneg_scalar(pi, "pi")
        if pv == 0:
            raise ValueError("pi must be positive; got 0")
        pv = xp.asarray(pv, dtype=ctx.dtype)
    pv = xp.astype(pv, ctx.dtype)[..., None, None]
    Ia = xp.eye(A.shape[-1], dtype=ctx.dtype)
    Ig = xp.eye(G.shape[-1], dtype=ctx.dtype)
    return Kron._trusted(ctx, A + (gamma * pv) * Ia, G + (gamma / pv) * Ig)


class DampedKron:
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
    ``@`` (the damped matrix), ``to_dense()`` and ``aslinearoperator()``
    (the inverse), so an optimizer compares them by changing ``mode`` only.
    """

    MODES = ("exact", "factored")

    def __init__(self, A, G, damping: float, mode: str = "exact", pi="trace"):
        self.damping = check_nonneg_scalar(damping, "damping")
        if mode not in self.MODES:
            raise ValueError(f"mode must be one of {self.MODES}; got {mode!r}")
        self.mode = mode
        if mode == "exact":
            self.kron = Kron(A, G)
            self._eig = self.kron.eigh()
        else:
            self.kron = factored_damping(A, G, math.sqrt(self.damping), pi=pi)

    @property
    def p(self) -> int:
        return self.kron.p

    @property
    def q(self) -> int:
        return self.kron.q

    def solve(self, X):
        """The damped block's inverse applied to ``X`` (..., q, p) or a flat vector."""
        if self.mode == "exact":
            return self._eig.solve(X, damping=self.damping)
        return self.kron.solve(X)

    def __matmul__(self, X):
        if self.mode == "exact":
            return self.kron @ X + self.damping * self.kron._ctx.asarray(X, "X")
        return self.kron @ X

    def to_dense(self, allow_large: bool = False):
        """The dense damped matrix."""
        D = self.kron.to_dense(allow_large=allow_large)
        if self.mode == "exact":
            xp = self.kron._ctx.xp
            D = D + self.damping * xp.eye(self.p * self.q, dtype=self.kron.dtype)
        return D

    def aslinearoperator(self):
        """The damped inverse as a ``LinearOperator`` on flat column-stacked vectors."""
        if self.mode == "exact":
            return self._eig.aslinearoperator(power=-1.0, damping=self.damping)
        from .linop import make_linear_operator

        fa, fg = self.kron._factors()
        fn = lambda X: mT(fa.solve(mT(fg.solve(X))))  # noqa: E731
        return make_linear_operator(self.kron, fn, lambda X: mT(fa.solve(mT(fg.solve(X, True)), True)))
