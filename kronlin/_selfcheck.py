"""Self-check behind ``python -m kronlin``: every public method against dense NumPy/SciPy.

For each problem size ``(p, q)`` and dtype, random factors are drawn from
``numpy.random.default_rng(seed)``:

* symmetric positive definite ``A`` (p, p) and ``G`` (q, q) with eigenvalues
  log-spaced in ``[1/COND, 1]`` (condition number ``COND = 1e2`` each, so
  ``cond(A ⊗ G) = 1e4``) in a random orthonormal basis;
* non-symmetric ``An`` (p, p), ``Gn`` (q, q) with singular values log-spaced in
  ``[1/COND, 1]``, used for the products and the transpose (a symmetric
  factor cannot tell ``A`` from ``Aᵀ``) and for the general (LU) solve;
* a right-hand side ``X`` (q, p) and a block ``V`` (p*q, 4) of flat vectors.

The float32 problem is the float64 problem rounded to float32.  Every
reference is computed in float64 from the very inputs kronlin received (the
float32 ones cast up), so an error measures kronlin's arithmetic alone.

Each (method, size, dtype) gives one row: the relative error, the tolerance,
the time of kronlin's call and the ratio "dense solve time / kronlin time".
The dense solve is ``scipy.linalg.solve(np.kron(A, G), vec(X))`` in the same
dtype, ``np.kron`` included, because kronlin's timed calls also start from the
raw factors (see :func:`_best_time`).

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
back to ``rows``, ``resid`` or ``ident`` as listed above.
"""

from __future__ import annotations

import math
import os
import platform
import sys
import time
import traceback
from dataclasses import dataclass
from functools import cached_property
from typing import Callable, Optional

import numpy as np
import scipy
import scipy.linalg
import scipy.sparse.linalg

__all__ = ["run", "DEFAULT_SIZES", "QUICK_SIZES", "DENSE_REF_LIMIT", "SPECTRAL_REF_LIMIT"]

#: Problem sizes ``(p, q)`` of a full run and of ``--quick``.
DEFAULT_SIZES = ((8, 5), (64, 48), (256, 192))
QUICK_SIZES = ((8, 5), (24, 16))

#: Largest ``p*q`` for which the dense ``(p*q, p*q)`` matrix is formed and solved.
DENSE_REF_LIMIT = 4096
#: Largest ``p*q`` for which a dense ``eigh``/SVD/inverse/LU of that matrix serves as reference.
SPECTRAL_REF_LIMIT = 1024

#: Condition number of each generated factor (so ``cond(A ⊗ G) = COND**2``).
COND = 1e2
#: Tikhonov damping of the ``KronEigh`` solve and power checks.
DAMPING = 1e-3
#: ``gamma`` of the ``factored_damping`` check.
GAMMA = 1e-2
#: The CG check runs on ``Kron(A + CG_SHIFT*I, G + CG_SHIFT*I)`` (condition ~300)
#: so that it converges in a few hundred iterations at every size.
CG_SHIFT = 5e-2
#: Iteration cap of the CG check (it needs about 250 at the default settings).
CG_MAXITER = 2000
#: Number of flat right-hand sides for ``matmat`` and sampled rows for ``rows``.
MATMAT_K = 4
SAMPLED_ROWS = 128

# Tolerance rule.  The base tolerances (1e-10 float64, 1e-4 float32) are set
# for well-conditioned work: products, traces, norms, and anything whose
# conditioning is at most that of one factor (COND = 1e2).  Where the result
# involves an inverse (solve, inv, logdet, damped eigenbasis solve, inverse
# power, CG) its forward error (or its residual relative to ||x||) can grow like
# kappa * eps, kappa the 2-norm condition number of the matrix inverted, so
# such rows use  tol = base * max(1, kappa / KAPPA_REF)  with KAPPA_REF = COND.
BASE_TOL = {"float64": 1e-10, "float32": 1e-4}
KAPPA_REF = COND


def _tolerance(dtype: str, kappa: float = 1.0) -> float:
    """Tolerance of one row: ``BASE_TOL[dtype] * max(1, kappa / KAPPA_REF)``."""
    return BASE_TOL[dtype] * max(1.0, kappa / KAPPA_REF)


# -- problem generation ----------------------------------------------------------


def _orthonormal(rng: np.random.Generator, n: int) -> np.ndarray:
    Q, R = np.linalg.qr(rng.standard_normal((n, n)))
    return Q * np.sign(np.diag(R))


def _spectrum(n: int, cond: float) -> np.ndarray:
    return np.logspace(0.0, -math.log10(cond), n) if n > 1 else np.ones(1)


def _spd(rng: np.random.Generator, n: int, cond: float) -> np.ndarray:
    """Symmetric positive definite, eigenvalues log-spaced in ``[1/cond, 1]``, exactly symmetric."""
    Q = _orthonormal(rng, n)
    M = (Q * _spectrum(n, cond)) @ Q.T
    return (M + M.T) / 2


def _general(rng: np.random.Generator, n: int, cond: float) -> np.ndarray:
    """Non-symmetric, singular values log-spaced in ``[1/cond, 1]``."""
    U, W = _orthonormal(rng, n), _orthonormal(rng, n)
    return (U * _spectrum(n, cond)) @ W.T


def _vec(X: np.ndarray) -> np.ndarray:
    """Column-stacking ``vec`` (DESIGN §1)."""
    return np.asarray(X, dtype=np.float64).flatten(order="F")


def _f64(x) -> np.ndarray:
    return np.asarray(x, dtype=np.float64)


def _relerr(got, ref) -> float:
    """``max|got - ref| / max|ref|`` in float64 (absolute when the reference is zero)."""
    got, ref = _f64(got), _f64(ref)
    if got.shape != ref.shape:
        raise ValueError(f"result has shape {got.shape}, reference {ref.shape}")
    scale = float(np.max(np.abs(ref))) if ref.size else 0.0
    diff = float(np.max(np.abs(got - ref))) if ref.size else 0.0
    return diff / scale if scale > 0 else diff


def _kron_rows(A: np.ndarray, G: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """Rows ``rows`` of ``np.kron(A, G)``: row ``r`` is ``np.kron(A[r // q], G[r % q])``."""
    p, q = A.shape[0], G.shape[0]
    return (A[rows // q][:, :, None] * G[rows % q][:, None, :]).reshape(len(rows), p * q)


class _Problem:
    """One random problem of size ``(p, q)`` in one dtype, with cached float64 references."""

    def __init__(self, base: dict, dtype: str, rows: np.ndarray):
        self.p, self.q, self.dtype = base["p"], base["q"], dtype
        self.n = self.p * self.q
        cast = {k: base[k].astype(dtype) for k in ("A", "G", "An", "Gn", "X", "V")}
        self.A, self.G, self.An, self.Gn, self.X, self.V = (cast[k] for k in ("A", "G", "An", "Gn", "X", "V"))
        # the inputs kronlin receives, cast up exactly: every reference starts from these
        self.A64, self.G64, self.An64, self.Gn64, self.X64, self.V64 = (
            _f64(cast[k]) for k in ("A", "G", "An", "Gn", "X", "V")
        )
        self.x64 = _vec(self.X64)
        self.rows = rows
        self.dense = self.n <= DENSE_REF_LIMIT
        self.spectral = self.n <= SPECTRAL_REF_LIMIT
        lam = _spectrum(self.p, COND)
        mu = _spectrum(self.q, COND)
        self.kappa = float(lam[0] / lam[-1] * mu[0] / mu[-1])  # cond(A ⊗ G) = cond(A) cond(G)
        self.lmax, self.lmin = float(lam[0] * mu[0]), float(lam[-1] * mu[-1])
        self.kappa_damped = (self.lmax + DAMPING) / (self.lmin + DAMPING)
        la_c, lg_c = lam + CG_SHIFT, mu + CG_SHIFT
        self.kappa_cg = float(la_c[0] * lg_c[0] / (la_c[-1] * lg_c[-1]))

    # dense float64 references, built on first use ------------------------------
    @cached_property
    def K(self) -> np.ndarray:
        return np.kron(self.A64, self.G64)

    @cached_property
    def Kn(self) -> np.ndarray:
        return np.kron(self.An64, self.Gn64)

    @cached_property
    def K_cho(self):
        """Dense Cholesky factor of ``np.kron(A, G)``, shared by the SPD solve, inverse and logdet references."""
        return scipy.linalg.cho_factor(self.K, lower=True)

    @cached_property
    def Kn_rows(self) -> np.ndarray:
        """Sampled rows of ``np.kron(An, Gn)`` (for sizes too large to form it)."""
        return _kron_rows(self.An64, self.Gn64, self.rows)

    def kmul(self, A64, G64, Y) -> np.ndarray:
        """``(A ⊗ G) vec(Y)`` as a ``(q, p)`` array, in NumPy float64 (``G @ Y @ A.T``)."""
        return G64 @ _f64(Y) @ A64.T


# -- timing ------------------------------------------------------------------------


def _best_time(fn: Callable[[], object], repeats: int = 5, min_repeats: int = 3, budget: float = 0.1) -> float:
    """Best wall time of ``fn()`` in seconds (``time.perf_counter``).

    ``fn`` has already been called once (the checked call, which also warms
    caches and lazy imports).  It is then run at least ``min_repeats`` and at
    most ``repeats`` times, stopping early once ``budget`` seconds are spent; a
    single call longer than ``2.5 * budget`` is run once only.  Calls shorter
    than a millisecond are looped so that each measurement spans about 1 ms.
    Every timed kronlin call starts from the raw factors (``Kron(A, G)...``),
    so construction and any factorization are included: kronlin caches
    factorizations on an operator, and the dense solve refactors every time.
    """
    t0 = time.perf_counter()
    fn()
    first = time.perf_counter() - t0
    best, spent, count = first, first, 1
    if first > 2.5 * budget:
        return best
    number = 1 if first >= 1e-3 else min(1000, max(1, int(1e-3 / max(first, 1e-7))))
    while count < repeats and (count < min_repeats or spent < budget):
        t0 = time.perf_counter()
        for _ in range(number):
            fn()
        dt = time.perf_counter() - t0
        best = min(best, dt / number)
        spent += dt
        count += 1
    return best


def _fmt_time(t: Optional[float]) -> str:
    if t is None:
        return "-"
    if t < 1e-3:
        return f"{t * 1e6:.1f} us"
    if t < 1.0:
        return f"{t * 1e3:.2f} ms"
    return f"{t:.2f} s"


# -- the checks ------------------------------------------------------------------------


@dataclass
class _Outcome:
    """What one check returns: how it was checked, the error, the condition number for its tolerance."""

    check: str
    error: float
    kappa: float
    call: Callable[[], object]
    note: str = ""
    passed_extra: bool = True


def _check_matmul(kl, P: _Problem) -> _Outcome:
    call = lambda: kl.Kron(P.An, P.Gn) @ P.X  # noqa: E731
    got = _vec(call())
    if P.dense:
        return _Outcome("dense", _relerr(got, P.Kn @ P.x64), 1.0, call)
    return _Outcome("rows", _relerr(got[P.rows], P.Kn_rows @ P.x64), 1.0, call)


def _check_matmat(kl, P: _Problem) -> _Outcome:
    call = lambda: kl.Kron(P.An, P.Gn).matmat(P.V)  # noqa: E731
    got = _f64(call())
    if P.dense:
        return _Outcome("dense", _relerr(got, P.Kn @ P.V64), 1.0, call)
    return _Outcome("rows", _relerr(got[P.rows], P.Kn_rows @ P.V64), 1.0, call)


def _check_transpose(kl, P: _Problem) -> _Outcome:
    call = lambda: kl.Kron(P.An, P.Gn).T @ P.X  # noqa: E731
    got = _vec(call())
    if P.dense:
        return _Outcome("dense", _relerr(got, P.Kn.T @ P.x64), 1.0, call)
    ref = _kron_rows(P.An64.T, P.Gn64.T, P.rows) @ P.x64  # rows of (A ⊗ G)ᵀ = Aᵀ ⊗ Gᵀ
    return _Outcome("rows", _relerr(got[P.rows], ref), 1.0, call)


def _check_solve_spd(kl, P: _Problem) -> _Outcome:
    call = lambda: kl.Kron(P.A, P.G).solve(P.X)  # noqa: E731
    Y = call()
    if P.dense:
        ref = scipy.linalg.cho_solve(P.K_cho, P.x64)
        return _Outcome("dense", _relerr(_vec(Y), ref), P.kappa, call)
    return _Outcome("resid", _relerr(P.kmul(P.A64, P.G64, Y), P.X64), P.kappa, call)


def _check_solve_general(kl, P: _Problem) -> _Outcome:
    call = lambda: kl.Kron(P.An, P.Gn).solve(P.X)  # noqa: E731
    Y = call()
    if P.dense:
        ref = scipy.linalg.solve(P.Kn, P.x64)
        return _Outcome("dense", _relerr(_vec(Y), ref), P.kappa, call)
    return _Outcome("resid", _relerr(P.kmul(P.An64, P.Gn64, Y), P.X64), P.kappa, call)


def _check_inv(kl, P: _Problem) -> _Outcome:
    call = lambda: kl.Kron(P.A, P.G).inv()  # noqa: E731
    Kinv = call()
    if P.spectral:
        return _Outcome("dense", _relerr(Kinv.to_dense(), scipy.linalg.inv(P.K)), P.kappa, call)
    if P.dense:  # sampled rows of the dense inverse (symmetric: rows = columns), from its Cholesky factor
        E = np.zeros((P.n, len(P.rows)))
        E[P.rows, np.arange(len(P.rows))] = 1.0
        ref = scipy.linalg.cho_solve(P.K_cho, E).T
        return _Outcome("rows", _relerr(_f64(Kinv.to_dense())[P.rows], ref), P.kappa, call)
    return _Outcome("resid", _relerr(P.kmul(P.A64, P.G64, Kinv @ P.X), P.X64), P.kappa, call)


def _check_logdet(kl, P: _Problem) -> _Outcome:
    call = lambda: kl.Kron(P.A, P.G).logdet()  # noqa: E731
    got = float(call())
    if P.spectral:
        sign, ref = np.linalg.slogdet(P.K)
        note = "" if sign > 0 else f"reference determinant sign {sign}"
        return _Outcome("dense", _relerr(got, ref), P.kappa, call, note, sign > 0)
    if P.dense:  # log det from the dense Cholesky factor (K is SPD)
        ref = 2.0 * float(np.sum(np.log(np.diag(P.K_cho[0]))))
        return _Outcome("dense", _relerr(got, ref), P.kappa, call)
    (sa, la), (sg, lg) = np.linalg.slogdet(P.A64), np.linalg.slogdet(P.G64)
    return _Outcome("ident", _relerr(got, P.q * la + P.p * lg), P.kappa, call)


def _check_trace(kl, P: _Problem) -> _Outcome:
    call = lambda: kl.Kron(P.A, P.G).trace()  # noqa: E731
    got = float(call())
    if P.dense:
        return _Outcome("dense", _relerr(got, np.trace(P.K)), 1.0, call)
    ref = float(np.sum(np.kron(np.diag(P.A64), np.diag(P.G64))))
    return _Outcome("diag", _relerr(got, ref), 1.0, call)


def _check_eigh_solve(kl, P: _Problem) -> _Outcome:
    call = lambda: kl.Kron(P.A, P.G).eigh().solve(P.X, DAMPING)  # noqa: E731
    Y = call()
    if P.dense:
        ref = scipy.linalg.solve(P.K + DAMPING * np.eye(P.n), P.x64, assume_a="pos")
        return _Outcome("dense", _relerr(_vec(Y), ref), P.kappa_damped, call)
    resid = P.kmul(P.A64, P.G64, Y) + DAMPING * _f64(Y)
    return _Outcome("resid", _relerr(resid, P.X64), P.kappa_damped, call)


def _check_power(kl, P: _Problem) -> _Outcome:
    call = lambda: kl.Kron(P.A, P.G).eigh().power(P.X, -0.5, DAMPING)  # noqa: E731
    Y = call()
    if P.spectral:
        w, Q = scipy.linalg.eigh(P.K + DAMPING * np.eye(P.n))
        ref = Q @ ((Q.T @ P.x64) / np.sqrt(w))
        return _Outcome("dense", _relerr(_vec(Y), ref), P.kappa_damped, call)
    # resid: M^{-1/2} applied twice must solve M z = x, M = A ⊗ G + damping*I
    Z = _f64(kl.Kron(P.A, P.G).eigh().power(Y, -0.5, DAMPING))
    Mz = (P.K @ _vec(Z)).reshape((P.q, P.p), order="F") if P.dense else P.kmul(P.A64, P.G64, Z)
    return _Outcome("resid", _relerr(Mz + DAMPING * Z, P.X64), P.kappa_damped, call)


def _square(d):
    return d * d


def _check_apply(kl, P: _Problem) -> _Outcome:
    call = lambda: kl.Kron(P.A, P.G).eigh().apply(P.X, _square)  # noqa: E731
    got = call()
    # f(d) = d**2, so the reference is (A ⊗ G)^2 vec(X)
    if P.dense:
        return _Outcome("dense", _relerr(_vec(got), P.K @ (P.K @ P.x64)), 1.0, call)
    ref = P.kmul(P.A64, P.G64, P.kmul(P.A64, P.G64, P.X64))
    return _Outcome("ident", _relerr(got, ref), 1.0, call)


_NORM_ORD = {"trace": "nuc", "fro": "fro", "spectral": 2}


def _pi_reference(P: _Problem, norm: str):
    """``sqrt(‖A ⊗ I_q‖ / ‖I_p ⊗ G‖)`` (K-FAC §6.3) and how it was computed."""
    ord_ = _NORM_ORD[norm]
    if P.dense and (norm == "fro" or P.spectral):
        nA = np.linalg.norm(np.kron(P.A64, np.eye(P.q)), ord_)
        nG = np.linalg.norm(np.kron(np.eye(P.p), P.G64), ord_)
        return math.sqrt(nA / nG), "dense"
    # ‖A ⊗ I_q‖_* = q ‖A‖_*,  ‖A ⊗ I_q‖_F = sqrt(q) ‖A‖_F,  ‖A ⊗ I_q‖_2 = ‖A‖_2
    mult = {"trace": (P.q, P.p), "fro": (math.sqrt(P.q), math.sqrt(P.p)), "spectral": (1.0, 1.0)}[norm]
    nA = mult[0] * np.linalg.norm(P.A64, ord_)
    nG = mult[1] * np.linalg.norm(P.G64, ord_)
    return math.sqrt(nA / nG), "ident"


def _make_pi_check(norm: str):
    def check(kl, P: _Problem) -> _Outcome:
        call = lambda: kl.pi_factor(P.A, P.G, norm)  # noqa: E731
        got = float(call())
        ref, how = _pi_reference(P, norm)
        return _Outcome(how, _relerr(got, ref), 1.0, call)

    check.__name__ = f"_check_pi_{norm}"
    return check


def _check_factored_damping(kl, P: _Problem) -> _Outcome:
    call = lambda: kl.factored_damping(P.A, P.G, GAMMA)  # noqa: E731
    op = call()
    pi, _ = _pi_reference(P, "trace")
    Ad = P.A64 + pi * GAMMA * np.eye(P.p)
    Gd = P.G64 + GAMMA / pi * np.eye(P.q)
    if P.dense:
        return _Outcome("dense", _relerr(op.to_dense(), np.kron(Ad, Gd)), 1.0, call)
    # P.rows sampled rows of the dense np.kron(Ad, Gd)
    got = _vec(op @ P.X)
    return _Outcome("rows", _relerr(got[P.rows], _kron_rows(Ad, Gd, P.rows) @ P.x64), 1.0, call)


def _check_cg(kl, P: _Problem) -> _Outcome:
    dt = np.dtype(P.dtype)
    Ac = P.A + dt.type(CG_SHIFT) * np.eye(P.p, dtype=dt)
    Gc = P.G + dt.type(CG_SHIFT) * np.eye(P.q, dtype=dt)
    b = P.X.flatten(order="F")
    rtol = BASE_TOL[P.dtype] / 10

    def call():
        L = kl.Kron(Ac, Gc).aslinearoperator()
        return scipy.sparse.linalg.cg(L, b, rtol=rtol, atol=0.0, maxiter=CG_MAXITER)

    x, info = call()
    A64, G64 = _f64(Ac), _f64(Gc)
    if P.dense:
        r = np.kron(A64, G64) @ _f64(x)
    else:
        r = _vec(P.kmul(A64, G64, _f64(x).reshape((P.q, P.p), order="F")))
    note = "" if info == 0 else f"cg did not converge (info={info})"
    return _Outcome("resid", _relerr(r, P.x64), P.kappa_cg, call, note, info == 0)


#: (row label, check) in the order they are printed.
CHECKS = (
    ("Kron @ X", _check_matmul),
    ("Kron.matmat(V)", _check_matmat),
    ("Kron.T @ X", _check_transpose),
    ("Kron.solve (SPD)", _check_solve_spd),
    ("Kron.solve (general)", _check_solve_general),
    ("Kron.inv()", _check_inv),
    ("Kron.logdet()", _check_logdet),
    ("Kron.trace()", _check_trace),
    ("KronEigh.solve(X, d)", _check_eigh_solve),
    ("KronEigh.power(X, -1/2, d)", _check_power),
    ("KronEigh.apply(X, d**2)", _check_apply),
    ("pi_factor(norm='trace')", _make_pi_check("trace")),
    ("pi_factor(norm='fro')", _make_pi_check("fro")),
    ("pi_factor(norm='spectral')", _make_pi_check("spectral")),
    ("factored_damping(A, G, g)", _check_factored_damping),
    ("aslinearoperator() + cg", _check_cg),
)


# -- report --------------------------------------------------------------------------------


@dataclass
class _Row:
    method: str
    p: int
    q: int
    dtype: str
    check: str
    error: float
    tol: float
    seconds: Optional[float]
    speedup: Optional[float]
    ok: bool
    note: str = ""


_COLUMNS = (
    ("method", 27, "<"),
    ("p", 4, ">"),
    ("q", 4, ">"),
    ("dtype", 8, "<"),
    ("check", 6, "<"),
    ("error", 9, ">"),
    ("tol", 8, ">"),
    ("time", 10, ">"),
    ("dense/kronlin", 13, ">"),
    ("status", 6, "<"),
)


def _line(values) -> str:
    return "  ".join(f"{v:{align}{width}}" for v, (_, width, align) in zip(values, _COLUMNS)).rstrip()


def _format_row(r: _Row) -> str:
    err = "ERROR" if r.check == "raised" else (f"{r.error:.2e}" if np.isfinite(r.error) else str(r.error))
    speed = "-" if r.speedup is None else (f"{r.speedup:.3g}x" if r.speedup < 1e4 else f"{r.speedup:.2e}x")
    return _line(
        (r.method, r.p, r.q, r.dtype, r.check, err, f"{r.tol:.0e}", _fmt_time(r.seconds), speed,
         "ok" if r.ok else "FAIL")
    )


def _header(kl, out) -> None:
    info = kl.extension_info()
    w = lambda s="": print(s, file=out)  # noqa: E731
    w("kronlin self-check")
    w("=" * 18)
    w(f"kronlin {kl.__version__} ({os.path.dirname(kl.__file__)})")
    w(f"numpy {np.__version__}, scipy {scipy.__version__}, python {platform.python_version()}, "
      f"{platform.machine()}, {os.cpu_count()} CPUs")
    w("extension_info(): " + ", ".join(f"{k}={v}" for k, v in info.items()))
    if not info.get("cpu_extension") or info.get("disabled"):
        from . import _ext

        if not info.get("cpu_extension"):
            why = f"it is not built or failed to import ({_ext.cpu_import_error})."
            fix = "Install kronlin (pip install .) and run from outside the source tree, which has no compiled module."
        else:
            why = "it is disabled (KRONLIN_DISABLE_EXT is set)."
            fix = "Unset KRONLIN_DISABLE_EXT to use the compiled kernels."
        w("")
        w("!" * 78)
        w("WARNING: the compiled CPU extension kronlin._C is NOT in use:")
        w(f"  {why}")
        w("  Every kernel runs its NumPy reference implementation, so the timings below")
        w("  are not those of the compiled build.")
        w(f"  {fix}")
        w("!" * 78)


def _legend(out) -> None:
    w = lambda s="": print(s, file=out)  # noqa: E731
    w("")
    w(f"A (p,p), G (q,q): SPD with cond {COND:.0e} each (cond(A (x) G) = {COND**2:.0e}); products, .T and the")
    w("general solve use non-symmetric factors with singular values in the same range.")
    w(f"d = damping {DAMPING:g}; g = gamma {GAMMA:g}; cg on Kron(A + {CG_SHIFT:g} I, G + {CG_SHIFT:g} I).")
    w("error  = max|kronlin - reference| / max|reference|, references in float64 from the same inputs;")
    w("         check: dense = dense matrix, rows = sampled dense rows, resid = max|M y - x| / max|x|,")
    w("                ident = Kronecker identity on the factors, diag = dense diagonal")
    w(f"tol    = {BASE_TOL['float64']:.0e} (float64) / {BASE_TOL['float32']:.0e} (float32), times "
      f"max(1, cond/{KAPPA_REF:.0e}) where an inverse is involved")
    w("time   = best of up to 5 runs of the kronlin call from the raw factors (factorizations included)")
    w("dense/kronlin = time of scipy.linalg.solve(np.kron(A, G), vec(X)) / kronlin time, same size and")
    w(f"         dtype ('-' where p*q > {DENSE_REF_LIMIT}: the dense matrix is too large to form)")


def _dense_solve_time(P: _Problem) -> Optional[float]:
    if not P.dense:
        return None
    x = P.X.flatten(order="F")
    return _best_time(lambda: scipy.linalg.solve(np.kron(P.A, P.G), x), repeats=3, min_repeats=2, budget=0.3)


def _run_one(kl, label: str, check, P: _Problem, dense_time: Optional[float]) -> _Row:
    try:
        res = check(kl, P)
        seconds = _best_time(res.call)
    except Exception as exc:  # a raising method is a failed row, never a crashed self-check
        tb = traceback.extract_tb(exc.__traceback__)[-1]
        note = f"{type(exc).__name__}: {exc} (at {os.path.basename(tb.filename)}:{tb.lineno})"
        return _Row(label, P.p, P.q, P.dtype, "raised", float("nan"), _tolerance(P.dtype), None, None, False, note)
    tol = _tolerance(P.dtype, res.kappa)
    ok = bool(np.isfinite(res.error) and res.error <= tol and res.passed_extra)
    speedup = None if dense_time is None or seconds <= 0 else dense_time / seconds
    return _Row(label, P.p, P.q, P.dtype, res.check, res.error, tol, seconds, speedup, ok, res.note)


def _validate_args(sizes, dtypes):
    sizes = tuple((int(p), int(q)) for p, q in sizes)
    if not sizes or any(p < 1 or q < 1 for p, q in sizes):
        raise ValueError(f"sizes must be a non-empty sequence of (p, q) with p, q >= 1; got {sizes}")
    dtypes = tuple(np.dtype(d).name for d in dtypes)
    bad = [d for d in dtypes if d not in BASE_TOL]
    if not dtypes or bad:
        raise ValueError(f"dtypes must be drawn from {tuple(BASE_TOL)}; got {dtypes}")
    return sizes, dtypes


def run(sizes=DEFAULT_SIZES, dtypes=("float64", "float32"), seed: int = 0, out=None) -> bool:
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

    Returns
    -------
    bool
        True when every row passed (error within tolerance, nothing raised).

    Notes
    -----
    One row per (method, size, dtype): relative error, tolerance (base
    ``1e-10`` float64 / ``1e-4`` float32, scaled by ``max(1, cond / 100)``
    for rows that involve an inverse), the best time of kronlin's call and
    the ratio of the dense solve time to it.
    """
    import kronlin as kl

    out = sys.stdout if out is None else out
    sizes, dtypes = _validate_args(sizes, dtypes)
    rng = np.random.default_rng(seed)
    t_start = time.perf_counter()

    _header(kl, out)
    print(f"seed {seed}; sizes {', '.join(f'{p}x{q}' for p, q in sizes)}; dtypes {', '.join(dtypes)}", file=out)
    _legend(out)
    print("", file=out)
    head = _line(tuple(name for name, _, _ in _COLUMNS))
    print(head, file=out)
    print("-" * len(head), file=out)

    rows: list[_Row] = []
    for p, q in sizes:
        base = {
            "p": p,
            "q": q,
            "A": _spd(rng, p, COND),
            "G": _spd(rng, q, COND),
            "An": _general(rng, p, COND),
            "Gn": _general(rng, q, COND),
            "X": rng.standard_normal((q, p)),
            "V": rng.standard_normal((p * q, MATMAT_K)),
        }
        n = p * q
        sample = np.sort(rng.choice(n, size=min(n, SAMPLED_ROWS), replace=False))
        for dtype in dtypes:
            P = _Problem(base, dtype, sample)
            dense_time = _dense_solve_time(P)
            if P.dense:
                where = f"dense solve {_fmt_time(dense_time)}"
            else:
                where = f"p*q > {DENSE_REF_LIMIT}: no dense matrix, no dense solve"
            print(f"# p={p} q={q} (p*q={n}) {dtype}: {where}", file=out)
            for label, check in CHECKS:
                row = _run_one(kl, label, check, P, dense_time)
                rows.append(row)
                print(_format_row(row), file=out)
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
