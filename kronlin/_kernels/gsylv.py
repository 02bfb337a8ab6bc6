"""Generalized-Sylvester back-substitution: ``S1 Y S2ᵀ + sign·T1 Y T2ᵀ = W`` in real generalized Schur form.

Step 3 of the Schur method of Gardiner, Laub, Amato & Moler (1992) used by
:class:`kronlin.stein.schur.SchurStein`: after the QZ reductions
``(B, D) = Q1 (S1, T1) Z1ᵀ`` and ``(A, C) = Q2 (S2, T2) Z2ᵀ`` the equation
``B U Aᵀ + sign·D U Cᵀ = V`` becomes ``S1 Y S2ᵀ + sign·T1 Y T2ᵀ = W`` with
``S1, S2`` quasi-upper-triangular (1×1 and 2×2 diagonal blocks), ``T1, T2``
upper triangular, ``W = Q1ᵀ V Q2`` and ``U = Z1 Y Z2ᵀ``.  It is solved column
(block) by column block of ``Y`` from the last to the first; each column block
is a quasi-triangular system, itself solved by back-substitution over the row
blocks of ``S1``, i.e. one small dense system (1×1, 2×2 or 4×4) per pair of
diagonal blocks.  A sequential recurrence, so a compiled kernel
(``csrc/cpu/gsylv_cpu.cpp``, O(pq(p+q)) like the surrounding GEMMs) does it for
NumPy arrays; :func:`gsylv_backsub_reference` is the NumPy composition it is
tested against (one dense LU per column block: O(p q³), clarity over speed).

Singularity rule (both paths)
-----------------------------
Both paths meet the same small diagonal systems — the diagonal blocks of
``S2 ⊗ S1 + sign·T2 ⊗ T1`` with the unknowns of a block ordered row-major over
``(i, j)`` — and factor them by Gaussian elimination with partial pivoting.
With ``scale = max|S1|·max|S2| + max|T1|·max|T2|`` (a bound on every entry of
that Kronecker matrix, up to a factor 2) the relative pivot ``min |pivot| / scale``
is the method's reciprocal-condition estimate, judged by kronlin's one
singularity policy (:data:`kronlin._validate.SINGULAR_RTOL_FACTOR`): singular
to working precision when

    min |pivot| / scale  <=  SINGULAR_RTOL_FACTOR · eps(input dtype).

For 1×1 blocks the pivot is ``S1[i,i]·S2[j,j] + sign·T1[i,i]·T2[j,j]``, zero
exactly when a product ``λ·μ`` of generalized eigenvalues of ``(B, D)`` and
``(A, C)`` equals ``-sign``.  The QZ reductions are backward stable with
backward errors of order ``max(p, q)·eps`` times the factors' norms, so a pivot
at the bound is within rounding of zero: the data lie within rounding
of an exactly singular equation, and the solution would carry no correct digit
(LAPACK's xTRSYL/xTGSYL use the same kind of ``eps·max|entry|`` bound to
perturb tiny pivots).  SciPy's ``solve_sylvester`` ignores LAPACK's warning in
this case and returns garbage (scipy gh-23066); kronlin raises instead.
"""

from __future__ import annotations

import warnings

import numpy as np

from .._backend import dtype_eps, is_numpy, native_float, to_numpy
from .._validate import SINGULAR_RTOL_FACTOR, LinAlgError, is_singular
from .._validate import singular_tol as _policy_tol
from ._dispatch import kernel

__all__ = [
    "PIVOT_RTOL_FACTOR",
    "gsylv_backsub",
    "gsylv_backsub_reference",
    "gsylv_backsub_raw",
    "singular_tol",
    "check_pivot",
]

#: Multiplier of ``eps`` in the singularity test on the relative
#: pivots of the Schur back-substitution: kronlin's one singularity policy
#: (:data:`kronlin._validate.SINGULAR_RTOL_FACTOR`).
PIVOT_RTOL_FACTOR = SINGULAR_RTOL_FACTOR


def singular_tol(eps: float, p: int, q: int) -> float:
    """The relative-pivot threshold at or below which the equation is singular (``eps`` of the input dtype)."""
    return _policy_tol(eps)  # p, q: kept for callers; the policy does not scale with the order


def check_pivot(rel_pivot: float, eps: float, p: int, q: int, sign: int) -> None:
    """Raise ``LinAlgError`` when the smallest relative pivot is at or below :func:`singular_tol`."""
    tol = singular_tol(eps, p, q)
    if is_singular(rel_pivot, eps):  # also catches NaN
        target = -1 if sign > 0 else 1
        raise LinAlgError(
            f"the generalized Sylvester equation B U Aᵀ {'+' if sign > 0 else '-'} D U Cᵀ = V is singular to "
            f"working precision: a product of generalized eigenvalues of (B, D) and (A, C) equals {target:+d} "
            f"(for sign={sign:+d}) to within rounding (smallest relative pivot {rel_pivot:.3g} <= tolerance "
            f"{tol:.3g} = {SINGULAR_RTOL_FACTOR:g}·eps of the input dtype, eps={eps:.3g}); "
            f"perturb or damp the factors so that no such product is {target:+d}"
        )


def _blocks(S) -> list[tuple[int, int]]:
    """``(start, size)`` of the diagonal blocks of quasi-upper-triangular ``S``, top-down."""
    n = S.shape[0]
    out, i = [], 0
    sub = np.diagonal(S, -1) != 0
    while i < n:
        size = 2 if i + 1 < n and sub[i] else 1
        out.append((i, size))
        i += size
    return out


def _structured(S, T):
    """``S`` and ``T`` restricted to the quasi-triangular / triangular structure (zero elsewhere)."""
    n = S.shape[0]
    mask = np.triu(np.ones((n, n), dtype=bool))
    T = np.where(mask, T, 0)
    for i, size in _blocks(S):
        if size == 2:
            mask[i + 1, i] = True
    return np.where(mask, S, 0).astype(S.dtype), T.astype(S.dtype)


def _scale(S1, T1, S2, T2) -> float:
    def amax(M):
        return float(np.abs(M).max(initial=0.0))

    return amax(S1) * amax(S2) + amax(T1) * amax(T2)


def gsylv_backsub_reference(xp, S1, T1, S2, T2, W, sign: int):
    """NumPy reference of :func:`gsylv_backsub`; returns a new array and raises on singularity."""
    Y, rel = _reference_raw(xp, S1, T1, S2, T2, W, sign)
    check_pivot(rel, dtype_eps(xp, Y.dtype), W.shape[-1], W.shape[-2], sign)
    return Y


def _reference_raw(xp, S1, T1, S2, T2, W, sign: int):
    import scipy.linalg

    back = not is_numpy(xp)
    S1, T1, S2, T2, W = (np.asarray(to_numpy(M)) for M in (S1, T1, S2, T2, W))
    dtype = W.dtype
    S1, T1, S2, T2 = (M.astype(dtype, copy=False) for M in (S1, T1, S2, T2))
    q, p = W.shape[-2], W.shape[-1]
    batch = W.shape[:-2]
    Wb = W.reshape((-1, q, p))
    nb = Wb.shape[0]
    Y = np.zeros_like(Wb)
    rel = float("inf")
    if nb and p and q:
        S1, T1 = _structured(S1, T1)
        S2, T2 = _structured(S2, T2)
        minpiv = float("inf")
        with warnings.catch_warnings(), np.errstate(all="ignore"):
            # an exactly zero pivot: LAPACK warns, later steps see inf/NaN; the pivot test below raises
            warnings.simplefilter("ignore", scipy.linalg.LinAlgWarning)
            for j0, n in reversed(_blocks(S2)):
                J, K = slice(j0, j0 + n), slice(j0 + n, p)
                # right-hand side: W[:, J] minus the solved columns K, accumulated first
                # (r = Y[:, K] S2[J, K]ᵀ) and then multiplied by S1 (and the same for T)
                R = Wb[:, :, J] - S1 @ (Y[:, :, K] @ S2[J, K].T) - sign * (T1 @ (Y[:, :, K] @ T2[J, K].T))
                # the column block's quasi-triangular system, unknowns Y[i, j] at index i*n + (j - j0)
                M = np.kron(S1, S2[J, J]) + sign * np.kron(T1, T2[J, J])
                lu, piv = scipy.linalg.lu_factor(M, check_finite=False)
                minpiv = min(minpiv, float(np.abs(np.diagonal(lu)).min()))
                x = scipy.linalg.lu_solve((lu, piv), R.reshape(nb, q * n).T, check_finite=False)
                Y[:, :, J] = x.T.reshape(nb, q, n)
        scale = _scale(S1, T1, S2, T2)
        rel = minpiv / scale if scale > 0 else 0.0
    Y = Y.reshape(batch + (q, p))
    return (xp.asarray(Y) if back else Y), rel


def gsylv_backsub_raw(xp, S1, T1, S2, T2, W, sign: int):
    """Solve without the singularity test; return ``(Y, smallest relative pivot)``.

    ``W`` (..., q, p) may be overwritten (pass a fresh array you own).
    """
    sign = 1 if sign > 0 else -1
    run = kernel(xp, "gsylv_backsub")
    if run is not None and W.size > 0 and W.dtype.char in "fd":
        q, p = W.shape[-2], W.shape[-1]
        if not (native_float(W) and W.flags.c_contiguous and W.flags.writeable):
            W = np.array(W, dtype=W.dtype.newbyteorder("="), order="C")  # machine byte order, aligned
        S1, T1, S2, T2 = (np.require(M, dtype=W.dtype, requirements=("C", "A")) for M in (S1, T1, S2, T2))
        rel = run(S1, T1, S2, T2, W.reshape(-1, q, p), sign)
        return W, float(rel)
    return _reference_raw(xp, S1, T1, S2, T2, W, sign)


def gsylv_backsub(xp, S1, T1, S2, T2, W, sign: int):
    """Solve ``S1 Y S2ᵀ + sign·T1 Y T2ᵀ = W`` for ``Y`` (..., q, p); may work in place on ``W``.

    ``S1`` (q, q) and ``S2`` (p, p) quasi-upper-triangular and ``T1``, ``T2``
    upper triangular, as returned by ``scipy.linalg.qz(..., output="real")``
    (entries below that structure are ignored).  ``W`` must be a fresh array
    owned by the caller (it is overwritten when the compiled kernel runs).
    Uses the compiled kernel for NumPy arrays when it is available, else
    :func:`gsylv_backsub_reference`.

    Raises
    ------
    numpy.linalg.LinAlgError
        When the equation is singular to working precision (see the module
        docstring for the rule).
    """
    q, p = W.shape[-2], W.shape[-1]
    Y, rel = gsylv_backsub_raw(xp, S1, T1, S2, T2, W, sign)
    check_pivot(rel, dtype_eps(xp, Y.dtype), p, q, sign)
    return Y
