"""``method="smith"``: Smith's fixed-point iteration and its squared (doubling) form (K-FAC appendix B, §8).

With ``M = B⁻¹ D``, ``N = A⁻¹ C`` and ``Q = B⁻¹ V A⁻ᵀ`` the equation
``B U Aᵀ + σ D U Cᵀ = V`` is the fixed point ``U = Q − σ M U Nᵀ``, whose series
``U = Σ_k (−σ M)^k Q (Nᵀ)^k`` converges iff ``ρ(M) ρ(N) < 1``.

* plain Smith: ``U ← Q − σ M U Nᵀ``, one term per iteration;
* squared Smith: ``U_{j+1} = U_j + M_j U_j N_jᵀ`` with ``M_{j+1} = M_j²``,
  ``N_{j+1} = N_j²`` (``M_0 = −σM``, ``N_0 = N``, ``U_0 = Q``) sums ``2^j``
  terms after ``j`` steps, so about ``log₂`` of plain Smith's count.

Balancing: only the product ``M U Nᵀ`` matters, so ``(M, N)`` and
``(αM, N/α)`` define the same iteration; each pair of powers is rescaled to
equal norms.  Without it a contractive problem with unbalanced radii
(``ρ(M) = 4.5``, ``ρ(N) = 0.2``) overflows ``M^(2^j)`` before the product
shrinks, and was refused as divergent.

The squarings double as the spectral-radius estimate: ``(‖M^k‖ ‖N^k‖)^{1/k}``
bounds ``ρ(M)ρ(N)`` from above and converges to it, and the set-up raises when
the powers stop shrinking.  Set-up forms ``A⁻¹``, ``B⁻¹`` and the squares once;
every ``solve`` is then GEMMs only (the GPU-friendly method).
"""

from __future__ import annotations

import math

from .._backend import ModuleRefs, dtype_eps, matrix_norm, mT
from .._linalg import Factor
from .._validate import LinAlgError, check_flag, check_positive_int, check_positive_scalar

__all__ = ["SmithStein"]

#: Squarings before giving up: 2**60 plain iterations is beyond any contraction
#: worth iterating on; with ρ(M)ρ(N) ≥ 1 the powers grow or stall long before.
MAX_SQUARINGS = 60


#: Once ‖M^k‖‖N^k‖ exceeds this the iteration is diverging (had any earlier
#: product been below 1, ρ(M)ρ(N) < 1 and the powers would be shrinking).
_GROWTH_LIMIT = 1e30


def _maxabs(xp, X) -> float:
    return float(xp.max(xp.abs(X))) if X.size else 0.0


def _norm(xp, M) -> float:
    return float(matrix_norm(xp, M, "fro"))


def _balance(Mj, Nj, nM: float, nN: float):
    """``(αMj, Nj/α)`` with equal Frobenius norms (the product ``Mj U Njᵀ`` is unchanged)."""
    if nM > 0 and nN > 0:
        alpha = math.sqrt(nN / nM)
        if alpha != 1.0:
            return Mj * alpha, Nj / alpha
    return Mj, Nj


class SmithStein(ModuleRefs):
    """Set-up and solves of the (squared) Smith iteration.

    Parameters
    ----------
    xp, A, B, C, D, sign : validated inputs (see :class:`kronlin.KronSumInverse`)
    tol : float, optional
        Relative-change stopping tolerance ``‖ΔU‖ ≤ tol ‖U‖`` (default ``4·eps`` of the dtype).
    max_iter : int, optional
        Cap on iterations (plain) or squarings (squared); default 100000 / 60.
    squared : bool
        Use the doubling form (default) or plain Smith.

    Attributes
    ----------
    rho_estimate : float
        Upper estimate of ``ρ(M) ρ(N)`` from the powers computed at set-up.
    squarings : int
        Squarings done at set-up (the squared form applies at most ``squarings + 1`` steps).
    iterations : int
        Steps taken by the last ``solve`` (squarings for the squared form).
    """

    def __init__(self, xp, A, B, C, D, sign: int, tol=None, max_iter=None, squared: bool = True):
        self.xp, self.sign, self.squared = xp, sign, check_flag(squared, "squared")
        eps = dtype_eps(xp, A.dtype)
        self.tol = 4 * eps if tol is None else check_positive_scalar(tol, "tol")
        if self.tol >= 1:  # a relative change of 100% or more "converges" at once: a wrong answer, not a solve
            raise ValueError(f"tol is a relative stopping tolerance and must be < 1 (default 4·eps); got {tol!r}")
        default = MAX_SQUARINGS if squared else 100_000
        self.max_iter = default if max_iter is None else check_positive_int(max_iter, "max_iter")
        self._Ainv = Factor(xp, A, "A", judge_by_inverse=True).inv()
        self._Binv = Factor(xp, B, "B", judge_by_inverse=True).inv()
        M = self._Binv @ D
        N = self._Ainv @ C
        self.M, self.N = M, N
        # Powers M^(2^j), N^(2^j) (sign folded into M) until their product is negligible.
        limit = self.max_iter if squared else MAX_SQUARINGS
        Mj, Nj = (-float(sign)) * M, N
        self._powers = []
        est, converged = math.inf, False
        for j in range(limit + 1):
            nM, nN = _norm(xp, Mj), _norm(xp, Nj)
            if not (math.isfinite(nM) and math.isfinite(nN)):
                raise ValueError(
                    "the Smith iteration's matrices B⁻¹D and A⁻¹C overflow: D, C are too large relative to B, A "
                    "(rescale the equation) — or use method='schur'"
                )
            Mj, Nj = _balance(Mj, Nj, nM, nN)
            prod = nM * nN
            est = min(est, prod ** (1.0 / 2**j))
            if prod > _GROWTH_LIMIT:  # growing powers: ρ(M)ρ(N) ≥ 1; stop before overflow
                break
            if squared:
                self._powers.append((Mj, Nj))
            if prod <= self.tol * 1e-3:
                converged = True
                break
            if j == limit:
                break
            Mj, Nj = Mj @ Mj, Nj @ Nj
        self.rho_estimate = est
        self.squarings = j
        if not converged and (prod > _GROWTH_LIMIT or limit == MAX_SQUARINGS or not squared):
            raise LinAlgError(
                f"the Smith iteration diverges: ρ(B⁻¹D)·ρ(A⁻¹C) is estimated at {est:.6g} ≥ 1 (it must be < 1); "
                f"use method='eig' or method='schur'"
            )
        if not converged:
            raise LinAlgError(
                f"squared Smith did not converge within max_iter={self.max_iter} squarings "
                f"(ρ(B⁻¹D)·ρ(A⁻¹C) ≤ {est:.6g}); raise max_iter"
            )
        self.iterations = 0

    def solve(self, V):
        """``U`` with ``B U Aᵀ + sign·D U Cᵀ = V`` for ``V`` of shape ``(..., q, p)``."""
        xp = self.xp
        U = self._Binv @ V @ mT(self._Ainv)
        if self.squared:
            for j, (Mj, Nj) in enumerate(self._powers):
                dU = Mj @ U @ mT(Nj)
                U = U + dU
                if _maxabs(xp, dU) <= self.tol * _maxabs(xp, U):
                    self.iterations = j + 1
                    return U
            self.iterations = len(self._powers)
            return U
        Q, Mneg = U, (-float(self.sign)) * self.M
        for k in range(self.max_iter):
            Unew = Q + Mneg @ U @ mT(self.N)
            if _maxabs(xp, Unew - U) <= self.tol * _maxabs(xp, Unew):
                self.iterations = k + 1
                return Unew
            U = Unew
        raise LinAlgError(
            f"plain Smith did not reach tol={self.tol:.3g} in max_iter={self.max_iter} iterations "
            f"(ρ estimate {self.rho_estimate:.6g}); use squared=True"
        )
