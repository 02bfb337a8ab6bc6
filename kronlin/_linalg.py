"""Factorizations behind the backend layer: cached Cholesky/LU solves and a safe ``eigh``.

The array API standard has ``cholesky``, ``solve`` and ``eigh`` but no
triangular or LU solves, so those come from SciPy (NumPy arrays) or
``cupyx.scipy`` (CuPy arrays); any other namespace uses the standard's
general ``solve``, which is correct but does not reuse a factorization.
"""

from __future__ import annotations

import warnings


import numpy as np

from ._backend import ModuleRefs, dtype_eps, is_cupy, is_numpy, mT
from ._validate import LinAlgError, _symmetric_within_tol, shape_str, singular_tol

__all__ = ["Factor", "eigh", "generalized_eigh", "PSD_CLIP_FACTOR"]

#: Eigenvalues of a matrix that must be positive semi-definite may come out of
#: ``eigh`` slightly negative through round-off (backward error ~ n·eps·‖M‖).
#: Values in ``[-PSD_CLIP_FACTOR · n · eps · max|λ|, 0)`` are set to zero;
#: anything more negative means the matrix is not PSD and raises.
PSD_CLIP_FACTOR = 1.0


def _scipy_linalg(xp):
    if is_numpy(xp):
        import scipy.linalg

        return scipy.linalg
    if is_cupy(xp):
        import cupyx.scipy.linalg

        return cupyx.scipy.linalg
    return None


def _solve(xp, M, B):
    """``xp.linalg.solve(M, B)`` with the batch dimensions broadcast (CuPy's ``solve`` does not broadcast)."""
    batch = tuple(np.broadcast_shapes(tuple(M.shape[:-2]), tuple(B.shape[:-2])))
    if tuple(M.shape[:-2]) != batch:
        M = xp.broadcast_to(M, batch + tuple(M.shape[-2:]))
    if tuple(B.shape[:-2]) != batch:
        B = xp.broadcast_to(B, batch + tuple(B.shape[-2:]))
    return xp.linalg.solve(M, B)


def _diag(xp, M):
    return xp.linalg.diagonal(M) if hasattr(xp.linalg, "diagonal") else xp.diagonal(M, axis1=-2, axis2=-1)


class Factor(ModuleRefs):
    """A cached factorization of a square matrix or a stack of them.

    Cholesky when the matrix is symmetric (to round-off) and positive
    definite, LU otherwise.  ``solve(B)`` returns ``M⁻¹ B`` (``trans=True``:
    ``M⁻ᵀ B``) for ``B`` of shape ``(..., n, k)``; ``slogdet()`` returns
    ``(sign, log|det M|)``.
    """

    def __init__(self, xp, M, name: str):
        self.xp, self.name, self.n = xp, name, int(M.shape[-1])
        # the constructor builds everything before the caller publishes the object (thread safety)
        self.batched = M.ndim > 2
        self._M = M
        self._sl = _scipy_linalg(xp)
        self.kind = "lu"
        if _symmetric_within_tol(xp, M):
            try:
                L = xp.linalg.cholesky(M)
            except LinAlgError:
                L = None
            if L is not None and bool(xp.all(xp.isfinite(L))):
                d = _diag(xp, L) ** 2  # the pivots of the Cholesky factorization
                if bool(xp.any(xp.min(d, axis=-1) <= singular_tol(dtype_eps(xp, M.dtype)) * xp.max(d, axis=-1))):
                    raise LinAlgError(
                        f"{name} (shape {shape_str(M)}) is positive semi-definite but singular to working "
                        f"precision; add damping to make it invertible"
                    )
                self.kind, self._L = "cholesky", L
        if self.kind == "lu" and self._sl is not None and (is_numpy(xp) or not self.batched):
            with warnings.catch_warnings():
                # an exactly zero pivot is reported below, with the argument's name
                warnings.simplefilter("ignore")
                lu, piv = self._sl.lu_factor(M, check_finite=False)
            u = xp.abs(_diag(xp, lu))
            # a pivot at or below eps·max|pivot| is singular to working precision (the one policy, _validate.singular_tol)
            if not bool(xp.all(xp.isfinite(lu))) or bool(
                xp.any(xp.min(u, axis=-1) <= singular_tol(dtype_eps(xp, M.dtype)) * xp.max(u, axis=-1))
            ):
                raise LinAlgError(
                    f"{name} (shape {shape_str(M)}) is singular to working precision; "
                    f"add damping to make it invertible"
                )
            self._lu = (lu, piv)
        elif self.kind == "lu":
            self._lu = None  # generic namespace: xp.linalg.solve each time

    # -- solves -------------------------------------------------------------
    def _fold(self, B):
        """(..., n, k) -> (n, prod(...) * k) so an unbatched factor does one call."""
        xp = self.xp
        lead = tuple(B.shape[:-2])
        k = B.shape[-1]
        perm = (B.ndim - 2,) + tuple(range(B.ndim - 2)) + (B.ndim - 1,)
        return xp.reshape(xp.permute_dims(B, perm), (self.n, -1)), lead, k

    def _unfold(self, Y, lead, k):
        xp = self.xp
        Y = xp.reshape(Y, (self.n,) + lead + (k,))
        nd = Y.ndim
        perm = tuple(range(1, nd - 1)) + (0, nd - 1)
        return xp.permute_dims(Y, perm)

    def solve(self, B, trans: bool = False):
        xp = self.xp
        if not self.batched and B.ndim > 2:
            Bf, lead, k = self._fold(B)
            return self._unfold(self._solve2(Bf, trans), lead, k)
        if self.batched:
            shape = tuple(np.broadcast_shapes(tuple(self._M.shape[:-2]), tuple(B.shape[:-2]))) + tuple(B.shape[-2:])
            B = xp.broadcast_to(B, shape)
        return self._solve2(B, trans)

    def _solve2(self, B, trans):
        if self.kind == "cholesky":
            return self.tri_solve(self.tri_solve(B), trans=True)
        if self._lu is not None:
            lu, piv = self._lu
            # SciPy's lu_solve writes to the pivot array it is given: concurrent solves on one shared
            # (lu, piv) corrupt the heap (issue 17), so every call gets its own copy of the pivots (O(n))
            return self._sl.lu_solve((lu, piv.copy()), B, trans=1 if trans else 0, check_finite=False)
        M = mT(self._M) if trans else self._M
        return _solve(self.xp, M, B)

    def tri_solve(self, B, trans: bool = False):
        """``L⁻¹ B`` (``trans``: ``L⁻ᵀ B``) with the Cholesky factor ``M = L Lᵀ``."""
        xp, sl, L = self.xp, self._sl, self._L
        if sl is not None and (is_numpy(xp) or not self.batched):
            return sl.solve_triangular(L, B, lower=True, trans="T" if trans else "N", check_finite=False)
        return _solve(xp, mT(L) if trans else L, B)

    def cond_estimate(self) -> float:
        """Cheap lower estimate of the 2-norm condition number of an SPD matrix: (max Lᵢᵢ / min Lᵢᵢ)²."""
        d = self.xp.abs(_diag(self.xp, self._L))
        return float(self.xp.max(d) / self.xp.min(d)) ** 2

    def inv(self):
        """``M⁻¹``; exactly symmetric when the factorization is Cholesky.

        NumPy, one matrix: LAPACK ``potri`` on the Cholesky factor (``2n³/3``
        flops, a third of the two triangular solves against ``I``); otherwise
        solves against ``I`` (symmetrised for Cholesky).
        """
        xp = self.xp
        if self.kind == "cholesky" and is_numpy(xp) and not self.batched and self._sl is not None and self.n:
            potri = self._sl.lapack.get_lapack_funcs("potri", (self._L,))
            C, info = potri(self._L, lower=1)
            if info == 0:
                C = np.tril(C)
                C += np.tril(C, -1).T
                return C
        eye = xp.eye(self.n, dtype=self._M.dtype)
        if self.batched:
            eye = xp.broadcast_to(eye, self._M.shape)
        M = self.solve(eye)
        if self.kind == "cholesky":
            M = (M + mT(M)) / 2
        return M

    def slogdet(self):
        xp = self.xp
        if self.kind == "cholesky":
            logabs = 2.0 * xp.sum(xp.log(_diag(xp, self._L)), axis=-1)
            return xp.ones_like(logabs), logabs
        if self._lu is not None:
            lu, piv = self._lu
            d = _diag(xp, lu)
            swaps = xp.sum(xp.astype(piv != xp.arange(self.n, dtype=piv.dtype), xp.int64), axis=-1)
            sign = xp.prod(xp.sign(d), axis=-1) * (1.0 - 2.0 * xp.astype(swaps % 2, d.dtype))
            return sign, xp.sum(xp.log(xp.abs(d)), axis=-1)
        res = xp.linalg.slogdet(self._M)
        return res[0], res[1]


def _try_eigh(xp, M):
    try:
        w, Q = xp.linalg.eigh(M)
    except LinAlgError:
        return None, None
    if not (bool(xp.all(xp.isfinite(w))) and bool(xp.all(xp.isfinite(Q)))):
        return None, None
    return w, Q


def eigh(xp, M, name: str, psd: bool = True):
    """Symmetric eigendecomposition that never fails silently.

    Non-finite output or a LAPACK failure in float32 is retried in float64
    (the failure most reported against K-FAC libraries); a failure in float64
    raises ``LinAlgError``.  With ``psd=True`` round-off negative eigenvalues
    (see :data:`PSD_CLIP_FACTOR`) are clipped to zero and larger negative ones
    raise, naming the argument.

    Returns
    -------
    w : (..., n) eigenvalues in ascending order
    Q : (..., n, n) orthonormal eigenvectors (columns)
    """
    w, Q = _try_eigh(xp, M)
    if w is None and M.dtype == xp.float32:
        w, Q = _try_eigh(xp, xp.astype(M, xp.float64))
        if w is not None:
            w, Q = xp.astype(w, xp.float32), xp.astype(Q, xp.float32)
    if w is None:
        raise LinAlgError(
            f"the eigendecomposition of {name} (shape {shape_str(M)}) failed or returned non-finite values "
            f"even in float64; check {name} for extreme scaling"
        )
    if psd and M.shape[-1] > 0:
        n = M.shape[-1]
        wmax = xp.max(xp.abs(w), axis=-1, keepdims=True)
        tol = PSD_CLIP_FACTOR * n * dtype_eps(xp, w.dtype) * wmax
        if bool(xp.any(w < -tol)):
            worst = float(xp.min(w / xp.where(wmax > 0, wmax, xp.ones_like(wmax))))
            raise LinAlgError(
                f"{name} (shape {shape_str(M)}) is not positive semi-definite: its smallest eigenvalue is "
                f"{worst:.3g} times its largest (tolerance {PSD_CLIP_FACTOR * n * dtype_eps(xp, w.dtype):.2g}); "
                f"pass a PSD curvature factor, add damping, or use psd=False"
            )
        w = xp.where(w < 0, xp.zeros_like(w), w)
    return w, Q






def _retry_float64(xp, fn, *mats):
    """Run ``fn`` and, if it fails or returns non-finite values in float32, redo it in float64."""
    def attempt(args):
        try:
            out = fn(*args)
        except LinAlgError:
            return None
        return out if all(bool(xp.all(xp.isfinite(o))) for o in out) else None

    out = attempt(mats)
    if out is None and mats[0].dtype == xp.float32:
        out = attempt([xp.astype(m, xp.float64) for m in mats])
        if out is not None:
            out = tuple(xp.astype(o, xp.float32) for o in out)
    return out


def generalized_eigh(xp, C, A, nameC: str, nameA: str, factor: "Factor | None" = None):
    """Symmetric-definite generalized eigenproblem ``C x = s A x`` (Cholesky-based, no square roots).

    Returns ``s`` (ascending) and ``K`` with ``Kᵀ A K = I`` and ``Kᵀ C K = diag(s)``.
    ``A`` must be symmetric positive definite (its Cholesky factor, if already
    computed, may be passed as ``factor``); ``C`` symmetric.  NumPy uses
    LAPACK's ``sygvd`` through SciPy; other namespaces reduce with the Cholesky
    factor ``A = L Lᵀ``: ``eigh(L⁻¹ C L⁻ᵀ) = (s, E)``, ``K = L⁻ᵀ E``.
    """
    n = int(A.shape[-1])
    if is_numpy(xp):
        import scipy.linalg

        def run(C_, A_):
            return scipy.linalg.eigh(C_, A_, check_finite=False)

        out = _retry_float64(xp, run, C, A)
        if out is None:
            raise LinAlgError(
                f"the generalized eigenproblem of ({nameC}, {nameA}) failed: {nameA} (shape ({n}, {n})) must be "
                f"symmetric positive definite; add damping to {nameA}"
            )
        return out
    f = factor if factor is not None else Factor(xp, A, nameA)
    if f.kind != "cholesky":
        raise LinAlgError(f"{nameA} (shape ({n}, {n})) is not positive definite; add damping to {nameA}")
    Ct = f.tri_solve(mT(f.tri_solve(C)))  # L⁻¹ C L⁻ᵀ (symmetric up to round-off; eigh reads one triangle)
    s, E = eigh(xp, Ct, f"{nameA}^(-1/2) {nameC} {nameA}^(-1/2)", psd=False)
    return s, f.tri_solve(E, trans=True)
