"""Input validation shared by every public function (docs/design.md §5).

Each check raises before any work is done, with a message that names the
argument, shows its shape and says how to fix the input.  Nothing is ever
silently repaired: an asymmetric matrix beyond round-off is an error, never
symmetrised behind the caller's back.
"""

from __future__ import annotations

import math

import numpy as np
from numpy.linalg import LinAlgError

from ._backend import diagonal, dtype_eps, is_numpy, to_numpy
from ._kernels.symmetric import asymmetry, compiled_asymmetry

__all__ = [
    "LinAlgError",
    "SYM_RTOL_FACTOR",
    "check_square",
    "check_finite",
    "check_finite_measured",
    "check_symmetric",
    "symmetric_within_tol",
    "check_nonneg_scalar",
    "check_nonempty",
    "check_choice",
    "check_sign",
    "check_positive_scalar",
    "check_real_scalar",
    "check_positive_int",
    "check_flag",
    "shape_str",
    "SINGULAR_RTOL_FACTOR",
    "singular_tol",
    "is_singular",
    "check_nonsingular",
    "check_overflow",
    "check_not_subnormal",
    "all_finite",
    "check_result",
    "nonfinite_result",
]

#: Symmetry tolerance, in units of the dtype's machine epsilon:
#: ``max|M - Mᵀ| <= SYM_RTOL_FACTOR * eps * max|M|``.  Products such as
#: ``X.T @ X`` computed by GEMM are symmetric only to a few ulps; anything
#: larger than this is a real asymmetry and rejected.
SYM_RTOL_FACTOR = 1000.0


def shape_str(x) -> str:
    return "(" + ", ".join(str(int(d)) for d in x.shape) + ")"


def check_square(x, name: str, *, batch: bool = True) -> int:
    """``x`` must be a square matrix (or, with ``batch``, a stack of them); return its order."""
    if x.ndim < 2 or (not batch and x.ndim != 2) or x.shape[-1] != x.shape[-2]:
        what = "a square matrix" + (" or a stack of square matrices (..., n, n)" if batch else "")
        raise ValueError(f"{name} must be {what}; got shape {shape_str(x)}")
    return int(x.shape[-1])


def all_finite(xp, x) -> bool:
    """Whether ``x`` (an array of namespace ``xp``, or a Python number) holds no NaN or infinity.

    ``isfinite(x).all()``: one pass, no false alarm and no warning.  A sum
    first would be one pass too, but a sum of large finite entries overflows
    (a false alarm, and NumPy warns "overflow encountered in reduce"), and
    measured it saves nothing: 2.8 µs against 3.4 µs at 64², 0.39 ms against
    0.44 ms at 1024² (float64, one thread).  On CuPy the ``bool`` is one
    device-to-host synchronisation.
    """
    if isinstance(x, (int, float)):
        return math.isfinite(x)
    if is_numpy(xp):
        return bool(np.isfinite(x).all())
    return bool(xp.all(xp.isfinite(x)))


def first_nonfinite(xp, arrays) -> int | None:
    """The index of the first of ``arrays`` (one namespace ``xp``) that holds a NaN or infinity, else None.

    One host decision for all of them.  NumPy sums them first: a finite total proves every array finite
    (one pass each, no temporary), and a non-finite one (a NaN, an infinity, or an overflow of the total
    alone) sends each array to the exact test of :func:`all_finite`.  Other libraries test them in one
    reduction: on CuPy one device-to-host synchronisation, where a test per array is one each.
    """
    if not arrays:
        return None
    if is_numpy(xp):
        with np.errstate(over="ignore", invalid="ignore"):
            if math.isfinite(float(sum(np.sum(x) for x in arrays))):
                return None
        return next((i for i, x in enumerate(arrays) if not all_finite(xp, x)), None)
    ok = to_numpy(xp.stack([xp.all(xp.isfinite(x)) for x in arrays]))
    bad = np.flatnonzero(~ok)
    return int(bad[0]) if bad.size else None


def check_finite(xp, x, name: str) -> None:
    """``x`` must hold no NaN or infinity."""
    if not all_finite(xp, x):
        raise ValueError(f"{name} (shape {shape_str(x)}) contains NaN or infinity; kronlin needs finite input")


def check_finite_measured(xp, x, name: str) -> tuple[float, float] | None:
    """:func:`check_finite` of a square ``x`` (..., n, n), with its symmetry measured in the same pass where the
    compiled kernel applies (:func:`kronlin._kernels.symmetric.compiled_asymmetry`).  Returns that
    ``(asym, scale)`` (``scale = max|x|``) for a later :func:`check_symmetric` or :func:`symmetric_within_tol`,
    or None where :func:`check_finite` made its own pass.  The measuring pass costs about twice the finiteness
    test's (it is compute-bound): a constructor calls this where it needs the symmetry or ``max|x|`` anyway
    (``KronSumInverse``), not where only a factorization that may never come would use it (``Kron``)."""
    measured = compiled_asymmetry(xp, x)
    if measured is None or measured[0] != measured[0]:  # NaN: an entry is not finite; check_finite names it
        check_finite(xp, x, name)
    return measured


def _asymmetry(xp, x, measured=None):
    """``(max|x - xᵀ|, tolerance)`` of a square (stack of) matrices (one tiled pass,
    :func:`kronlin._kernels.symmetric.asymmetry`, or its ``(asym, scale)`` already ``measured``;
    ``(nan, nan)`` for a non-finite entry, which no comparison accepts)."""
    asym, scale = asymmetry(xp, x) if measured is None else measured
    return asym, SYM_RTOL_FACTOR * dtype_eps(xp, x.dtype) * scale


def symmetric_within_tol(xp, x, measured=None) -> bool:
    """Whether ``x`` (..., n, n) is symmetric to round-off (:func:`check_symmetric`'s test, without the error);
    ``measured``: its ``(asym, scale)`` already measured."""
    asym, tol = _asymmetry(xp, x, measured)
    return asym <= tol


def check_symmetric(xp, x, name: str, measured=None) -> None:
    """``x`` (..., n, n) must be symmetric to round-off (see :data:`SYM_RTOL_FACTOR`); ``measured``: its
    ``(asym, scale)`` already measured (:func:`kronlin._kernels.symmetric.stack_asymmetry`, which built it, or
    :func:`check_finite_measured`)."""
    asym, tol = _asymmetry(xp, x, measured)
    if asym != asym:  # asymmetry() is NaN for a NaN or infinite entry: refused as check_finite refuses it
        check_finite(xp, x, name)
    if asym > tol:
        raise ValueError(
            f"{name} (shape {shape_str(x)}) must be symmetric: max|{name} - {name}ᵀ| = {asym:.3g} exceeds "
            f"the round-off tolerance {tol:.3g}; pass (M + Mᵀ)/2 if the asymmetry is intended to vanish"
        )


def _as_float(value, name: str) -> float:
    """``value`` as a Python float; strings, bools and non-numbers raise ``TypeError`` naming ``name``."""
    if isinstance(value, (str, bytes, bool)):
        raise TypeError(f"{name} must be a real scalar; got {type(value).__name__} {value!r}")
    try:
        return float(value)
    except (TypeError, ValueError):
        raise TypeError(f"{name} must be a real scalar; got {type(value).__name__}") from None


def check_nonneg_scalar(value, name: str) -> float:
    """A finite, non-negative Python scalar (damping, gamma)."""
    if type(value) is float and value >= 0.0 and value - value == 0.0:  # the common case, fast (inf - inf is NaN)
        return value
    v = _as_float(value, name)
    if not np.isfinite(v) or v < 0:
        raise ValueError(f"{name} must be finite and non-negative; got {value!r}")
    return v


def check_nonempty(x, name: str) -> None:
    """A factor of order 0 has nothing to solve: one clear error for every operator."""
    if x.shape[-1] == 0 or (x.ndim >= 2 and x.shape[-2] == 0):
        raise ValueError(
            f"{name} has shape {shape_str(x)}: kronlin operators need factors of order >= 1 (a size-0 layer "
            f"has no parameters; leave it out)"
        )


def check_choice(value, choices, name: str):
    """``value`` must be one of ``choices`` (compared as given: no case folding, no conversion)."""
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f"{name} must be one of {tuple(choices)}; got {value!r}")
    return value


def check_sign(sign, name: str = "sign") -> int:
    """+1 or -1 as an integer or float; ``True``/``False`` are not signs."""
    if isinstance(sign, bool) or not isinstance(sign, (int, float, np.integer, np.floating)) or sign not in (1, -1):
        raise ValueError(f"{name} must be +1 or -1; got {sign!r}")
    return int(sign)


def check_positive_scalar(value, name: str) -> float:
    """A finite, strictly positive Python scalar (pi, scale)."""
    v = _as_float(value, name)
    if not np.isfinite(v) or v <= 0:
        raise ValueError(f"{name} must be a finite positive number; got {value!r}")
    return v


def check_real_scalar(value, name: str) -> float:
    """A finite real Python scalar of any sign (a matrix power)."""
    if type(value) is float and value - value == 0.0:  # the common case, fast (inf - inf is NaN)
        return value
    v = _as_float(value, name)
    if not np.isfinite(v):
        raise ValueError(f"{name} must be finite; got {value!r}")
    return v


def check_positive_int(value, name: str) -> int:
    """An integer >= 1 (an iteration count); floats, bools and strings are refused."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{name} must be an integer >= 1; got {value!r}")
    return int(value)


def check_seed(value, name: str = "seed") -> int:
    """A random seed: an integer in ``[0, 2**63)`` (what NumPy's and torch's generators both take); floats,
    bools and strings are refused rather than truncated or converted."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name} must be an integer; got {type(value).__name__} {value!r}")
    if not 0 <= value < 2**63:
        raise ValueError(f"{name} must be in [0, 2**63); got {value!r}")
    return int(value)


def check_flag(value, name: str) -> bool:
    """A switch: ``True`` or ``False`` (NumPy bools too); a string such as ``"no"`` is not silently true."""
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    raise TypeError(f"{name} must be True or False; got {type(value).__name__} {value!r}")


# -- the singularity policy (one rule for every solver) ---------------------------------------------------------

#: The singularity policy, shared by every factorization and solver of kronlin
#: (Cholesky/LU of a factor, the eigenbasis of ``KronEigh``, the "eig" and
#: "schur" Stein methods): a problem is *singular to working precision* when its
#: reciprocal-condition estimate ``rcond`` satisfies
#:
#:     rcond <= SINGULAR_RTOL_FACTOR · eps(dtype)
#:
#: with ``eps`` that of the *input* dtype (the data's precision, whatever
#: precision a method computes in) — LAPACK's and MATLAB's "singular to working
#: precision" (``rcond < eps``) with a margin of 10 for the rounding of the
#: estimate itself: an exactly singular Stein problem comes out of QZ with
#: relative pivots of a few eps, and was accepted with a factor 1.  A factor of
#: the order ``n`` (the backward error of a factorization) was tried and
#: refused well-conditioned float32 factors of order 1000.  Each
#: method's ``rcond`` is the relative size of the pivots it divides by:
#: ``min/max`` of the Cholesky or LU pivots; for the eigenbasis of ``A ⊗ G + δI``
#: the smallest ``(lg_i·la_j + δ) / (|lg_i|·max|la| + |la_j|·max|lg| + δ)``
#: (each product against its own rounding error, so ``A ⊗ G`` is singular
#: exactly when ``Kron(A, G).solve`` says so: when a factor is); for a Kronecker sum ``B U Aᵀ + σ D U Cᵀ``, the smallest
#: ``|1 + σ s2·s1| / (1 + |s2·s1|)`` ("eig": the cancellation between the two
#: Kronecker terms at a pair of generalized eigenvalues) and the smallest
#: relative pivot of the quasi-triangular back-substitution ("schur", the same
#: quantity for 1×1 blocks, scaled by the largest entries).  "smith" refuses
#: what it cannot iterate (ρ(B⁻¹D)·ρ(A⁻¹C) ≥ 1, which includes every singular
#: problem of PSD factors).
SINGULAR_RTOL_FACTOR = 10.0


def singular_tol(eps: float) -> float:
    """The ``rcond`` at or below which a problem is singular to working precision (``eps`` of the input dtype)."""
    return SINGULAR_RTOL_FACTOR * float(eps)


def is_singular(rcond: float, eps: float) -> bool:
    """``rcond <= singular_tol(eps)`` (NaN counts as singular)."""
    return not float(rcond) > singular_tol(eps)


def check_nonsingular(rcond: float, eps: float, what: str, fix: str) -> None:
    """Raise ``LinAlgError`` "``what`` is singular to working precision" under the policy above."""
    if is_singular(rcond, eps):
        raise LinAlgError(
            f"{what} is singular to working precision (reciprocal condition estimate {float(rcond):.3g} <= "
            f"{singular_tol(eps):.3g} = {SINGULAR_RTOL_FACTOR:g}·eps of the input dtype); {fix}"
        )


def check_overflow(value: float, dtype_max: float, what: str, fix: str) -> None:
    """Raise ``ValueError`` when a magnitude the computation will form (``value``) is not representable.

    ``value`` is computed by the caller in Python floats (which overflow to ``inf``
    silently), e.g. ``max|A|·max|B|`` before forming ``A ⊗ B`` terms.
    """
    v = float(value)
    if not (v == v) or v >= dtype_max:
        raise ValueError(f"{what} overflows ({v:.3g} >= the dtype's largest value {dtype_max:.3g}); {fix}")


def check_not_subnormal(xp, x, name: str) -> None:
    """A matrix to be factored must not be subnormal as a whole: ``max|x| >= tiny`` (per stacked matrix).

    Below the smallest normal number even the largest entries carry fewer
    than the dtype's digits (their spacing is ``tiny·eps`` absolute), and a
    factorization (its log-determinant, its solves) loses accuracy that the
    relative singularity policy cannot see.  Above it the subnormal rounding
    is at most ``tiny·eps/max|x| <= eps`` relative to the matrix.  A zero
    matrix passes (it is singular, and the policy says so).
    """
    floor = float(xp.finfo(x.dtype).smallest_normal)
    if x.ndim >= 2 and x.shape[-1] == x.shape[-2] and x.shape[-1] > 0:
        d = xp.abs(diagonal(xp, x))
        if bool(xp.all(xp.max(d, axis=-1) >= floor)):  # max|x| >= max|diag x|: no O(n²) pass needed
            return
    big = xp.maximum(xp.max(x, axis=(-2, -1)), -xp.min(x, axis=(-2, -1)))  # max|x| without an |x| temporary
    if bool(xp.any((big > 0) & (big < floor))):
        raise ValueError(
            f"{name} (shape {shape_str(x)}) is too small in magnitude to factor in {x.dtype}: max|{name}| = "
            f"{float(xp.min(xp.where(big > 0, big, floor))):.3g} < {floor:.3g}, the smallest normal number (its "
            f"entries are subnormal and carry fewer digits); rescale {name} (the solution of a problem scaled by c "
            f"is the solution divided by c)"
        )


def quiet_overflow():
    """NumPy's overflow and invalid-value warnings off for a computation whose result the caller checks
    (:func:`check_result`, or a lazy check that names the input): the error replaces the warning.  For every
    namespace: array-api-strict computes with NumPy's ufuncs (and warned before its error), and the setting
    means nothing to the others."""
    return np.errstate(over="ignore", invalid="ignore")


# -- results: finite inputs must give finite results ------------------------------------------------------------
def nonfinite_result(x, what: str, fix: str) -> FloatingPointError:
    """The error for a result that is not finite although every input of the call was (see :func:`check_result`)."""
    dtype = getattr(x, "dtype", "float64")
    shape = f" (an array of shape {shape_str(x)})" if getattr(x, "ndim", 0) else ""
    return FloatingPointError(
        f"{what} is not finite although every input was{shape}: the computation overflowed "
        f"{str(dtype).split('.')[-1]}; {fix}"
    )


def check_result(xp, x, what: str, fix: str) -> None:
    """Raise ``FloatingPointError`` when a result computed from finite, validated inputs holds NaN or infinity.

    Every public call checks its inputs finite first (:func:`check_finite`),
    so a non-finite result means the computation left the dtype's range: an
    overflow (or an ``inf - inf`` after one) that NumPy reports only as a
    ``RuntimeWarning``.  ``what`` names the result (``"Kron.solve"``,
    ``"A_diag[0] (from acts[0])"``), ``fix`` says which input to rescale.
    Cost: one :func:`all_finite` pass over the result.
    """
    if not all_finite(xp, x):
        raise nonfinite_result(x, what, fix)
