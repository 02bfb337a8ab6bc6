"""One check per public method: the kronlin call, its reference, the error and the condition for its tolerance.

Each check takes the kronlin module and a :class:`~kronlin._selfcheck.problems.Problem`
and returns an :class:`Outcome`; :data:`CHECKS` lists them in the order the
report prints them.  How each error is measured (``dense``, ``rows``,
``resid``, ``ident``, ``diag``) is described in :mod:`kronlin._selfcheck`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Optional

import numpy as np
import scipy.linalg
import scipy.sparse.linalg

from ..testing import kfac_factors, kron_rows, layers_vec, vec
from .problems import (
    CG_MAXITER,
    CG_SHIFT,
    COND,
    DAMPING,
    GAMMA,
    NET_GAMMA,
    Problem,
    WoodburyProblem,
    f64,
)

__all__ = ["BASE_TOL", "KAPPA_REF", "tolerance", "Outcome", "CHECKS"]

# Tolerance rule.  The base tolerances (1e-10 float64, 1e-4 float32) are set
# for well-conditioned work: products, traces, norms, and anything whose
# conditioning is at most that of one factor (COND = 1e2).  Where the result
# involves an inverse (solve, inv, logdet, damped eigenbasis solve, inverse
# power, CG) its forward error (or its residual relative to ||x||) can grow like
# kappa * eps, kappa the 2-norm condition number of the matrix inverted, so
# such rows use  tol = base * max(1, kappa / KAPPA_REF)  with KAPPA_REF = COND.
BASE_TOL = {"float64": 1e-10, "float32": 1e-4}
KAPPA_REF = COND


def tolerance(dtype: str, kappa: float = 1.0) -> float:
    """Tolerance of one row: ``BASE_TOL[dtype] * max(1, kappa / KAPPA_REF)``."""
    return BASE_TOL[dtype] * max(1.0, kappa / KAPPA_REF)


_FACTOR_KEYS = ("A_diag", "G_diag", "A_off", "G_off")


def relerr(got, ref) -> float:
    """``max|got - ref| / max|ref|`` in float64 (absolute when the reference is zero)."""
    got, ref = f64(got), f64(ref)
    if got.shape != ref.shape:
        raise ValueError(f"result has shape {got.shape}, reference {ref.shape}")
    scale = float(np.max(np.abs(ref))) if ref.size else 0.0
    diff = float(np.max(np.abs(got - ref))) if ref.size else 0.0
    return diff / scale if scale > 0 else diff


@dataclass
class Outcome:
    """What one check returns: how it was checked, the error, the condition number for its tolerance."""

    check: str
    error: float
    kappa: float
    call: Callable[[], object]
    note: str = ""
    passed_extra: bool = True
    #: time of the dense solve this row is compared with, where that is not the problem's
    #: ``np.kron(A, G)`` solve (the network rows: their own ``P x P`` matrix)
    dense_time: Optional[float] = None


def _check_matmul(kl, P: Problem) -> Outcome:
    call = lambda: kl.Kron(P.An, P.Gn) @ P.X  # noqa: E731
    got = vec(call())
    if P.dense:
        return Outcome("dense", relerr(got, P.Kn @ P.x64), 1.0, call)
    return Outcome("rows", relerr(got[P.rows], P.Kn_rows @ P.x64), 1.0, call)


def _check_matmat(kl, P: Problem) -> Outcome:
    call = lambda: kl.Kron(P.An, P.Gn).matmat(P.V)  # noqa: E731
    got = f64(call())
    if P.dense:
        return Outcome("dense", relerr(got, P.Kn @ P.V64), 1.0, call)
    return Outcome("rows", relerr(got[P.rows], P.Kn_rows @ P.V64), 1.0, call)


def _check_transpose(kl, P: Problem) -> Outcome:
    call = lambda: kl.Kron(P.An, P.Gn).T @ P.X  # noqa: E731
    got = vec(call())
    if P.dense:
        return Outcome("dense", relerr(got, P.Kn.T @ P.x64), 1.0, call)
    ref = kron_rows(P.An64.T, P.Gn64.T, P.rows) @ P.x64  # rows of (A ⊗ G)ᵀ = Aᵀ ⊗ Gᵀ
    return Outcome("rows", relerr(got[P.rows], ref), 1.0, call)


def _make_solve_check(general: bool):
    """``Kron.solve`` with the SPD factors (Cholesky; reference from the dense Cholesky factor) or the
    non-symmetric ones (LU; reference ``scipy.linalg.solve``)."""
    def check(kl, P: Problem) -> Outcome:
        A, G, A64, G64 = (P.An, P.Gn, P.An64, P.Gn64) if general else (P.A, P.G, P.A64, P.G64)
        call = lambda: kl.Kron(A, G).solve(P.X)  # noqa: E731
        Y = call()
        if P.dense:
            ref = scipy.linalg.solve(P.Kn, P.x64) if general else scipy.linalg.cho_solve(P.K_cho, P.x64)
            return Outcome("dense", relerr(vec(Y), ref), P.kappa, call)
        return Outcome("resid", relerr(P.kmul(A64, G64, Y), P.X64), P.kappa, call)

    check.__name__ = f"_check_solve_{'general' if general else 'spd'}"
    return check


def _check_inv(kl, P: Problem) -> Outcome:
    call = lambda: kl.Kron(P.A, P.G).inv()  # noqa: E731
    Kinv = call()
    if P.spectral:
        return Outcome("dense", relerr(Kinv.to_dense(), scipy.linalg.inv(P.K)), P.kappa, call)
    if P.dense:  # sampled rows of the dense inverse (symmetric: rows = columns), from its Cholesky factor
        E = np.zeros((P.n, len(P.rows)))
        E[P.rows, np.arange(len(P.rows))] = 1.0
        ref = scipy.linalg.cho_solve(P.K_cho, E).T
        return Outcome("rows", relerr(f64(Kinv.to_dense())[P.rows], ref), P.kappa, call)
    return Outcome("resid", relerr(P.kmul(P.A64, P.G64, Kinv @ P.X), P.X64), P.kappa, call)


def _check_logdet(kl, P: Problem) -> Outcome:
    call = lambda: kl.Kron(P.A, P.G).logdet()  # noqa: E731
    got = float(call())
    if P.spectral:
        sign, ref = np.linalg.slogdet(P.K)
        note = "" if sign > 0 else f"reference determinant sign {sign}"
        return Outcome("dense", relerr(got, ref), P.kappa, call, note, sign > 0)
    if P.dense:  # log det from the dense Cholesky factor (K is SPD)
        ref = 2.0 * float(np.sum(np.log(np.diag(P.K_cho[0]))))
        return Outcome("dense", relerr(got, ref), P.kappa, call)
    (_, la), (_, lg) = np.linalg.slogdet(P.A64), np.linalg.slogdet(P.G64)
    return Outcome("ident", relerr(got, P.q * la + P.p * lg), P.kappa, call)


def _check_trace(kl, P: Problem) -> Outcome:
    call = lambda: kl.Kron(P.A, P.G).trace()  # noqa: E731
    got = float(call())
    if P.dense:
        return Outcome("dense", relerr(got, np.trace(P.K)), 1.0, call)
    ref = float(np.sum(np.kron(np.diag(P.A64), np.diag(P.G64))))
    return Outcome("diag", relerr(got, ref), 1.0, call)


def _exact_damped_outcome(P: Problem, call) -> Outcome:
    """``call()`` checked as the exact damped solve ``(A ⊗ G + DAMPING·I)⁻¹ vec(X)``."""
    Y = call()
    if P.dense:
        return Outcome("dense", relerr(vec(Y), P.damped_solution), P.kappa_damped, call)
    resid = P.kmul(P.A64, P.G64, Y) + DAMPING * f64(Y)
    return Outcome("resid", relerr(resid, P.X64), P.kappa_damped, call)


def _check_eigh_solve(kl, P: Problem) -> Outcome:
    return _exact_damped_outcome(P, lambda: kl.Kron(P.A, P.G).eigh().solve(P.X, DAMPING))


def _check_from_rows(kl, P: Problem) -> Outcome:
    r = P.gram_rows
    a, g = r["a"], r["g"]
    call = lambda: kl.KronEigh.from_rows(a, g, 1.0 / a.shape[0], 1.0 / g.shape[0]).solve(P.X, DAMPING)  # noqa: E731
    Y = call()
    if P.dense:
        ref = scipy.linalg.solve(np.kron(r["A"], r["G"]) + DAMPING * np.eye(P.n), P.x64, assume_a="pos")
        return Outcome("dense", relerr(vec(Y), ref), r["kappa"], call)
    resid = P.kmul(r["A"], r["G"], Y) + DAMPING * f64(Y)
    return Outcome("resid", relerr(resid, P.X64), r["kappa"], call)


def _check_power(kl, P: Problem) -> Outcome:
    call = lambda: kl.Kron(P.A, P.G).eigh().power(P.X, -0.5, DAMPING)  # noqa: E731
    Y = call()
    if P.spectral:
        w, Q = scipy.linalg.eigh(P.K + DAMPING * np.eye(P.n))
        ref = Q @ ((Q.T @ P.x64) / np.sqrt(w))
        return Outcome("dense", relerr(vec(Y), ref), P.kappa_damped, call)
    # resid: M^{-1/2} applied twice must solve M z = x, M = A ⊗ G + damping*I
    Z = f64(kl.Kron(P.A, P.G).eigh().power(Y, -0.5, DAMPING))
    Mz = (P.K @ vec(Z)).reshape((P.q, P.p), order="F") if P.dense else P.kmul(P.A64, P.G64, Z)
    return Outcome("resid", relerr(Mz + DAMPING * Z, P.X64), P.kappa_damped, call)


def _square(d):
    return d * d


def _check_apply(kl, P: Problem) -> Outcome:
    call = lambda: kl.Kron(P.A, P.G).eigh().apply(P.X, _square)  # noqa: E731
    got = call()
    # f(d) = d**2, so the reference is (A ⊗ G)^2 vec(X)
    if P.dense:
        return Outcome("dense", relerr(vec(got), P.K @ (P.K @ P.x64)), 1.0, call)
    ref = P.kmul(P.A64, P.G64, P.kmul(P.A64, P.G64, P.X64))
    return Outcome("ident", relerr(got, ref), 1.0, call)


_NORM_ORD = {"trace": "nuc", "fro": "fro", "spectral": 2}


def _pi_reference(P: Problem, norm: str):
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
    def check(kl, P: Problem) -> Outcome:
        call = lambda: kl.pi_factor(P.A, P.G, norm)  # noqa: E731
        got = float(call())
        ref, how = _pi_reference(P, norm)
        return Outcome(how, relerr(got, ref), 1.0, call)

    check.__name__ = f"_check_pi_{norm}"
    return check


def _check_factored_damping(kl, P: Problem) -> Outcome:
    call = lambda: kl.factored_damping(P.A, P.G, GAMMA)  # noqa: E731
    op = call()
    pi, _ = _pi_reference(P, "trace")
    Ad = P.A64 + pi * GAMMA * np.eye(P.p)
    Gd = P.G64 + GAMMA / pi * np.eye(P.q)
    if P.dense:
        return Outcome("dense", relerr(op.to_dense(), np.kron(Ad, Gd)), 1.0, call)
    # P.rows sampled rows of the dense np.kron(Ad, Gd)
    got = vec(op @ P.X)
    return Outcome("rows", relerr(got[P.rows], kron_rows(Ad, Gd, P.rows) @ P.x64), 1.0, call)


def _check_cg(kl, P: Problem) -> Outcome:
    dt = np.dtype(P.dtype)
    Ac = P.A + dt.type(CG_SHIFT) * np.eye(P.p, dtype=dt)
    Gc = P.G + dt.type(CG_SHIFT) * np.eye(P.q, dtype=dt)
    b = P.X.flatten(order="F")
    rtol = BASE_TOL[P.dtype] / 10

    def call():
        L = kl.Kron(Ac, Gc).aslinearoperator()
        return scipy.sparse.linalg.cg(L, b, rtol=rtol, atol=0.0, maxiter=CG_MAXITER)

    x, info = call()
    A64, G64 = f64(Ac), f64(Gc)
    if P.dense:
        r = np.kron(A64, G64) @ f64(x)
    else:
        r = vec(P.kmul(A64, G64, f64(x).reshape((P.q, P.p), order="F")))
    note = "" if info == 0 else f"cg did not converge (info={info})"
    return Outcome("resid", relerr(r, P.x64), P.kappa_cg, call, note, info == 0)


def _make_kron_sum_check(method: str, sign: int, general: bool = False):
    def check(kl, P: Problem) -> Outcome:
        (A, B, C, D), (A64, B64, C64, D64) = P.stein_factors(general)
        call = lambda: kl.solve_kron_sum(A, B, C, D, P.X, sign, method)  # noqa: E731
        U = call()
        if P.dense:
            return Outcome("dense", relerr(vec(U), P.kron_sum_solution(general, sign)), P.kappa_stein, call)
        U64 = f64(U)
        resid = B64 @ U64 @ A64.T + sign * (D64 @ U64 @ C64.T)
        return Outcome("resid", relerr(resid, P.X64), P.kappa_stein, call)

    check.__name__ = f"_check_kron_sum_{method}_{'general' if general else 'sym'}_{'plus' if sign > 0 else 'minus'}"
    return check


def _check_damped_exact(kl, P: Problem) -> Outcome:
    return _exact_damped_outcome(P, lambda: kl.DampedKron(P.A, P.G, DAMPING, "exact").solve(P.X))


def _check_damped_factored(kl, P: Problem) -> Outcome:
    call = lambda: kl.DampedKron(P.A, P.G, DAMPING, "factored").solve(P.X)  # noqa: E731
    Y = call()
    if not P.dense:
        return Outcome("resid", relerr(P.kmul(P.A_fd, P.G_fd, Y), P.X64), P.kappa_fd, call)
    M = np.kron(P.A_fd, P.G_fd)  # the damped matrix, which to_dense() must return
    ok, note = True, ""
    if P.spectral:
        dense_err = relerr(kl.DampedKron(P.A, P.G, DAMPING, "factored").to_dense(), M)
        ok = dense_err <= tolerance(P.dtype)
        note = "" if ok else f"to_dense() differs from the damped matrix by {dense_err:.2e}"
    ref = scipy.linalg.solve(M, P.x64, assume_a="pos", overwrite_a=True)
    return Outcome("dense", relerr(vec(Y), ref), P.kappa_fd, call, note, ok)


def _check_batch_factors(kl, P: Problem) -> Outcome:
    net = P.mlp
    call = lambda: kl.batch_factors(net.acts, net.grads)  # noqa: E731
    got = call()
    ref = kfac_factors(net.acts64, net.grads64)
    flat = lambda f: np.concatenate([f64(M).ravel() for k in _FACTOR_KEYS for M in f[k]])  # noqa: E731
    shapes = [tuple(M.shape) for k in _FACTOR_KEYS for M in got[k]]
    if shapes != [M.shape for k in _FACTOR_KEYS for M in ref[k]]:
        raise ValueError(f"factor shapes {shapes} differ from the reference's")
    return Outcome("dense", relerr(flat(got), flat(ref)), 1.0, call, dense_time=net.dense_time)


def _check_block_diag(kl, P: Problem) -> Outcome:
    net, f = P.mlp, P.mlp.f
    make = lambda: kl.BlockDiagInverse(f["A_diag"], f["G_diag"], gamma=NET_GAMMA)  # noqa: E731
    call = lambda: make().apply(net.V)  # noqa: E731
    got = layers_vec(call())
    _, off, pairs = net.tridiag
    # per layer: the dense solve with the damped diagonal block np.kron(Ā_k, G_k)
    ref = np.concatenate([
        scipy.linalg.solve(np.kron(A, G), net.v64[off[k]:off[k + 1]], assume_a="pos") for k, (A, G) in enumerate(pairs)
    ])
    err = max(relerr(got, ref), relerr(got, f64(make().to_dense()) @ net.v64))
    return Outcome("dense", err, net.kappa_diag, call, dense_time=net.dense_time)


def _tridiag_inverse(kl, f):
    return kl.BlockTridiagInverse(f["A_diag"], f["G_diag"], f["A_off"], f["G_off"], gamma=NET_GAMMA)


def _check_tridiag_apply(kl, P: Problem) -> Outcome:
    net = P.mlp
    call = lambda: _tridiag_inverse(kl, net.f).apply(net.V)  # noqa: E731
    got = layers_vec(call())
    # against its own to_dense() and against F̂⁻¹ assembled from the dense blocks of F̃
    Finv = f64(_tridiag_inverse(kl, net.f).to_dense())
    err = max(relerr(got, Finv @ net.v64), relerr(got, net.Finv_ref @ net.v64))
    return Outcome("dense", err, net.kappa_tri, call, dense_time=net.dense_time)


def _check_tridiag_dense(kl, P: Problem) -> Outcome:
    net = P.mlp
    call = lambda: _tridiag_inverse(kl, net.f).to_dense()  # noqa: E731
    Finv = f64(call())
    F, off, _ = net.tridiag
    n = len(off) - 1
    band = np.zeros(Finv.shape, dtype=bool)  # the tridiagonal blocks
    for k in range(n):
        band[off[max(k - 1, 0)]:off[min(k + 2, n)], off[k]:off[k + 1]] = True
    # F̂ = inv(to_dense()) must equal the damped F̃ on the tridiagonal blocks ...
    err = relerr(np.linalg.inv(Finv)[band], F[band])
    # ... and F̂⁻¹ must vanish outside them
    outside = float(np.max(np.abs(Finv[~band]), initial=0.0)) / float(np.max(np.abs(Finv)))
    ok = outside <= tolerance(P.dtype)
    note = "" if ok else f"to_dense() is not block-tridiagonal: {outside:.2e} outside the tridiagonal blocks"
    return Outcome("dense", err, net.kappa_tri, call, note, ok, dense_time=net.dense_time)


def _woodbury_fisher(kl, w: WoodburyProblem):
    return kl.WoodburyFisher(w.acts, w.errs, w.damping)


def _check_woodbury_solve(kl, P: Problem) -> Outcome:
    w = P.woodbury
    call = lambda: _woodbury_fisher(kl, w).solve(w.U)  # noqa: E731
    got = layers_vec(call())
    ref = scipy.linalg.cho_solve(w.cho, w.u64)
    return Outcome("dense", relerr(got, ref), w.kappa, call, dense_time=w.dense_time)


def _check_woodbury_matvec(kl, P: Problem) -> Outcome:
    w = P.woodbury
    call = lambda: _woodbury_fisher(kl, w).matvec(w.U)  # noqa: E731
    got = layers_vec(call())
    return Outcome("dense", relerr(got, w.F @ w.u64), 1.0, call, dense_time=w.dense_time)


def _check_woodbury_logdet(kl, P: Problem) -> Outcome:
    w = P.woodbury
    call = lambda: _woodbury_fisher(kl, w).logdet()  # noqa: E731
    got = float(call())
    ref = 2.0 * float(np.sum(np.log(np.diag(w.cho[0]))))
    return Outcome("dense", relerr(got, ref), w.kappa, call, dense_time=w.dense_time)


#: (row label, check) in the order they are printed.
CHECKS = (
    ("Kron @ X", _check_matmul),
    ("Kron.matmat(V)", _check_matmat),
    ("Kron.T @ X", _check_transpose),
    ("Kron.solve (SPD)", _make_solve_check(general=False)),
    ("Kron.solve (general)", _make_solve_check(general=True)),
    ("Kron.inv()", _check_inv),
    ("Kron.logdet()", _check_logdet),
    ("Kron.trace()", _check_trace),
    ("KronEigh.solve(X, d)", _check_eigh_solve),
    ("KronEigh.power(X, -1/2, d)", _check_power),
    ("KronEigh.apply(X, d**2)", _check_apply),
    ("KronEigh.from_rows(a, g).solve", _check_from_rows),
    ("pi_factor(norm='trace')", _make_pi_check("trace")),
    ("pi_factor(norm='fro')", _make_pi_check("fro")),
    ("pi_factor(norm='spectral')", _make_pi_check("spectral")),
    ("factored_damping(A, G, g)", _check_factored_damping),
    ("aslinearoperator() + cg", _check_cg),
    ("solve_kron_sum(eig, +1)", _make_kron_sum_check("eig", +1)),
    ("solve_kron_sum(eig, -1)", _make_kron_sum_check("eig", -1)),
    ("solve_kron_sum(schur, +1)", _make_kron_sum_check("schur", +1)),
    ("solve_kron_sum(schur, -1)", _make_kron_sum_check("schur", -1)),
    ("solve_kron_sum(schur, gen)", _make_kron_sum_check("schur", -1, general=True)),
    ("solve_kron_sum(smith, +1)", _make_kron_sum_check("smith", +1)),
    ("solve_kron_sum(smith, -1)", _make_kron_sum_check("smith", -1)),
    ("DampedKron(exact).solve", _check_damped_exact),
    ("DampedKron(factored).solve", _check_damped_factored),
    ("batch_factors(acts, grads)", _check_batch_factors),
    ("BlockDiagInverse.apply", _check_block_diag),
    ("BlockTridiagInverse.apply", _check_tridiag_apply),
    ("BlockTridiagInv.to_dense()", _check_tridiag_dense),
    ("WoodburyFisher.solve", _check_woodbury_solve),
    ("WoodburyFisher.matvec", _check_woodbury_matvec),
    ("WoodburyFisher.logdet()", _check_woodbury_logdet),
)
