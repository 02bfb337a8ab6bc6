"""Factorizations behind the backend layer: cached Cholesky/LU solves and a safe ``eigh``.

The array API standard has ``cholesky``, ``solve`` and ``eigh`` but no
triangular or LU solves, so those come from SciPy (NumPy arrays) or
``cupyx.scipy`` (CuPy arrays); any other namespace uses the standard's
general ``solve``, which is correct but does not reuse a factorization.
"""

from __future__ import annotations

import math
import warnings


import numpy as np

from ._backend import ModuleRefs, diagonal, dtype_eps, is_cupy, is_numpy, mT, to_numpy
from ._kernels.cholesky import compiled_stacks, potrf_stack, potri_stack
from ._kernels.norms import norm1
from ._kernels.symmetric import mirror_lower
from ._validate import (LinAlgError, all_finite, nonfinite_result, quiet_overflow, shape_str, singular_tol,
                        symmetric_within_tol)

__all__ = ["Factor", "eigh", "generalized_eigh", "ritz", "PSD_CLIP_FACTOR"]

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


def _broadcast_batch(xp, M, B):
    """``(M, B, batch)``: the matrices ``M`` and right-hand sides ``B`` broadcast to their common batch shape."""
    batch = tuple(np.broadcast_shapes(tuple(M.shape[:-2]), tuple(B.shape[:-2])))
    if tuple(M.shape[:-2]) != batch:
        M = xp.broadcast_to(M, batch + tuple(M.shape[-2:]))
    if tuple(B.shape[:-2]) != batch:
        B = xp.broadcast_to(B, batch + tuple(B.shape[-2:]))
    return M, B, batch


def _solve(xp, M, B):
    """``xp.linalg.solve(M, B)`` with the batch dimensions broadcast (CuPy's ``solve`` does not broadcast)."""
    M, B, _ = _broadcast_batch(xp, M, B)
    return xp.linalg.solve(M, B)


# -- NumPy routes (issue 13, item 1) --------------------------------------------------------------------
# NumPy float32/float64 matrices go straight to SciPy's LAPACK wrappers; the route per decomposition
# was chosen from bench/results/decomp_routes.md (`python bench/decomp_routes.py`: paired, one BLAS
# thread, SkylakeX OpenBLAS, numpy 2.4 / scipy 1.17), e.g. at 512 float32: numpy.linalg.eigh 1.87x
# LAPACK ?syevd, numpy.linalg.cholesky 5.4x ?potrf, numpy.linalg.inv 5.3x ?potrf + ?potri, and
# scipy's evr/ev/evx 2.0x/6.9x/6.9x ?syevd (float64: 1.05x, 1.8x, 3.3x; 1.2x/6.5x/6.3x).  CuPy and
# other namespaces keep xp.linalg.
_LAPACK_FUNCS: dict = {}

#: Stacks of at least this order loop over the matrices with ?syevd / ?potrf (+ ?potri) in Python instead
#: of NumPy's stacked call (bench/results/decomp_routes_stacks.md, paired, loop / NumPy): float32 eigh
#: 200 x 64² 0.79, 50 x 256² 0.64; float64 eigh 1.02 and 0.83-1.07 across runs (a tie: NumPy's stacked
#: call is kept); Cholesky float32 0.58 and 0.42, float64 1.33 and 0.63; SPD inverse (?potrf + ?potri
#: against the batched triangular solves used before) 0.45-0.61 everywhere.  With the compiled loop
#: (kronlin._kernels.cholesky) Cholesky stacks always loop: 0.88 / 0.57 / 0.45 of NumPy's stacked call at
#: float64 200 × 64², 50 × 256², 20 × 512² and 0.54 / 0.31 / 0.20 in float32 (paired, one thread).
_STACK_LOOP_MIN_N = {
    ("eigh", "float32"): 0, ("eigh", "float64"): 2**62,
    ("cholesky", "float32"): 0, ("cholesky", "float64"): 256,
    ("inv", "float32"): 0, ("inv", "float64"): 0,
}


def _lapack(name: str, dtype):
    """SciPy's ``?<name>`` for a float32/float64 dtype (cached; a racing first call stores the same function)."""
    key = (name, np.dtype(dtype).char)
    f = _LAPACK_FUNCS.get(key)
    if f is None:
        from scipy.linalg import lapack

        f = _LAPACK_FUNCS[key] = lapack.get_lapack_funcs(name, dtype=np.dtype(dtype))
    return f


def _blas(name: str, dtype):
    """SciPy's BLAS ``?<name>`` for a float32/float64 dtype (cached like :func:`_lapack`)."""
    key = ("blas", name, np.dtype(dtype).char)
    f = _LAPACK_FUNCS.get(key)
    if f is None:
        from scipy.linalg import blas

        f = _LAPACK_FUNCS[key] = blas.get_blas_funcs(name, dtype=np.dtype(dtype))
    return f


#: Narrower rows go to NumPy's ``X.T @ X`` and a scaling pass: below ~128 columns the wrappers' call
#: overheads outweigh the saved pass (256 rows, one thread: 9 columns 16 against 8 µs, 65: 57-79 against
#: 37-67 µs, 129: 107-182 against 98-189 µs, 257: 278-482 against 337-627 µs, 785: 2.1-3.1 against 3.3-5.8 ms).
SYRK_MIN_D = 128


def scaled_gram(xp, X, c: float, lower_only: bool = False):
    """``c·XᵀX`` of a 2-D NumPy float32/float64 ``X`` (C- or Fortran-contiguous, at least :data:`SYRK_MIN_D`
    columns), exactly symmetric; else None.

    One BLAS ``?syrk`` with ``alpha = c`` on ``X``'s own memory (no transposing copy, no scaling pass),
    its triangle mirrored by the compiled :func:`_mirror_lower`.  NumPy's ``X.T @ X`` is ``?syrk`` too,
    but then mirrors and needs the scaling pass: at 256 × 785 float32, one thread, 1.65-1.8 against 2.1 ms
    (plus the pass) for the product alone.  ``lower_only``: no mirror, only the lower triangle (C order) is
    the product, zeros above it (for a caller that mirrors once later, see ``FactorEstimator``).
    """
    if not (_np_lapack(xp, X) and X.ndim == 2 and X.shape[0] > 0 and X.shape[1] >= SYRK_MIN_D):
        return None
    syrk = _blas("syrk", X.dtype)
    if X.flags.c_contiguous:  # Xᵀ (d, N) is Fortran-ordered: c·Xᵀ(Xᵀ)ᵀ, trans=0
        C = syrk(c, X.T, trans=0, lower=0)
    elif X.flags.f_contiguous:
        C = syrk(c, X, trans=1, lower=0)
    else:
        return None
    # C's upper triangle (Fortran order) is the lower one of its C-ordered transpose
    return C.T if lower_only else _mirror_lower(C.T)


def second_moment(xp, X, c: float, lower_only: bool = False):
    """``c·XᵀX`` of rows ``X`` (..., n, d), exactly symmetric: :func:`scaled_gram` where it applies; NumPy's
    ``X.T @ X`` of a contiguous 2-D ``X`` otherwise (BLAS ``syrk`` and a mirror inside, symmetric as it comes,
    tested in ``tests/test_factors.py``), scaled in place; other libraries' products and stacks may differ
    from their transpose by round-off, and are symmetrised.  ``lower_only``: only the lower triangle need
    be the product (:func:`scaled_gram` then skips its mirror)."""
    M = scaled_gram(xp, X, c, lower_only)
    if M is not None:
        return M
    M = mT(X) @ X
    if is_numpy(xp) and X.ndim == 2 and (X.flags.c_contiguous or X.flags.f_contiguous):
        M *= c
        return M
    S = M + mT(M)
    S *= 0.5 * c
    return S


#: CuPy Cholesky stacks of at least this order solve their triangular systems matrix by matrix (trsm);
#: smaller ones keep the batched LU solve, whose one launch beats a launch per matrix.
CUPY_TRSM_LOOP_MIN_N = 256


def _np_lapack(xp, M) -> bool:
    """Whether ``M`` takes the NumPy LAPACK routes (a non-empty float32/float64 NumPy array)."""
    return is_numpy(xp) and M.dtype in (np.float32, np.float64) and M.shape[-1] > 0


def _stack_loop(kind: str, M) -> bool:
    if M.ndim <= 2:
        return False
    if kind != "eigh" and compiled_stacks(M):  # the compiled loop: 0.2-0.88× NumPy's stacked Cholesky, every size
        return True
    return M.shape[-1] >= _STACK_LOOP_MIN_N[kind, M.dtype.name]


def _flat(M, xp=np):
    """A stack of matrices (..., m, n) as one batch dimension (-1, m, n)."""
    return xp.reshape(M, (-1,) + tuple(M.shape[-2:]))


def _syevd(M):
    """``(w, Q)`` of a symmetric matrix (its lower triangle, like ``numpy.linalg.eigh``) by LAPACK ``?syevd``;
    None when LAPACK reports a failure.  Stacks loop over the matrices.

    One matrix: ``Q`` is LAPACK's Fortran-ordered array, not copied to C order (a transposing copy of
    2048² float32 costs more than 2% of the decomposition; BLAS takes either layout)."""
    syevd = _lapack("syevd", M.dtype)
    if M.ndim == 2:
        w, Q, info = syevd(M, compute_v=1, lower=1)
        return None if info != 0 else (w, Q)
    n = M.shape[-1]
    W = np.empty(tuple(M.shape[:-1]), dtype=M.dtype)
    Q = np.empty(tuple(M.shape), dtype=M.dtype)
    for m, w_, q_ in zip(_flat(M), np.reshape(W, (-1, n)), _flat(Q)):
        w, v, info = syevd(m, compute_v=1, lower=1)
        if info != 0:
            return None
        w_[...], q_[...] = w, v
    return W, Q


def _potrf(M, overwrite: bool = False):
    """The lower Cholesky factor (C-contiguous, upper triangle zero) of ``M``'s lower triangle by ``?potrf``;
    None when ``M`` is not positive definite.  Stacks loop over the matrices; ``overwrite``: a C-contiguous
    ``M`` is factored in its own memory (consumed, whatever the outcome)."""
    if M.ndim == 2:
        # Mᵀ is Fortran-ordered: its upper triangle is M's lower one, and the upper factor U = Lᵀ comes back
        # Fortran-ordered, so U.T is L in C order (no transposing copy)
        U, info = _lapack("potrf", M.dtype)(M.T, lower=0, clean=1, overwrite_a=int(overwrite))
        return None if info != 0 else U.T
    # each matrix factored in its own copy (its transpose is Fortran-ordered, so LAPACK writes the upper
    # factor Lᵀ into it): kronlin._kernels.cholesky, compiled or a loop of these same wrapper calls
    L, info = potrf_stack(_flat(M), overwrite)
    return None if info.any() else np.reshape(L, M.shape)


def _extremes(xp, d):
    """Per matrix: the smallest and largest of its pivots ``d`` (..., n), the two reductions every pivot test
    below reads (a NaN pivot makes both NaN: ``min``/``max`` propagate it)."""
    return xp.min(d, axis=-1), xp.max(d, axis=-1)


def _doubtful(lo, hi, eps):
    """Per matrix, from its pivots' :func:`_extremes`: whether the pivot ratio ``lo / hi`` is at or below
    ``sqrt(eps)``, where it no longer shows that the matrix is regular (see :func:`_condition_singular`)."""
    return lo <= math.sqrt(eps) * hi


def _suspects(lo, hi, eps):
    """Flat per-matrix mask of the NumPy matrices whose pivots' :func:`_extremes` leave a doubt
    (:func:`_doubtful`), or None when none does."""
    suspect = np.reshape(_doubtful(lo, hi, eps), (-1,))
    return suspect if suspect.any() else None


def _condition_singular(kind: str, M, F, suspect, eps) -> bool:
    """Whether one of the NumPy matrices (of a stack) flagged in ``suspect`` (:func:`_suspects`), whose
    pivots passed the ratio test, is nonetheless singular to working precision: LAPACK's reciprocal
    condition estimate at or below :func:`singular_tol`, from the Cholesky factor ``F = L``
    (``kind="pocon"``) or the LU factors ``F = lu`` (``"gecon"``).

    The pivot ratio ``min d / max d`` only bounds ``1/cond`` from above: a singular matrix (a one-batch K-FAC
    factor of fewer rows than its order, undamped) leaves a last pivot of rounding noise that lands above
    ``10·eps·max d`` for a few percent of matrices (the bad-input matrix found one; a sweep of 3000 random
    undamped one-batch factor sets, 45), and its "inverse" is then noise of size ``1/eps``.  The estimate
    (``O(n²)``: the 1-norm and a few triangular solves) runs only where the pivot ratio is below ``sqrt(eps)``,
    so a well-conditioned matrix costs nothing more.  (A float32 matrix whose condition is beyond ``1/eps``
    only after rounding its entries can still pass: the factor is exact for a nearby matrix.)
    :meth:`Factor.inv` judges by the inverse it computes instead (:func:`_inverse_singular`).
    """
    if suspect is None:
        return False
    con = _lapack(kind, M.dtype)
    Ms, Fs = _flat(M), _flat(F)
    for b in np.flatnonzero(suspect):  # views of the suspect matrices (a mask index would copy them)
        m, f = Ms[b], Fs[b]
        if kind == "pocon":
            rcond, info = con(f.T, norm1(m), uplo="U")  # Lᵀ is the upper factor in Fortran order (no copy)
        else:
            rcond, info = con(f, norm1(m), norm="1")
        if info != 0 or rcond <= singular_tol(eps):
            return True
    return False


def _inverse_singular(M, C, suspect, eps) -> bool:
    """:func:`_condition_singular`'s verdict from the computed inverse ``C`` of ``M`` (an exactly symmetric
    Cholesky inverse, or a stack of them): the exact ``rcond = 1/(‖M‖₁ ‖C‖₁)`` of every suspect matrix, two
    ``O(n²)`` passes, where ``?pocon`` estimates ``‖M⁻¹‖₁`` by several triangular solves (2048² float32, one
    thread: 1.7 against 13.7 ms, with the ``‖M‖₁`` pass in both).  The inverse of a matrix
    singular to working precision is noise of size ``1/(eps‖M‖)``, so its norm shows it; the estimate is a
    lower bound of that norm, so, up to the inverse's rounding, the exact value refuses at least what the
    estimate refused (tested on 200 rank-deficient matrices per dtype).  A non-finite inverse counts as
    singular."""
    if suspect is None:
        return False
    Ms, Cs = _flat(M), _flat(C)
    for b in np.flatnonzero(suspect):
        cnorm = norm1(Cs[b])
        if not math.isfinite(cnorm) or 1.0 <= singular_tol(eps) * norm1(Ms[b]) * cnorm:
            return True
    return False


def _potri(L, overwrite: bool = False):
    """``(L Lᵀ)⁻¹``, exactly symmetric, of a lower Cholesky factor or of every matrix of a stack, in place on ``L``
    (``overwrite``: the factor is lost) or on one copy; None if LAPACK fails.  What ``?potri`` computes, with
    the triangular inverse by halves above order 16, and its mirror (:func:`kronlin._kernels.cholesky.potri_stack`,
    compiled or a Python loop): 0.4-0.9x ``?potri``'s time (``bench/results/potri_recursive.md``)."""
    T = L if overwrite and L.flags.c_contiguous else np.array(L, order="C", copy=True)
    info = potri_stack(_flat(T))
    return None if info.any() else T


def _mirror_lower(S):
    """Copy the lower triangle of the C-contiguous ``S`` (or stack) onto its upper one, in place
    (:func:`kronlin._kernels.symmetric.mirror_lower`: compiled, else NumPy tiles)."""
    return mirror_lower(np, S)


class Factor(ModuleRefs):
    """A cached factorization of a square matrix or a stack of them.

    Cholesky when the matrix is symmetric (to round-off) and positive
    definite, LU otherwise.  ``solve(B)`` returns ``M⁻¹ B`` (``trans=True``:
    ``M⁻ᵀ B``) for ``B`` of shape ``(..., n, k)``; ``slogdet()`` returns
    ``(sign, log|det M|)``.
    """

    def __init__(self, xp, M, name: str, symmetric: bool | None = None, overwrite: bool = False,
                 judge_by_inverse: bool = False):
        """``symmetric``: None tests ``M`` for symmetry to round-off; True when the caller already has.

        ``overwrite`` (a caller that owns the NumPy matrix or stack ``M`` and can rebuild it): the Cholesky
        factorization is done in ``M``'s own memory, and instead of falling back to LU, or judging a doubtful
        pivot ratio by ``M``'s condition estimate, the constructor raises ``LinAlgError`` (``M`` is consumed
        then).

        ``judge_by_inverse`` (a caller that wants :meth:`inv` and keeps the object to itself): a Cholesky
        factorization whose pivot ratio leaves a doubt is judged by the exact condition of the inverse
        :meth:`inv` computes (:func:`_inverse_singular`) instead of by LAPACK's condition estimate here
        (which a solve still runs first, should one come before)."""
        self.xp, self.name, self.n = xp, name, int(M.shape[-1])
        # the constructor builds everything before the caller publishes the object (thread safety); only a
        # judge_by_inverse factor, which its one caller keeps, settles its doubt (_suspect) later
        self.batched = M.ndim > 2
        self._M = M
        self._suspect = None
        self._sl = _scipy_linalg(xp)
        self.kind = "lu"
        if symmetric or (symmetric is None and symmetric_within_tol(xp, M)):
            lapack = _np_lapack(xp, M) and (M.ndim == 2 or _stack_loop("cholesky", M))
            overwrite = overwrite and lapack and M.flags.c_contiguous
            if lapack:
                L = _potrf(M, overwrite)
            else:
                try:
                    L = xp.linalg.cholesky(M)
                except LinAlgError:
                    L = None
            # ?potrf with info = 0 on a finite M gives a finite L (|L_ij| <= sqrt(M_ii)), and a NaN or infinity of
            # M on the diagonal shows in L's diagonal: the diagonal decides there (the largest pivot is NaN or
            # infinite exactly when one is); other libraries may hand back NaN for a failed factorization, so all
            # of L is checked
            lo, hi = _extremes(xp, diagonal(xp, L) ** 2) if L is not None else (None, None)
            if L is not None and (all_finite(xp, hi) if lapack else bool(xp.all(xp.isfinite(L)))):
                eps = dtype_eps(xp, M.dtype)
                if overwrite and bool(xp.any(_doubtful(lo, hi, eps))):  # M is L now: no condition estimate
                    raise LinAlgError(f"{name}: a doubtful pivot ratio, judged by the caller without overwrite")
                singular = bool(xp.any(lo <= singular_tol(eps) * hi))
                suspect = None if singular or not _np_lapack(xp, M) else _suspects(lo, hi, eps)
                if suspect is not None and not judge_by_inverse:
                    singular, suspect = _condition_singular("pocon", M, L, suspect, eps), None
                if singular:
                    raise self._singular_psd()
                self.kind, self._L, self._suspect = "cholesky", L, suspect
            elif overwrite:  # M is consumed: no LU on it
                raise LinAlgError(f"{name} (shape {shape_str(M)}) is not positive definite")
        if self.kind == "lu" and self._sl is not None and (is_numpy(xp) or not self.batched):
            with warnings.catch_warnings():
                # an exactly zero pivot is reported below, with the argument's name
                warnings.simplefilter("ignore")
                lu, piv = self._sl.lu_factor(M, check_finite=False)
            lo, hi = _extremes(xp, xp.abs(diagonal(xp, lu)))
            eps = dtype_eps(xp, M.dtype)
            # a pivot at or below eps·max|pivot| is singular to working precision (the one policy, _validate.singular_tol),
            # and so is a matrix whose condition estimate says so where the pivots leave a doubt (_condition_singular)
            if not bool(xp.all(xp.isfinite(lu))) or bool(xp.any(lo <= singular_tol(eps) * hi)) or (
                _np_lapack(xp, M) and _condition_singular("gecon", M, lu, _suspects(lo, hi, eps), eps)):
                raise LinAlgError(
                    f"{name} (shape {shape_str(M)}) is singular to working precision; "
                    f"add damping to make it invertible"
                )
            self._lu = (lu, piv)
        elif self.kind == "lu":
            self._lu = None  # generic namespace: xp.linalg.solve each time

    def _singular_psd(self) -> LinAlgError:
        return LinAlgError(f"{self.name} (shape {shape_str(self._M)}) is positive semi-definite but singular to "
                           f"working precision; add damping to make it invertible")

    def _judge(self, singular: bool):
        """Record the verdict on a doubt ``judge_by_inverse`` left open (it stands for every later call), and
        raise if it is "singular"."""
        self._suspect = True if singular else None
        if singular:
            raise self._singular_psd()

    def _settle(self):
        """Before a solve: a doubt that ``judge_by_inverse`` left open is judged by the condition estimate."""
        if self._suspect is not None:
            self._judge(self._suspect is True or _condition_singular("pocon", self._M, self._L, self._suspect,
                                                                     dtype_eps(self.xp, self._M.dtype)))

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
        self._check_live()
        self._settle()
        if not self.batched and B.ndim > 2:
            Bf, lead, k = self._fold(B)
            return self._unfold(self._solve2(Bf, trans), lead, k)
        if self.batched:
            shape = tuple(np.broadcast_shapes(tuple(self._M.shape[:-2]), tuple(B.shape[:-2]))) + tuple(B.shape[-2:])
            B = xp.broadcast_to(B, shape)
        return self._solve2(B, trans)

    def _solve2(self, B, trans):
        if self.kind == "cholesky":
            return self._tri(self._tri(B), trans=True)
        if self._lu is not None:
            lu, piv = self._lu
            # SciPy's lu_solve writes to the pivot array it is given: concurrent solves on one shared
            # (lu, piv) corrupt the heap (issue 17), so every call gets its own copy of the pivots (O(n))
            return self._sl.lu_solve((lu, piv.copy()), B, trans=1 if trans else 0, check_finite=False)
        M = mT(self._M) if trans else self._M
        return _solve(self.xp, M, B)

    def tri_solve(self, B, trans: bool = False):
        """``L⁻¹ B`` (``trans``: ``L⁻ᵀ B``) with the Cholesky factor ``M = L Lᵀ``."""
        self._settle()
        return self._tri(B, trans)

    def _tri(self, B, trans: bool = False):
        xp, sl, L = self.xp, self._sl, self._L
        if sl is not None and (is_numpy(xp) or not self.batched):
            return sl.solve_triangular(L, B, lower=True, trans="T" if trans else "N", check_finite=False)
        if sl is not None and self.n >= CUPY_TRSM_LOOP_MIN_N:
            # CuPy's solve_triangular (one trsm) takes single matrices: loop over the stack rather than
            # solving the triangular system by a general LU (getrf + getrs, about three times the flops)
            return _tri_solve_loop(xp, sl, L, B, trans)
        return _solve(xp, mT(L) if trans else L, B)

    def cond_estimate(self) -> float:
        """Cheap lower estimate of the 2-norm condition number of an SPD matrix: (max Lᵢᵢ / min Lᵢᵢ)²."""
        d = self.xp.abs(diagonal(self.xp, self._L))
        return float(self.xp.max(d) / self.xp.min(d)) ** 2

    def inv(self, overwrite: bool = False):
        """``M⁻¹``; exactly symmetric when the factorization is Cholesky.

        NumPy: what LAPACK ``potri`` computes from the Cholesky factor (``2n³/3``
        flops, a third of the two triangular solves against ``I``), with the
        triangular inverse by halves in ``?gemm`` calls above order 16 (0.4-0.9x
        ``potri``'s time, bench/results/potri_recursive.md), per matrix for stacks
        of orders where that beats the batched solves (bench/results/decomp_routes.md);
        otherwise solves against ``I`` (symmetrised for Cholesky).

        ``overwrite``: a caller that needs nothing else of this factorization
        (take :meth:`slogdet` first) lets ``potri`` work in the Cholesky
        factor's memory, saving a copy of it; the factorization is consumed.

        A doubt left open by ``judge_by_inverse`` is settled here, by the inverse itself.
        """
        if self._suspect is True:  # judged singular before
            self._judge(True)
        C = self._inv(overwrite)
        if self._suspect is not None:
            self._judge(_inverse_singular(self._M, C, self._suspect, dtype_eps(self.xp, self._M.dtype)))
        return C

    def _inv(self, overwrite):
        xp = self.xp
        self._check_live()
        if self.kind == "cholesky" and _np_lapack(xp, self._L) and (not self.batched or _stack_loop("inv", self._L)):
            C = _potri(self._L, overwrite)
            if overwrite:
                self._L, self.kind = None, "consumed"
                if C is None:  # the pivots were checked when factoring: a zero one cannot occur here
                    raise LinAlgError(f"{self.name}: LAPACK potri failed on a checked Cholesky factor")
            if C is not None:
                return C
        eye = xp.eye(self.n, dtype=self._M.dtype)
        if self.batched:
            eye = xp.broadcast_to(eye, self._M.shape)
        if self.kind == "cholesky":
            # M⁻¹ = L⁻ᵀ L⁻¹ (potri's formula): one triangular solve and a GEMM.  The two triangular solves
            # against I this replaces took 21.4 ms against 3.6 ms at 2049² float32 on an H200 (CuPy's
            # transposed solve_triangular is the slow part; bench/results/gpu-eigh-routes.md)
            Li = self._tri(eye)
            C = mT(Li) @ Li
            return (C + mT(C)) / 2
        return self.solve(eye)

    def _check_live(self):
        if self.kind == "consumed":
            raise RuntimeError(f"the factorization of {self.name} was consumed by inv(overwrite=True)")

    def slogdet(self):
        xp = self.xp
        self._check_live()
        if self.kind == "cholesky":
            logabs = 2.0 * xp.sum(xp.log(diagonal(xp, self._L)), axis=-1)
            return xp.ones_like(logabs), logabs
        if self._lu is not None:
            lu, piv = self._lu
            d = diagonal(xp, lu)
            swaps = xp.sum(xp.astype(piv != xp.arange(self.n, dtype=piv.dtype), xp.int64), axis=-1)
            sign = xp.prod(xp.sign(d), axis=-1) * (1.0 - 2.0 * xp.astype(swaps % 2, d.dtype))
            return sign, xp.sum(xp.log(xp.abs(d)), axis=-1)
        res = xp.linalg.slogdet(self._M)
        return res[0], res[1]


def cupy_stacks_eigh(B: int, n: int, dtype) -> bool:
    """Whether CuPy decomposes a stack of ``B`` symmetric ``n × n`` matrices in one stacked call.

    CuPy's stacked ``eigh`` is cuSOLVER's batched Jacobi (``syevjBatched``, documented for ``n ≤ 32``):
    all matrices in one launch, but its cost grows fast with ``n`` and above 32 it stops short of
    convergence (reconstruction error 2e-5 at 200 × 64² and 3.5e-4 at 50 × 256² in float32, against
    about 1e-6 for ``syevd``); one ``syevd`` call per matrix pays a launch sequence each.  Measured on an
    H200 (bench/results/gpu-eigh-routes.md, CuPy 14.2, CUDA 13; stacked / loop, ms, float32): 2 × 64²
    1.2 / 1.7, 16 × 64² 1.2 / 12.6, 2 × 128² 3.2 / 2.9, 16 × 128² 3.3 / 22.8, 16 × 256² 13.4 / 31.2,
    2 × 2049² (K-FAC's two hidden layers of a 2048-wide MLP) 398 / 26.  So: the stacked call up to 64,
    up to 128 from 4 matrices, else the loop; every stacked result is checked (:func:`_eigh_stack_checked`).
    """
    del dtype  # the same rule in both precisions (float64 measured alike: 16 × 128² 7.7 / 25.0)
    return n <= 64 or (n <= 128 and B >= 4)


#: Backward-error bound of a checked stacked eigendecomposition, in units of ``n · eps``: LAPACK's own
#: test suite accepts eigensolvers whose scaled residuals stay below 30 (its THRESH).
EIGH_STACK_TOL = 8


def _eigh_stack_checked(xp, M, stacked, single):
    """``stacked(M)`` for a stack, each matrix's result kept only where
    ``‖M − QΛQᵀ‖_F ≤ τ‖M‖_F`` and ``‖QᵀQ − I‖_F ≤ τ√n`` with ``τ = EIGH_STACK_TOL · n · eps``;
    the others (and non-finite results) are decomposed again by ``single`` one at a time."""
    n = M.shape[-1]
    w, Q = stacked(M)
    tau = EIGH_STACK_TOL * n * dtype_eps(xp, M.dtype)
    # in units of each matrix's largest entry, so that the squares below cannot overflow (float32 beyond 1e19)
    s = xp.max(xp.abs(M), axis=(-2, -1), keepdims=True)
    s = xp.where(s > 0, s, xp.ones_like(s))
    E = ((Q * (w[..., None, :] / s)) @ mT(Q)) - M / s
    O = mT(Q) @ Q - xp.eye(n, dtype=Q.dtype)
    fro = lambda X: xp.sqrt(xp.sum(X * X, axis=(-2, -1)))  # noqa: E731
    good = (fro(E) <= tau * fro(M / s)) & (fro(O) <= tau * math.sqrt(n))
    bad = np.flatnonzero(~np.asarray(to_numpy(xp.reshape(good, (-1,)))))
    if bad.size:
        wf, Qf, Mf = xp.reshape(w, (-1, n)), _flat(Q, xp), _flat(M, xp)
        for i in bad.tolist():
            wf[i, ...], Qf[i, ...] = single(Mf[i])
        w, Q = xp.reshape(wf, tuple(w.shape)), xp.reshape(Qf, tuple(Q.shape))
    return w, Q


def _tri_solve_loop(xp, sl, L, B, trans: bool):
    """``L⁻¹ B`` (``trans``: ``L⁻ᵀ B``) for a stack of lower-triangular ``L``, one ``sl.solve_triangular``
    per matrix, the batch dimensions of ``L`` and ``B`` broadcast."""
    L, B, batch = _broadcast_batch(xp, L, B)
    Lf, Bf = _flat(L, xp), _flat(B, xp)
    out = [sl.solve_triangular(Lf[i], Bf[i], lower=True, trans="T" if trans else "N") for i in range(Lf.shape[0])]
    return xp.reshape(xp.stack(out), batch + tuple(B.shape[-2:]))


def _eigh_loop(xp, M):
    """``xp.linalg.eigh`` matrix by matrix over a stack, the results stacked again."""
    flat = _flat(M, xp)
    parts = [xp.linalg.eigh(flat[i]) for i in range(flat.shape[0])]
    w = xp.stack([p[0] for p in parts])
    Q = xp.stack([p[1] for p in parts])
    return xp.reshape(w, tuple(M.shape[:-1])), xp.reshape(Q, tuple(M.shape))


def _eigh_raw(xp, M):
    """``(w, Q)`` by ``?syevd`` on the NumPy routes, else ``xp.linalg.eigh`` (CuPy: stacked or per matrix,
    :func:`cupy_stacks_eigh`); ``LinAlgError`` on failure."""
    if _np_lapack(xp, M) and (M.ndim == 2 or _stack_loop("eigh", M)):
        out = _syevd(M)
        if out is None:
            raise LinAlgError("?syevd did not converge")
        return out
    if M.ndim > 2 and M.shape[-1] > 0 and is_cupy(xp):
        B = math.prod(M.shape[:-2])
        if B > 1:
            if cupy_stacks_eigh(B, M.shape[-1], M.dtype):
                return _eigh_stack_checked(xp, M, xp.linalg.eigh, xp.linalg.eigh)
            return _eigh_loop(xp, M)
    return xp.linalg.eigh(M)


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
    out = _retry_float64(xp, lambda M_: _eigh_raw(xp, M_), M)
    if out is None:
        raise LinAlgError(
            f"the eigendecomposition of {name} (shape {shape_str(M)}) failed or returned non-finite values "
            f"even in float64; check {name} for extreme scaling"
        )
    w, Q = out
    if psd and M.shape[-1] > 0:
        clipped = _clip_psd(xp, w)
        if clipped is None:
            n = M.shape[-1]
            wmax = xp.max(xp.abs(w), axis=-1, keepdims=True)
            worst = float(xp.min(w / xp.where(wmax > 0, wmax, xp.ones_like(wmax))))
            raise LinAlgError(
                f"{name} (shape {shape_str(M)}) is not positive semi-definite: its smallest eigenvalue is "
                f"{worst:.3g} times its largest (tolerance {PSD_CLIP_FACTOR * n * dtype_eps(xp, w.dtype):.2g}); "
                f"pass a PSD curvature factor, add damping, or use psd=False"
            )
        w = clipped
    return w, Q


def rows_eigh(xp, X, scale: float, name: str):
    """Eigenpairs of the PSD ``M = scale · XᵀX`` from its rows ``X`` (..., n, p), without ``M`` when ``n < p``.

    For ``n > 0.8·p`` this is :func:`eigh` of ``M`` (a full ``(p, p)`` basis;
    the Gram route below is slower from ``n ≈ 0.85·p``).  Otherwise ``M`` has
    rank at most ``n < p``: with the ``n × n`` Gram matrix
    ``K = scale · X Xᵀ = V diag(μ) Vᵀ``, the columns ``u_i = √scale · Xᵀ v_i / √μ_i``
    are orthonormal eigenvectors of ``M`` with the same eigenvalues ``μ_i``
    (``M u_i = √scale · Xᵀ K v_i / √μ_i = μ_i u_i``), and every vector orthogonal
    to them has eigenvalue 0.  Cost ``4·n²·p + O(n³)`` flops against ``O(p³)``.
    Eigenvalues at or below ``eps·max μ`` (the Gram matrix's rounding level) are
    set to 0 with a zero column: their direction is not determined, and as
    eigenvalue-0 pairs they belong to the complement (an error of at most
    ``eps·max μ`` in ``M``, the dense ``eigh``'s own).

    Returns
    -------
    w : (..., r) eigenvalues, ascending (``r = n`` on the Gram route, else ``p``)
    U : (..., p, r) eigenvectors: orthonormal columns, or zero columns where ``w`` is 0 (thin when ``r < p``)
    """
    n, p = X.shape[-2], X.shape[-1]
    dense = 5 * n > 4 * p  # measured crossover ~0.85·p (one thread, float32, p = 512): dense ?syevd of M
    with quiet_overflow():
        K = second_moment(xp, X if dense else mT(X), scale)  # scale·XᵀX, or the Gram matrix scale·XXᵀ
    if not all_finite(xp, K):
        fix = f"rescale {name} (or its scale)" + (", or use float64" if K.dtype == xp.float32 else "")
        raise nonfinite_result(K, f"scale·{name}ᵀ{name}", fix)
    if dense:
        w, Q = eigh(xp, K, name)
        if n < p:  # rank <= n: the p − n smallest eigenvalues are zero, not the rounding noise eigh leaves there
            w = xp.where(xp.arange(p) < p - n, xp.zeros_like(w), w)
        return w, Q
    mu, V = eigh(xp, K, f"the Gram matrix {name}·{name}ᵀ")
    cut = dtype_eps(xp, mu.dtype) * xp.max(mu, axis=-1, keepdims=True)
    keep = mu > cut
    mu = xp.where(keep, mu, xp.zeros_like(mu))
    inv = xp.where(keep, 1.0 / xp.sqrt(xp.where(keep, mu, xp.ones_like(mu))), xp.zeros_like(mu))
    U = (mT(X) @ V) * (math.sqrt(scale) * inv)[..., None, :]
    return mu, U


def _clip_psd(xp, w):
    """``w`` (..., n) with round-off negative values (see :data:`PSD_CLIP_FACTOR`) set to zero; None when
    a value is more negative than that (the matrix is not PSD)."""
    tol = PSD_CLIP_FACTOR * w.shape[-1] * dtype_eps(xp, w.dtype) * xp.max(xp.abs(w), axis=-1, keepdims=True)
    if bool(xp.any(w < -tol)):
        return None
    return xp.where(w < 0, xp.zeros_like(w), w)


def ritz(xp, M, Q):
    """Rayleigh quotients ``d_j = q_jᵀ M q_j`` and squared residual norms ``r_j = ‖M q_j − d_j q_j‖²``.

    For an orthonormal ``Q`` (..., n, n), ``d`` is the diagonal of ``QᵀMQ`` and ``r_j`` the squared norm
    of the off-diagonal part of its column ``j`` (``‖Qᵀy‖ = ‖y‖``), so the staleness of ``Q`` as an
    eigenbasis of ``M`` costs one GEMM and a few passes over ``n²`` entries, not the two GEMMs of
    ``QᵀMQ``.  The residual is formed explicitly (not as ``‖Mq_j‖² − d_j²``, which cancels to
    ``sqrt(eps)`` relative accuracy).  ``d`` is clipped like :func:`eigh`'s eigenvalues for a PSD ``M``;
    returns None when a quotient is clearly negative (``M`` is not PSD).
    """
    Y = M @ Q
    d = xp.sum(Q * Y, axis=-2)
    Y -= Q * d[..., None, :]  # the residuals, in place (Y is ours)
    r = xp.sum(Y * Y, axis=-2)
    d = _clip_psd(xp, d)
    return None if d is None else (d, r)


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
        def run(C_, A_):
            # ?sygvd directly (C, A: non-empty float32/float64 matrices of one dtype, as validated by the
            # callers): what scipy.linalg.eigh(C, A) calls, without its wrapper's copies and checks
            # (bench/results/decomp_routes.md); sygv and the Cholesky reduction + syevd were slower
            s, K, info = _lapack("sygvd", A_.dtype)(C_, A_, itype=1, jobz="V", uplo="L")
            if info != 0:
                raise LinAlgError(f"?sygvd failed (info = {info})")
            return s, K

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
