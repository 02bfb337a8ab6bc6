"""Benchmarks of ``Kron`` / ``KronEigh`` against their BLAS/LAPACK floors (docs/design.md §6).

Every operation is timed next to the *floor* it cannot beat, measured in the
same run on the same arrays: plain NumPy GEMMs (``gemm``: one ``G @ X``;
``2gemm``: ``G @ X @ A.T``; ``4gemm``: ``Qg.T @ X @ Qa`` and ``Qg @ Y @ Qa.T``)
or the two LAPACK eigendecompositions (``eigh``).  ``bench/report.py`` turns
the JSON into ``op / floor`` ratios.

Each case checks its result first (against a dense ``np.kron`` reference at the
smallest size, a composed NumPy reference, or the residual of the equation it
solves) and only then times it.  All cases of one ``(shape, dtype)`` run back to
back, floors first.  On top of that every operation is *paired* with its floor:
the floor runs (timed, outside the op's timed region) right before each round of
the op, and ``extra_info["paired_ratio"]`` is the median over rounds of
``op_i / floor_i``, which a noisy or shared machine disturbs far less than the
ratio of two medians taken a minute apart.

Cases (``family: op -> floor``)::

    matvec: 2gemm (floor), kron_matvec -> 2gemm               Kron(A, G) @ X, operator built once
    eigh:   eigh (floor), kron_eigh_setup -> eigh             Kron(A, G).eigh() on a fresh operator each round
    solve:  gemm (unit), 4gemm (floor),
            kroneigh_solve -> 4gemm                           KronEigh.solve(X, damping=1e-3)
            kroneigh_solve_noext -> 4gemm                     the same inside kronlin.kernels.disabled()
    scale:  eig_scale_numpy (floor), eig_scale -> eig_scale_numpy,
            eig_scale_C -> eig_scale_numpy                    the scaling step alone (in place on a fresh copy)
"""

from __future__ import annotations

import functools

import numpy as np
import pytest
import scipy.linalg

import kronlin
from _harness import cached_case, case_funcs, time_paired
from kronlin import kernels
from kronlin.kernels import eig_scale, eig_scale_reference
from kronlin.testing import wishart

DAMPING = 1e-3
POWER = -1.0
SEED = 20240611

#: (q, p): the right-hand side X is (q, p), A is (p, p), G is (q, q).
SQUARE = [(n, n) for n in (64, 128, 256, 512, 1024, 2048)]
RECT = [(256, 1024)]
SHAPES = SQUARE + RECT
DTYPES = ["float32", "float64"]

#: rounds, warmup rounds of benchmark.pedantic, keyed by max(q, p).  Many rounds where a
#: round is cheap (medians robust to a noisy 2-core VM), few where it is not: the full
#: grid takes about 5 minutes on one 2.3 GHz core.
ROUNDS = {64: (500, 50), 128: (300, 20), 256: (100, 5), 512: (30, 3), 1024: (15, 2), 2048: (5, 1)}
#: The eigh family (two LAPACK eigendecompositions per round) is capped at these rounds.
EIGH_ROUNDS = {1024: (7, 1), 2048: (3, 1)}

#: (family, op, floor); floors have floor None.  Order = run order within a (shape, dtype).
CASES = [
    ("matvec", "2gemm", None),
    ("matvec", "kron_matvec", "2gemm"),
    ("eigh", "eigh", None),
    ("eigh", "kron_eigh_setup", "eigh"),
    ("solve", "gemm", None),
    ("solve", "4gemm", None),
    ("solve", "kroneigh_solve", "4gemm"),
    ("solve", "kroneigh_solve_noext", "4gemm"),
    ("scale", "eig_scale_numpy", None),
    ("scale", "eig_scale", "eig_scale_numpy"),
    ("scale", "eig_scale_C", "eig_scale_numpy"),
]


def _shape_id(s):
    return f"{s[0]}x{s[1]}"


def _case_id(c):
    return f"{c[0]}:{c[1]}"


# -- problem data (cached for the (shape, dtype) currently running) ------------
class Problem:
    """SPD factors with eigenvalues in about [0.1, 4.1] (Wishart + 0.1 I): cond(A ⊗ G + 1e-3 I) ~ 1.5e3."""

    def __init__(self, q: int, p: int, dtype: str):
        rng = np.random.default_rng([SEED, q, p])
        self.q, self.p, self.dtype = q, p, np.dtype(dtype)
        self.eps = float(np.finfo(self.dtype).eps)
        self.A64 = wishart(rng, p)
        self.G64 = wishart(rng, q)
        self.X64 = rng.standard_normal((q, p))
        self.A = self.A64.astype(self.dtype)  # symmetric exactly: the float64 matrix is, casting is elementwise
        self.G = self.G64.astype(self.dtype)
        self.X = self.X64.astype(self.dtype)
        self.v = rng.standard_normal(p)  # Freivalds probe vector
        self.cases = {}  # op -> (target, setup), filled by the tests

    @functools.cached_property
    def kron(self):
        return kronlin.Kron(self.A, self.G)

    @functools.cached_property
    def ke(self):
        return kronlin.Kron(self.A, self.G).eigh()

    @functools.cached_property
    def Y(self):
        """``Qg.T @ X @ Qa``: the eigenbasis array the scaling step works on (C-contiguous)."""
        Qa, _, Qg, _ = self.ke
        return np.ascontiguousarray(Qg.T @ self.X @ Qa)

    @property
    def tol(self) -> float:
        """Normwise tolerance: grows with the order and the dtype's epsilon."""
        return 16.0 * max(self.q, self.p) * self.eps


@functools.lru_cache(maxsize=1)
def problem(q: int, p: int, dtype: str) -> Problem:
    return Problem(q, p, dtype)


def rel(a, b) -> float:
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), np.finfo(np.float64).tiny))


def check_freivalds(Z, ref_times_v, P, what):
    """``Z @ v`` against an O(n^2) evaluation of the same product applied to v."""
    err = rel(Z.astype(np.float64) @ P.v[: Z.shape[1]], ref_times_v)
    assert err <= P.tol, f"{what}: Freivalds check failed, relative error {err:.3g} > {P.tol:.3g}"


def check_solve(U, P, what):
    """Normwise backward error of ``G U Aᵀ + λ U = X`` computed in float64."""
    assert U.shape == (P.q, P.p) and U.dtype == P.dtype, f"{what}: got {U.shape} {U.dtype}"
    U64 = U.astype(np.float64)
    R = P.G64 @ U64 @ P.A64.T + DAMPING * U64 - P.X64
    _, la, _, lg = P.ke
    knorm = float(np.max(lg)) * float(np.max(la)) + DAMPING
    berr = np.linalg.norm(R) / (knorm * np.linalg.norm(U64) + np.linalg.norm(P.X64))
    assert berr <= P.tol, f"{what}: backward error {berr:.3g} > {P.tol:.3g}"
    if P.q * P.p <= 64 * 64 and P.dtype == np.float64:
        # Dense reference on the column-stacked vector (docs/design.md §1): (A ⊗ G + λI) vec(U) = vec(X).
        K = np.kron(P.A64, P.G64) + DAMPING * np.eye(P.q * P.p)
        u = scipy.linalg.solve(K, P.X64.flatten("F"), assume_a="pos")
        err = rel(U64.flatten("F"), u)
        assert err <= 1e3 * P.tol, f"{what}: dense np.kron solve differs by {err:.3g}"


def check_eigh(M64, w, Q, P, what):
    n = M64.shape[0]
    assert w.shape == (n,) and Q.shape == (n, n) and Q.dtype == P.dtype and w.dtype == P.dtype
    Q64, w64 = Q.astype(np.float64), w.astype(np.float64)
    res = np.linalg.norm(M64 @ Q64 - Q64 * w64) / np.linalg.norm(M64)
    orth = np.linalg.norm(Q64.T @ Q64 - np.eye(n)) / np.sqrt(n)
    assert res <= P.tol and orth <= P.tol, f"{what}: eigh residual {res:.3g}, orthogonality {orth:.3g}"


# -- the cases: each returns (target, setup) after checking the result -------
def case_gemm(P):
    G, X = P.G, P.X
    Z = G @ X
    check_freivalds(Z, P.G64 @ (P.X64 @ P.v), P, "gemm")
    return (lambda: G @ X), None


def case_2gemm(P):
    G, X, A = P.G, P.X, P.A
    Z = G @ X @ A.T
    check_freivalds(Z, P.G64 @ (P.X64 @ (P.A64.T @ P.v)), P, "2gemm")
    return (lambda: G @ X @ A.T), None


def case_4gemm(P):
    X = P.X
    Qa, _, Qg, _ = P.ke

    def four():
        Y = Qg.T @ X @ Qa
        return Qg @ Y @ Qa.T

    Z = four()
    err = rel(Z, P.X64)  # Q Qᵀ = I: the round trip returns X
    assert err <= P.tol, f"4gemm: round trip error {err:.3g}"
    return four, None


def case_kron_matvec(P):
    K, X = P.kron, P.X
    Z = K @ X
    assert Z.shape == X.shape and Z.dtype == P.dtype
    err = rel(Z, P.G64 @ P.X64 @ P.A64.T)
    assert err <= P.tol, f"kron_matvec vs G X Aᵀ: {err:.3g}"
    if P.q * P.p <= 64 * 64:
        # docs/design.md §1: Kron(A, G) @ X == np.kron(A, G) @ X.flatten("F") reshaped back; flat input too.
        z = np.kron(P.A64, P.G64) @ P.X64.flatten("F")
        err = rel(Z.flatten("F"), z)
        assert err <= P.tol, f"kron_matvec vs np.kron: {err:.3g}"
        zf = K @ X.flatten("F")
        assert zf.shape == (P.q * P.p,) and rel(zf, z) <= P.tol
    return (lambda: K @ X), None


def case_eigh(P):
    A, G = P.A, P.G

    def two():
        return np.linalg.eigh(A), np.linalg.eigh(G)

    (wa, Qa), (wg, Qg) = two()
    check_eigh(P.A64, wa, Qa, P, "np.linalg.eigh(A)")
    check_eigh(P.G64, wg, Qg, P, "np.linalg.eigh(G)")
    return two, None


def case_kron_eigh_setup(P):
    A, G = P.A, P.G

    def setup_op():
        return kronlin.Kron(A, G).eigh()  # fresh operator: Kron caches its eigh()

    Qa, la, Qg, lg = setup_op()
    check_eigh(P.A64, la, Qa, P, "Kron.eigh() A side")
    check_eigh(P.G64, lg, Qg, P, "Kron.eigh() G side")
    ref_a, ref_g = np.linalg.eigvalsh(P.A64), np.linalg.eigvalsh(P.G64)
    assert rel(la, ref_a) <= P.tol and rel(lg, ref_g) <= P.tol, "Kron.eigh() eigenvalues differ from LAPACK"
    return setup_op, None


def case_kroneigh_solve(P):
    ke, X = P.ke, P.X
    U = ke.solve(X, damping=DAMPING)
    check_solve(U, P, "KronEigh.solve")
    return (lambda: ke.solve(X, damping=DAMPING)), None


def case_kroneigh_solve_noext(P):
    ke, X = P.ke, P.X

    def solve_noext():
        with kernels.disabled():
            return ke.solve(X, damping=DAMPING)

    with kernels.disabled():
        assert kernels.compiled(np) is None, "kronlin.kernels.disabled() did not disable the CPU extension"
    U = solve_noext()
    check_solve(U, P, "KronEigh.solve (extension disabled)")
    U_ext = ke.solve(X, damping=DAMPING)
    err = rel(U, U_ext)
    assert err <= P.tol, f"solve with and without the extension differ by {err:.3g}"
    return solve_noext, None


def _scale_inputs(P):
    _, la, _, lg = P.ke
    Y0 = P.Y

    def fresh():
        return (Y0.copy(),), {}

    # Float64 reference of Y / (lg laᵀ + λ).
    ref = Y0.astype(np.float64) / (lg.astype(np.float64)[:, None] * la.astype(np.float64)[None, :] + DAMPING)
    return Y0, lg, la, fresh, ref


def _check_scaled(out, ref, P, what):
    assert out.shape == ref.shape and out.dtype == P.dtype, f"{what}: got {out.shape} {out.dtype}"
    err = float(np.max(np.abs(out.astype(np.float64) - ref) / np.abs(ref).clip(np.finfo(np.float64).tiny)))
    # Elementwise: a product, a sum and a division (or reciprocal and multiply): a few ulps.
    assert err <= 8 * P.eps, f"{what}: elementwise relative error {err:.3g} > {8 * P.eps:.3g}"


def case_eig_scale_numpy(P):
    Y0, lg, la, fresh, ref = _scale_inputs(P)

    def target(Y):
        return eig_scale_reference(np, Y, lg, la, DAMPING, POWER)

    out = target(*fresh()[0])
    _check_scaled(out, ref, P, "eig_scale_reference")
    return target, fresh


def case_eig_scale(P):
    Y0, lg, la, fresh, ref = _scale_inputs(P)

    def target(Y):
        return eig_scale(np, Y, lg, la, DAMPING, POWER)

    (Y,), _ = fresh()
    out = target(Y)
    _check_scaled(out, ref, P, "eig_scale")
    if kernels.compiled(np) is not None:
        assert out is Y, "eig_scale did not take the compiled in-place path (it returned a new array)"
    return target, fresh


def case_eig_scale_C(P):
    mod = kernels.compiled(np)
    if mod is None:
        pytest.skip("kronlin._C is absent or disabled")
    Y0, lg, la, fresh, ref = _scale_inputs(P)
    g = np.ascontiguousarray(lg[None, :], dtype=P.dtype)
    a = np.ascontiguousarray(la[None, :], dtype=P.dtype)
    q, p = Y0.shape

    def target(Y):
        mod.eig_scale(Y.reshape(1, q, p), g, a, DAMPING, POWER)
        return Y

    out = target(*fresh()[0])
    _check_scaled(out, ref, P, "the compiled eig_scale, called directly")
    return target, fresh


CASE_FUNCS = case_funcs(globals())


def _case(P, op, check: bool):
    return cached_case(P, op, check, CASE_FUNCS)


@pytest.mark.parametrize("case", CASES, ids=_case_id)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES, ids=_shape_id)
def test_kron(benchmark, shape, dtype, case):
    family, op, floor = case
    q, p = shape
    P = problem(q, p, dtype)
    target, setup = _case(P, op, check=True)  # checks correctness, then hands back what to time
    size = max(q, p)
    rounds, warmup = EIGH_ROUNDS.get(size, ROUNDS[size]) if family == "eigh" else ROUNDS[size]
    benchmark.group = f"{family} {q}x{p} {dtype}"
    benchmark.extra_info.update(
        family=family, op=op, floor=floor, n=size, q=q, p=p, shape=f"{q}x{p}",
        dtype=dtype, rounds=rounds, damping=DAMPING,
    )
    if floor is None:
        time_paired(benchmark, target, setup, rounds, warmup)
        return
    ftarget, fsetup = _case(P, floor, check=False)
    time_paired(benchmark, target, setup, rounds, warmup, ftarget, fsetup)
