"""Self-check behind ``python -m kronlin``: every public method against dense NumPy/SciPy.

This package holds the driver (:func:`run`); :mod:`~kronlin._selfcheck.problems`
the problems and their settings (drawn with the generators of
:mod:`kronlin.testing`, which the test suite and the benchmarks share),
:mod:`~kronlin._selfcheck.checks` one check per public method and the
tolerance rule, :mod:`~kronlin._selfcheck.report` the printed table and
:mod:`~kronlin._selfcheck.timing` the timing of a row.

For each problem size ``(p, q)`` and dtype, random factors are drawn from
``numpy.random.default_rng(seed)``:

* symmetric positive definite ``A`` (p, p) and ``G`` (q, q) with eigenvalues
  log-spaced in ``[1/COND, 1]`` (condition number ``COND = 1e2`` each, so
  ``cond(A ⊗ G) = 1e4``) in a random orthonormal basis;
* non-symmetric ``An`` (p, p), ``Gn`` (q, q) with singular values log-spaced in
  ``[1/COND, 1]``, used for the products and the transpose (a symmetric
  factor cannot tell ``A`` from ``Aᵀ``) and for the general (LU) solve;
* a right-hand side ``X`` (q, p) and a block ``V`` (p*q, 4) of flat vectors.

The checks of the Kronecker-sum, damping and network API draw further inputs
from their own stream ``numpy.random.default_rng((seed, p, q))`` (so the
draws above stay what they were):

* ``solve_kron_sum(A, B, C, D, X, sign, method)`` (``B U Aᵀ + sign·D U Cᵀ = X``)
  with ``A``, ``B`` the SPD ``A``, ``G`` above and symmetric ``C = L_A S L_Aᵀ``,
  ``D = L_G S' L_Gᵀ`` (``L`` Cholesky factors, ``S``, ``S'`` with eigenvalues
  ``±sqrt(STEIN_RHO)``), so ``ρ(A⁻¹C)·ρ(G⁻¹D) = STEIN_RHO = 0.5``: Smith
  converges and both signs give an SPD sum of condition at most
  ``cond(A ⊗ G)·(1 + ρ)/(1 − ρ)``; for ``method="schur"`` also the
  non-symmetric ``An``, ``Gn`` with ``Cn = An R``, ``Dn = Gn R'``
  (``‖R‖₂ = ‖R'‖₂ = sqrt(STEIN_RHO)``), sign −1;
* ``DampedKron(A, G, DAMPING, mode)``: the exact ``A ⊗ G + DAMPING·I`` and the
  factored ``(A + π√d I) ⊗ (G + (√d/π) I)`` (π by the trace rule);
* a random tanh MLP (three layers, widths about ``1.4·sqrt`` of ``p`` and
  ``q``, at most ``NET_MAX_PARAMS`` parameters) whose activations and
  back-propagated vectors feed ``batch_factors`` (against ``āᵀā/N``,
  ``gᵀg/N`` in NumPy) and, as exact factor estimates rounded to the dtype,
  ``BlockDiagInverse`` and ``BlockTridiagInverse`` with ``gamma = NET_GAMMA``:
  ``apply`` against ``to_dense()`` and against dense references built from
  the damped ``F̃``'s blocks (per-block dense solves; for the tridiagonal one
  ``F̂⁻¹`` assembled from the inverses of neighbouring block pairs), and
  ``np.linalg.inv(to_dense())`` against ``F̃`` on its tridiagonal blocks;
* a weight-sharing + dense network (random activations and errors, ``S = 2``
  labels per input) for ``WoodburyFisher`` with the damping that gives
  ``cond(λI + F) = WOODBURY_COND``: ``solve``, ``matvec`` and ``logdet``
  against ``F = G Gᵀ/N`` from per-example gradients formed in the check only.

The float32 problem is the float64 problem rounded to float32.  Every
reference is computed in float64 from the very inputs kronlin received (the
float32 ones cast up), so an error measures kronlin's arithmetic alone.

Each (method, size, dtype) gives one row: the relative error, the tolerance,
the time of kronlin's call and the ratio "dense solve time / kronlin time".
The dense solve is ``scipy.linalg.solve(np.kron(A, G), vec(X))`` in the same
dtype, ``np.kron`` included, because kronlin's timed calls also start from the
raw factors (see :func:`kronlin._selfcheck.timing.median_time`).  The network rows compare with the dense
solve of their own ``P x P`` matrix instead (the damped ``F̃`` on its
tridiagonal blocks, ``λI + F``), formed from the same inputs.

How an error is measured (the ``check`` column):

``dense``
    against the dense matrix ``np.kron(A, G)`` itself (``scipy.linalg.solve``,
    ``scipy.linalg.inv``, ``scipy.linalg.eigh``, ``np.linalg.slogdet``,
    ``np.linalg.norm``, or one shared dense Cholesky factor,
    ``scipy.linalg.cho_factor``, for the SPD solve and log-determinant);
    ``max|got - ref| / max|ref|``.
``rows``
    against a random sample of rows of the dense matrix: of ``np.kron(A, G)``,
    each row built as ``np.kron(A[i], G[j])``, where the whole matrix would
    not fit in memory; of the dense inverse, from the dense Cholesky factor,
    where a full ``scipy.linalg.inv`` would dominate the run time.
``resid``
    the residual of the defining equation, ``max|M y - x| / max|x|``, with
    ``M`` applied densely (``p*q <= DENSE_REF_LIMIT``) or as ``G @ Y @ A.T``
    in NumPy float64.
``ident``
    a Kronecker identity evaluated on the factors with NumPy/SciPy alone
    (``det(A ⊗ G) = det(A)^q det(G)^p``, ``‖A ⊗ I_q‖_* = q ‖A‖_*``, ...).
``diag``
    ``tr(A ⊗ G)`` as the sum of the dense diagonal ``np.kron(diag A, diag G)``.

Dense references are used where ``p*q <= DENSE_REF_LIMIT`` (4096; a float64
``np.kron`` of that order is 128 MiB).  The costliest of them (a dense
``eigh`` or SVD, a full ``scipy.linalg.inv``, an LU ``slogdet`` of the
``p*q`` square matrix) only where ``p*q <= SPECTRAL_REF_LIMIT`` (1024); up to
``DENSE_REF_LIMIT`` they are replaced by the dense Cholesky factor, a
residual with the dense matrix, or a Kronecker identity.  Larger sizes fall
back to ``rows``, ``resid`` or ``ident`` as listed above.  The network rows
are dense at every size: their parameter count is capped instead.
"""

from __future__ import annotations


from __future__ import annotations

import os
import sys
import time
import traceback
from typing import Optional

import numpy as np
import scipy.linalg

from .._threads import DEFAULT_THREADS, thread_limit
from .checks import BASE_TOL, CHECKS, tolerance
from .problems import DEFAULT_SIZES, DENSE_REF_LIMIT, QUICK_SIZES, SPECTRAL_REF_LIMIT, Problem, draw
from .report import COLUMNS, Row, format_row, header, legend, table_line
from .timing import fmt_time, median_time

__all__ = ["run", "CHECKS", "DEFAULT_SIZES", "QUICK_SIZES", "DENSE_REF_LIMIT", "SPECTRAL_REF_LIMIT"]


def _dense_solve_time(P: Problem) -> Optional[float]:
    if not P.dense:
        return None
    x = P.X.flatten(order="F")
    return median_time(lambda: scipy.linalg.solve(np.kron(P.A, P.G), x), repeats=3, min_repeats=2, budget=0.3)


def _run_one(kl, label: str, check, P: Problem, dense_time: Optional[float]) -> Row:
    try:
        res = check(kl, P)
        seconds = median_time(res.call)
    except Exception as exc:  # a raising method is a failed row, never a crashed self-check
        tb = traceback.extract_tb(exc.__traceback__)[-1]
        note = f"{type(exc).__name__}: {exc} (at {os.path.basename(tb.filename)}:{tb.lineno})"
        return Row(label, P.p, P.q, P.dtype, "raised", float("nan"), tolerance(P.dtype), None, None, False, note)
    tol = tolerance(P.dtype, res.kappa)
    ok = bool(np.isfinite(res.error) and res.error <= tol and res.passed_extra)
    if res.dense_time is not None:
        dense_time = res.dense_time
    speedup = None if dense_time is None or seconds <= 0 else dense_time / seconds
    return Row(label, P.p, P.q, P.dtype, res.check, res.error, tol, seconds, speedup, ok, res.note)


def _validate_args(sizes, dtypes):
    sizes = tuple((int(p), int(q)) for p, q in sizes)
    if not sizes or any(p < 1 or q < 1 for p, q in sizes):
        raise ValueError(f"sizes must be a non-empty sequence of (p, q) with p, q >= 1; got {sizes}")
    dtypes = tuple(np.dtype(d).name for d in dtypes)
    bad = [d for d in dtypes if d not in BASE_TOL]
    if not dtypes or bad:
        raise ValueError(f"dtypes must be drawn from {tuple(BASE_TOL)}; got {dtypes}")
    return sizes, dtypes


def run(sizes=DEFAULT_SIZES, dtypes=("float64", "float32"), seed: int = 0, out=None, threads=None) -> bool:
    """Check every public kronlin method against dense NumPy/SciPy and print a report.

    Parameters
    ----------
    sizes : sequence of (int, int)
        Factor orders ``(p, q)``; ``A`` is ``(p, p)``, ``G`` is ``(q, q)`` and
        ``X`` is ``(q, p)``.  Dense references are formed for
        ``p*q <= DENSE_REF_LIMIT`` (4096); beyond it, sampled rows, residuals
        and Kronecker identities are used (see the module docstring).
    dtypes : sequence of {"float64", "float32"}
        The dtypes kronlin is run in.  The float32 problem is the float64 one
        rounded; references are always computed in float64.
    seed : int
        Seed of the ``numpy.random.default_rng`` all problems are drawn from.
    out : text stream, optional
        Where the report goes; ``sys.stdout`` (looked up at call time) when None.
    threads : int, optional
        BLAS/OpenMP threads while checking and timing (``0``: the libraries'
        default); ``None`` pins :data:`kronlin._threads.DEFAULT_THREADS` (one)
        when threadpoolctl is installed (see :mod:`kronlin._threads`).

    Returns
    -------
    bool
        True when every row passed (error within tolerance, nothing raised).

    Notes
    -----
    One row per (method, size, dtype): relative error, tolerance (base
    ``1e-10`` float64 / ``1e-4`` float32, scaled by ``max(1, cond / 100)``
    for rows that involve an inverse), the median time of kronlin's call and
    the ratio of the dense solve time to it.
    """
    import kronlin as kl

    out = sys.stdout if out is None else out
    sizes, dtypes = _validate_args(sizes, dtypes)
    limit, threads_text = thread_limit(DEFAULT_THREADS if threads is None else threads, required=threads is not None)
    with limit:
        return _run(kl, sizes, dtypes, seed, out, threads_text)


def _run(kl, sizes, dtypes, seed, out, threads_text) -> bool:
    rng = np.random.default_rng(seed)
    t_start = time.perf_counter()

    header(kl, out)
    print(threads_text, file=out)
    print(f"seed {seed}; sizes {', '.join(f'{p}x{q}' for p, q in sizes)}; dtypes {', '.join(dtypes)}", file=out)
    legend(out)
    print("", file=out)
    head = table_line(tuple(name for name, _, _ in COLUMNS))
    print(head, file=out)
    print("-" * len(head), file=out)

    rows: list[Row] = []
    for p, q in sizes:
        base, sample = draw(rng, seed, p, q)
        n = p * q
        for dtype in dtypes:
            P = Problem(base, dtype, sample)
            dense_time = _dense_solve_time(P)
            if P.dense:
                where = f"dense solve {fmt_time(dense_time)}"
            else:
                where = f"p*q > {DENSE_REF_LIMIT}: no dense matrix, no dense solve"
            print(f"# p={p} q={q} (p*q={n}) {dtype}: {where}", file=out)
            print(f"#   batch_factors, Block*Inverse: {P.mlp.describe()}", file=out)
            print(f"#   WoodburyFisher: {P.woodbury.describe()}", file=out)
            for label, check in CHECKS:
                row = _run_one(kl, label, check, P, dense_time)
                rows.append(row)
                print(format_row(row), file=out)
                if row.note:
                    print(f"    -> {row.note}", file=out)
                out.flush()
            del P  # release the dense matrices before the next problem

    failed = [r for r in rows if not r.ok]
    elapsed = time.perf_counter() - t_start
    print("-" * len(head), file=out)
    if failed:
        print(f"FAILED: {len(failed)} of {len(rows)} checks failed ({elapsed:.1f} s):", file=out)
        for r in failed:
            what = r.note if r.check == "raised" else f"error {r.error:.2e} > tol {r.tol:.0e}"
            if r.note and r.check != "raised":
                what += f"; {r.note}"
            print(f"  {r.method}  p={r.p} q={r.q} {r.dtype}: {what}", file=out)
    else:
        print(f"OK: all {len(rows)} checks passed ({elapsed:.1f} s).", file=out)
    out.flush()
    return not failed
