"""``method="eig"``: K-FAC appendix B's formula for ``(A ⊗ B ± C ⊗ D)⁻¹`` via generalized eigenproblems.

For symmetric positive definite ``A``, ``B`` and symmetric ``C``, ``D`` solve the
two symmetric-definite generalized eigenproblems

    C K1 = A K1 diag(s1),  K1ᵀ A K1 = I        D K2 = B K2 diag(s2),  K2ᵀ B K2 = I

(Cholesky-based, so no matrix square roots appear; K1 equals appendix B's
``A^{-1/2} E1`` up to an orthogonal change of basis).  Then
``A ⊗ B ± C ⊗ D = (K1 ⊗ K2)^{-T} (I ⊗ I ± S1 ⊗ S2) (K1 ⊗ K2)^{-1}`` and

    (A ⊗ B ± C ⊗ D)⁻¹ vec(V) = vec(K2 [(K2ᵀ V K1) ⊘ (1 1ᵀ ± s2 s1ᵀ)] K1ᵀ),

four GEMMs and one fused divide (the eigenbasis kernel of
:mod:`kronlin._kernels.eig_scale`, with ``lg = ±s2``, ``la = s1``, shift 1).

Whitening: with ``sign=+1`` and all four factors positive definite the pairs
``(A, B)`` and ``(C, D)`` are interchangeable, and the better-conditioned pair
is used to whiten (whitening by an ill-conditioned pair loses digits in
``K1``, ``K2``).  When the whitening factors are scalar multiples of the
identity (``ξ I ⊗ I ± C ⊗ D``, appendix B's special case, which includes exact
Tikhonov damping ``Ā ⊗ G + λ I ⊗ I``), plain eigendecompositions are used.

Precision: float32 problems are set up and solved in float64 (like
``method="schur"``) and rounded back: the formula's error grows with the
condition of the whitening factors, not only with that of ``A ⊗ B ± C ⊗ D``,
and float32 eigenvectors lost up to 8.7e-3 on problems whose operator
condition was below 1e4.  When the whitening pair is ill-conditioned
(``cond(A)·cond(B)·eps > REFINE_AT``) each solve adds iterative refinement
with the residual of the original equation computed in float64, which brings
the error down to the operator's own ``cond·eps``.

Singularity follows kronlin's one policy (:data:`kronlin._validate.SINGULAR_RTOL_FACTOR`)
with the reciprocal-condition estimate ``min |1 ± s2_i s1_j| / (1 + |s2_i s1_j|)``:
the cancellation between the two Kronecker terms at a pair of generalized
eigenvalues (the same quantity as the Schur method's 1×1 pivots).
"""

from __future__ import annotations

from .._backend import ModuleRefs, dtype_eps, mT
from .._kernels.eig_scale import eig_scale
from .._linalg import Factor, eigh, generalized_eigh
from .._validate import LinAlgError, check_nonsingular

#: Iterative refinement is added to each solve when ``cond(A)·cond(B)·eps``
#: of the whitening pair (in the compute precision) exceeds this: below it the
#: formula's own error is already at the float64 round-off of the answer.
REFINE_AT = 1e-10
#: At most this many refinement steps (one usually suffices; each costs a solve
#: and the four GEMMs of the residual).
REFINE_STEPS = 3

__all__ = ["EigStein", "NotPositiveDefinite", "scalar_identity"]


class NotPositiveDefinite(LinAlgError):
    """``A``, ``B`` or the sum ``A⊗B − C⊗D`` is not positive definite, so ``method="eig"`` does not apply
    (``method="auto"`` then uses ``"schur"``; singularity is reported, not caught)."""


def scalar_identity(xp, M):
    """Return α when ``M == α I`` exactly (α > 0), else None."""
    n = M.shape[-1]
    d = M[..., 0, 0] if n else None
    if n == 0 or not bool(xp.all(M == d * xp.eye(n, dtype=M.dtype))):
        return None
    alpha = float(d)
    return alpha if alpha > 0 else None


def _spd_factor(xp, M, name):
    """Cholesky factor of M, or None when M is not (numerically) positive definite."""
    try:
        f = Factor(xp, M, name)
    except LinAlgError:
        return None
    return f if f.kind == "cholesky" else None


class EigStein(ModuleRefs):
    """Set-up of appendix B's formula; ``solve(V)`` is four GEMMs and a fused divide.

    Parameters are validated by the caller (:class:`kronlin.KronSumInverse`):
    same namespace and dtype, ``A``, ``C`` (p, p), ``B``, ``D`` (q, q), all
    symmetric to round-off.

    Attributes
    ----------
    K1, s1, K2, s2 : the generalized eigenbases and eigenvalues
    sign : +1 or -1
    factors : optional (Factor, Factor) of A and B already computed by the caller (reused, not recomputed)

    whitened_by : "AB" or "CD", the pair the formula whitened by
    plain_eigh : bool, True when both whitening factors were scalar identities
    """

    def __init__(self, xp, A, B, C, D, sign: int, factors=None):
        self.xp, self.sign = xp, sign
        self.dtype = A.dtype
        self._eps_in = dtype_eps(xp, A.dtype)  # the data's precision: the singularity verdict uses it
        if A.dtype == xp.float32:  # float32: set up and solve in float64 (module docstring)
            A, B, C, D = (xp.astype(M, xp.float64) for M in (A, B, C, D))
            factors = None
        self._orig = (A, B, C, D)
        if factors is not None:  # Cholesky factors of A and B the caller already holds
            fA, fB = (f if f.kind == "cholesky" else None for f in factors)
        else:
            fA, fB = _spd_factor(xp, A, "A"), _spd_factor(xp, B, "B")
        for f, name, M in ((fA, "A", A), (fB, "B", B)):
            if f is None:
                raise NotPositiveDefinite(
                    f"method='eig' needs {name} (shape ({M.shape[-1]}, {M.shape[-1]})) symmetric positive definite; "
                    f"add damping to {name} or use method='schur'"
                )
        self.whitened_by = "AB"
        if sign > 0:
            fC, fD = _spd_factor(xp, C, "C"), _spd_factor(xp, D, "D")
            if fC is not None and fD is not None:
                # Swap when (C, D) is better conditioned: B U Aᵀ + D U Cᵀ is symmetric in the two pairs.
                if fC.cond_estimate() * fD.cond_estimate() < fA.cond_estimate() * fB.cond_estimate():
                    A, B, C, D, fA, fB = C, D, A, B, fC, fD
                    self.whitened_by = "CD"
        self.whiten_cond = fA.cond_estimate() * fB.cond_estimate()
        self.refine = self.whiten_cond * dtype_eps(xp, A.dtype) > REFINE_AT
        self.plain_eigh = scalar_identity(xp, A) is not None and scalar_identity(xp, B) is not None
        names = ("A", "B", "C", "D") if self.whitened_by == "AB" else ("C", "D", "A", "B")
        self.K1, self.s1 = self._pair(C, A, fA, names[2], names[0])
        self.K2, self.s2 = self._pair(D, B, fB, names[3], names[1])
        self._check_denominators()
        # log det of the whitening pair's Kronecker product, for logdet()
        p, q = int(A.shape[-1]), int(B.shape[-1])
        self._base_logdet = q * float(fA.slogdet()[1]) + p * float(fB.slogdet()[1])

    def _pair(self, C, A, fA, nameC, nameA):
        """``(K, s)`` of ``C x = s A x``; plain ``eigh`` when ``A = α I``."""
        xp = self.xp
        alpha = scalar_identity(xp, A)
        if alpha is not None:
            s, E = eigh(xp, C, nameC, psd=False)
            return E / alpha**0.5, s / alpha
        s, K = generalized_eigh(xp, C, A, nameC, nameA, factor=fA)
        return K, s

    def _check_denominators(self):
        """Raise when ``1 ± s2_i s1_j`` vanishes (singular) or, for ``sign=-1``, is not positive.

        ``1 + σ s2_i s1_j`` is monotone in ``s1_j`` for fixed ``i``, so its
        smallest magnitude sits next to the root ``s1 = -1/(σ s2_i)``: a
        ``searchsorted`` on the (ascending) ``s1`` finds it without forming the
        ``q × p`` array.
        """
        xp, s1, s2, sig = self.xp, self.s1, self.s2, float(self.sign)
        p, q = s1.shape[-1], s2.shape[-1]
        if p == 0 or q == 0:
            return
        ext1 = xp.stack([s1[0], s1[-1]])
        ext2 = xp.stack([s2[0], s2[-1]])
        corners = 1.0 + sig * ext2[:, None] * ext1[None, :]
        if sig < 0 and bool(xp.any(corners <= 0)):
            worst = float(xp.min(corners))
            raise NotPositiveDefinite(
                f"A ⊗ B - C ⊗ D is not positive definite (min of 1 - s2·s1 is {worst:.3g}): the statistics are "
                f"inconsistent, e.g. stale cross-layer factors; add damping to A and B"
            )
        safe = xp.where(s2 == 0, xp.ones_like(s2), s2)
        roots = -1.0 / (sig * safe)
        idx = xp.searchsorted(s1, roots)
        lo = xp.where(idx < 1, 0, idx - 1)
        hi = xp.where(idx > p - 1, p - 1, idx)
        cand = xp.stack([xp.take(s1, lo), xp.take(s1, hi)])
        # |1 + σ s2 s1| / (1 + |s2 s1|) is smallest next to the root s1 = -1/(σ s2) on each row
        prod = s2[None, :] * cand
        rcond = float(xp.min(xp.abs(1.0 + sig * prod) / (1.0 + xp.abs(prod))))
        self.rcond = rcond
        check_nonsingular(
            rcond, self._eps_in,
            f"A ⊗ B {'+' if sig > 0 else '-'} C ⊗ D (a product of generalized eigenvalues s2_i·s1_j equals "
            f"{'-' if sig > 0 else '+'}1 to within rounding)",
            "add damping to A and B",
        )

    def logdet(self) -> float:
        """``log det(A ⊗ B ± C ⊗ D) = log det(A ⊗ B) + Σ_ij log(1 ± s2_i s1_j)``; raises unless positive definite."""
        xp = self.xp
        d = 1.0 + float(self.sign) * self.s2[:, None] * self.s1[None, :]
        if bool(xp.any(d <= 0)):
            raise LinAlgError("A ⊗ B ± C ⊗ D is not positive definite, so log det is undefined")
        return self._base_logdet + float(xp.sum(xp.log(d)))

    def solve(self, V):
        """``U`` with ``B U Aᵀ + sign·D U Cᵀ = V`` for ``V`` of shape ``(..., q, p)``."""
        xp = self.xp
        V0 = V
        if V.dtype != self.K1.dtype:
            V = xp.astype(V, self.K1.dtype)
        U = self._solve(V)
        if self.refine and V.size:
            A, B, C, D = self._orig
            for _ in range(REFINE_STEPS):
                R = V - (B @ U @ mT(A) + float(self.sign) * (D @ U @ mT(C)))
                dU = self._solve(R)
                U = U + dU
                if not float(xp.max(xp.abs(dU))) > 2 * dtype_eps(xp, U.dtype) * float(xp.max(xp.abs(U))):
                    break
        return U if U.dtype == V0.dtype else xp.astype(U, V0.dtype)

    def _solve(self, V):
        xp = self.xp
        Y = mT(self.K2) @ V @ self.K1
        Y = eig_scale(xp, Y, float(self.sign) * self.s2, self.s1, 1.0, -1.0)
        return self.K2 @ Y @ mT(self.K1)
