"""Benchmarks of ``KronSumInverse`` (generalized Stein equations, issue 3) against their floors (docs/design.md §6).

``KronSumInverse(A, B, C, D, sign)`` represents ``(A ⊗ B + sign·C ⊗ D)⁻¹``, i.e.
solves ``B U Aᵀ + sign·D U Cᵀ = V`` for ``U`` of shape ``(q, p)``; here
``p = q = n``.  Conventions of ``bench/test_bench_kron.py`` (threads pinned to one
by ``bench/conftest.py``): every case checks its result first (backward error of
the equation it solves, computed in float64 by independent code, plus a dense
``np.kron`` reference at the smallest float64 sizes), then times it with
``benchmark.pedantic``; every op is *paired* with its floor (the floor is re-timed
right before each round; ``extra_info["paired_ratio"]`` = median of
``op_i / floor_i``).  All cases of one ``(family, n, dtype, variant)`` run back to
back, floors first.  ``extra_info``: ``family``, ``op``, ``floor``, ``variant``,
``sign``, ``rho``, ``n``, ``q``, ``p``, ``shape``, ``dtype``, ``rounds``, ``cost`` (plus
``iterations`` / ``rho_estimate`` for Smith).

Families (``op -> floor``; ``(floor)`` marks a floor/baseline timed on its own)::

  eig     K-FAC-like Σ: A, B SPD, C, D PSD with ρ(A⁻¹C)·ρ(B⁻¹D) = 0.9; variants sign-1 (n = 64 … 2048)
          and sign+1 (n = 64 … 1024)
          geigh2 (floor)            scipy.linalg.eigh(C, A) and scipy.linalg.eigh(D, B)
          eig_setup -> geigh2       KronSumInverse(A, B, C, D, sign, method="eig")
          4gemm (floor)             K2.T @ V @ K1 and K2 @ Y @ K1.T with the solver's K1, K2
          eig_solve -> 4gemm        inv.solve(V) (target <= 1.15x at the largest size)
  sylv    the standard Sylvester equation U Aᵀ + D U = V: A, D SPD, B = C = I, sign = +1
          (n = 64 … 1024 in float64, … 512 in float32)
          solve_sylvester (floor)   scipy.linalg.solve_sylvester(D, A.T, V) (Bartels-Stewart)
          eig_setup_solve -> solve_sylvester   KronSumInverse(A, I, I, D, method="eig").solve(V)
  schur   general (non-symmetric) A, D, B = C = I, sign = +1 (n = 64 … 512)
          solve_sylvester (floor)   as above
          schur_setup_solve -> solve_sylvester KronSumInverse(A, I, I, D, method="schur").solve(V)
  smith   contractive K-FAC-like problems, sign = -1, variants rho0.5 and rho0.99 (n = 64, 256, 1024)
          eig_setup (baseline), smith_setup -> eig_setup          method="smith" (squared) vs "eig"
          eig_solve (baseline), smith_solve -> eig_solve          extra_info["iterations"]
  dense   K-FAC-like, sign = -1, n = 16, 32, 64 (systems of order n² <= 4096)
          dense_solve (baseline)    scipy.linalg.solve(np.kron(A, B) - np.kron(C, D), vec(V))
          eig_setup_solve -> dense_solve   one-shot KronSumInverse(...).solve(V): the ratio is the gap

Not benchmarked: ``schur`` at n = 1024 — one set-up (two real QZ decompositions, in
float64 whatever the input dtype) took about 37 s on one 2.3 GHz core, beyond the
~30 s per round this file allows; ``solve_sylvester`` at n = 2048 (~8 s at 1024, so
about a minute);
``smith`` at n = 2048 (about 30 GEMMs of 2048² per set-up and per solve at ρ = 0.99);
``eig`` with sign = +1 at n = 2048 (its set-up differs from sign = -1 only by two
Cholesky factorizations, and its solve not at all).
"""

from __future__ import annotations

import functools

import numpy as np
import pytest
import scipy.linalg

import kronlin
from _harness import cached_case, case_funcs, time_paired
from kronlin.testing import orthonormal, wishart

SEED = 20240612
DTYPES = ["float32", "float64"]

#: ρ(A⁻¹C)·ρ(B⁻¹D) of the K-FAC-like problems of the eig and dense families: 1 - s2·s1 >= 0.1.
EIG_RHO = 0.9
SMITH_RHOS = (0.5, 0.99)

EIG_GRID = [(n, "sign-1") for n in (64, 128, 256, 512, 1024, 2048)] + [
    (n, "sign+1") for n in (64, 128, 256, 512, 1024)
]
SYLV_GRID = [(n, "sign+1") for n in (64, 128, 256, 512, 1024)]
SYLV_MAX_FLOAT32 = 512
SCHUR_GRID = [(n, "sign+1") for n in (64, 128, 256, 512)]
SMITH_GRID = [(n, f"rho{r}") for n in (64, 256, 1024) for r in SMITH_RHOS]
DENSE_GRID = [(n, "sign-1") for n in (16, 32, 64)]

#: (rounds, warmup rounds) of benchmark.pedantic keyed by n, per cost class of a case.
#: "solve": a few GEMMs; "setup": LAPACK eigendecompositions (rounds=3 at 1024, 1 at 2048);
#: "smith": squared Smith (up to ~30 GEMMs a set-up or a solve at ρ = 0.99);
#: "slow": Schur/QZ-based (solve_sylvester, method="schur"; ~8 s a call at n = 1024);
#: "dense": dense LU solves of order n² (~1 s at n = 64).
ROUNDS = {
    "solve": {16: (500, 50), 32: (500, 50), 64: (300, 20), 128: (200, 10), 256: (60, 5), 512: (20, 2),
              1024: (5, 1), 2048: (3, 1)},
    "setup": {16: (100, 5), 32: (100, 5), 64: (100, 5), 128: (40, 3), 256: (15, 1), 512: (7, 1),
              1024: (3, 0), 2048: (1, 0)},
    "smith": {64: (100, 5), 128: (40, 3), 256: (15, 1), 512: (5, 1), 1024: (3, 0)},
    "slow": {64: (20, 2), 128: (10, 1), 256: (5, 0), 512: (3, 0), 1024: (1, 0)},
    "dense": {16: (50, 3), 32: (10, 1), 64: (3, 0)},
}

#: (family, op, floor, cost class); floors/baselines have floor None.  Order = run order.
CASES = {
    "eig": [
        ("geigh2", None, "setup"),
        ("eig_setup", "geigh2", "setup"),
        ("4gemm", None, "solve"),
        ("eig_solve", "4gemm", "solve"),
    ],
    "sylv": [
        ("solve_sylvester", None, "slow"),
        ("eig_setup_solve", "solve_sylvester", "slow"),
    ],
    "schur": [
        ("solve_sylvester", None, "slow"),
        ("schur_setup_solve", "solve_sylvester", "slow"),
    ],
    "smith": [
        ("eig_setup", None, "setup"),
        ("smith_setup", "eig_setup", "smith"),
        ("eig_solve", None, "solve"),
        ("smith_solve", "eig_solve", "smith"),
    ],
    "dense": [
        ("dense_solve", None, "dense"),
        ("eig_setup_solve", "dense_solve", "dense"),
    ],
}


# -- problems -------------------------------------------------------------------------------
def _norm2(M, iters=30) -> float:
    """Power-iteration estimate (from below) of the spectral norm, O(n²) per step."""
    v = np.ones(M.shape[1]) / np.sqrt(M.shape[1])
    s = 0.0
    for _ in range(iters):
        w = M.T @ (M @ v)
        nw = float(np.linalg.norm(w))
        if nw == 0.0:
            return 0.0
        s, v = np.sqrt(nw), w / nw
    return float(s)


class Problem:
    """``B U Aᵀ + sign·D U Cᵀ = V`` with float64 originals (``*64``) and the dtype's copies.

    kind "kfac":  A, B SPD; C = L_A M1 L_Aᵀ, D = L_B M2 L_Bᵀ (A = L_A L_Aᵀ) with M1, M2 symmetric,
                  eigenvalues in [0.01 r, r], r = sqrt(rho): the generalized eigenvalues of (C, A)
                  and (D, B) are exactly those of M1, M2, so ρ(A⁻¹C)·ρ(B⁻¹D) = rho;
    kind "sylv":  A, D SPD, B = C = I (standard Sylvester U Aᵀ + sign·D U = V);
    kind "schur": A, D = W/sqrt(n) + 2 I with W Gaussian (non-symmetric, eigenvalues in the disc
                  |z - 2| <= ~1), B = C = I.
    """

    def __init__(self, kind: str, n: int, dtype: str, sign: int, rho: float | None):
        rng = np.random.default_rng([SEED, n, {"kfac": 0, "sylv": 1, "schur": 2}[kind], int(1e3 * (rho or 0))])
        self.kind, self.n, self.q, self.p = kind, n, n, n
        self.dtype, self.sign, self.rho = np.dtype(dtype), sign, rho
        self.eps = float(np.finfo(self.dtype).eps)
        I = np.eye(n)
        self.m1 = self.m2 = None
        if kind == "kfac":
            A, B = wishart(rng, n), wishart(rng, n)
            r = np.sqrt(rho)
            self.m1 = np.sort(np.append(rng.uniform(0.01 * r, r, n - 1), r))
            self.m2 = np.sort(np.append(rng.uniform(0.01 * r, r, n - 1), r))
            LA, LB = np.linalg.cholesky(A), np.linalg.cholesky(B)
            Q1, Q2 = orthonormal(rng, n), orthonormal(rng, n)
            C = LA @ ((Q1 * self.m1) @ Q1.T) @ LA.T
            D = LB @ ((Q2 * self.m2) @ Q2.T) @ LB.T
            C, D = (C + C.T) / 2, (D + D.T) / 2
        elif kind == "sylv":
            A, D, B, C = wishart(rng, n), wishart(rng, n), I, I
        else:
            A = rng.standard_normal((n, n)) / np.sqrt(n) + 2 * I
            D = rng.standard_normal((n, n)) / np.sqrt(n) + 2 * I
            B, C = I, I
        self.A64, self.B64, self.C64, self.D64 = A, B, C, D
        self.V64 = rng.standard_normal((n, n))
        self.A, self.B, self.C, self.D, self.V = (M.astype(self.dtype) for M in (A, B, C, D, self.V64))
        self.probe = rng.standard_normal(n)  # Freivalds probe vector
        self.knorm = _norm2(A) * _norm2(B) + _norm2(C) * _norm2(D)  # ‖A ⊗ B‖₂ + ‖C ⊗ D‖₂ (estimates)
        self.cases = {}

    @property
    def args(self):
        return self.A, self.B, self.C, self.D

    @property
    def tol(self) -> float:
        """Normwise tolerance: grows with the order, the dtype's epsilon and 1 / (1 - rho)."""
        return 16.0 * self.n * self.eps / (1.0 - (self.rho or 0.0))

    @functools.cached_property
    def eig_inv(self):
        return kronlin.KronSumInverse(*self.args, sign=self.sign, method="eig")

    @functools.cached_property
    def smith_inv(self):
        return kronlin.KronSumInverse(*self.args, sign=self.sign, method="smith")


@functools.lru_cache(maxsize=1)
def problem(kind, n, dtype, sign, rho):
    return Problem(kind, n, dtype, sign, rho)


def rel(a, b) -> float:
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), np.finfo(np.float64).tiny))


def check_solution(U, P, what):
    """Normwise backward error of ``B U Aᵀ + sign·D U Cᵀ = V`` in float64 (plus a dense check when small)."""
    assert U.shape == (P.q, P.p) and U.dtype == P.dtype, f"{what}: got {U.shape} {U.dtype}"
    U64 = U.astype(np.float64)
    R = P.B64 @ U64 @ P.A64.T + P.sign * (P.D64 @ U64 @ P.C64.T) - P.V64
    berr = np.linalg.norm(R) / (P.knorm * np.linalg.norm(U64) + np.linalg.norm(P.V64))
    assert berr <= P.tol, f"{what}: backward error {berr:.3g} > {P.tol:.3g}"
    if P.n <= 32 and P.dtype == np.float64:
        # Dense reference on the column-stacked vector (docs/design.md §1).
        K = np.kron(P.A64, P.B64) + P.sign * np.kron(P.C64, P.D64)
        u = scipy.linalg.solve(K, P.V64.flatten("F"))
        err = rel(U64.flatten("F"), u)
        assert err <= 1e3 * P.tol, f"{what}: dense np.kron solve differs by {err:.3g}"


def check_geigh(C, A, s, K, m, P, what):
    """``C K = A K diag(s)``, ``Kᵀ A K = I`` and (K-FAC-like problems) ``s`` = the known spectrum ``m``."""
    K64, s64 = K.astype(np.float64), s.astype(np.float64)
    AK = A @ K64
    res = np.linalg.norm(C @ K64 - AK * s64) / (np.linalg.norm(C) * np.linalg.norm(K64))
    orth = np.linalg.norm(K64.T @ AK - np.eye(P.n)) / np.sqrt(P.n)
    assert res <= P.tol and orth <= P.tol, f"{what}: residual {res:.3g}, A-orthogonality {orth:.3g}"
    if m is not None:
        err = float(np.max(np.abs(s64 - m))) / float(np.max(np.abs(m)))
        assert err <= P.tol, f"{what}: generalized eigenvalues differ from the construction by {err:.3g}"


# -- cases: each checks its result, then returns (target, setup) to time -------------------
def case_geigh2(P):
    A, B, C, D = P.args

    def two():
        return scipy.linalg.eigh(C, A), scipy.linalg.eigh(D, B)

    (s1, K1), (s2, K2) = two()
    check_geigh(P.C64, P.A64, s1, K1, P.m1, P, "scipy.linalg.eigh(C, A)")
    check_geigh(P.D64, P.B64, s2, K2, P.m2, P, "scipy.linalg.eigh(D, B)")
    return two, None


def case_eig_setup(P):
    args, sign = P.args, P.sign

    def setup_op():
        return kronlin.KronSumInverse(*args, sign=sign, method="eig")

    inv = setup_op()
    sv = inv.solver
    # float32 problems are set up and solved in float64 (kronlin/stein/eig.py, issue 17): the eigenbases are float64
    work = np.float64 if P.dtype == np.float32 else P.dtype
    assert inv.method == "eig" and sv.K1.dtype == work and sv.K2.dtype == work
    if sv.whitened_by == "AB":
        check_geigh(P.C64, P.A64, sv.s1, sv.K1, P.m1, P, "EigStein (C, A)")
        check_geigh(P.D64, P.B64, sv.s2, sv.K2, P.m2, P, "EigStein (D, B)")
    check_solution(inv.solve(P.V), P, "KronSumInverse(method='eig').solve after a fresh set-up")
    P.__dict__.setdefault("eig_inv", inv)  # reused by 4gemm / eig_solve (the set-up is seconds at n = 2048)
    return setup_op, None


def case_4gemm(P):
    sv, V = P.eig_inv.solver, P.V
    K1, K2 = sv.K1, sv.K2

    def four():
        Y = K2.T @ V @ K1
        return K2 @ Y @ K1.T

    Z = four()
    # Freivalds: Z v against the same chain applied to v in float64 (K1, K2 as computed).
    K1d, K2d = K1.astype(np.float64), K2.astype(np.float64)
    ref = K2d @ (K2d.T @ (P.V64 @ (K1d @ (K1d.T @ P.probe))))
    err = rel(Z.astype(np.float64) @ P.probe, ref)
    assert err <= P.tol, f"4gemm: Freivalds check failed, relative error {err:.3g}"
    return four, None


def case_eig_solve(P):
    inv, V = P.eig_inv, P.V
    check_solution(inv.solve(V), P, "KronSumInverse(method='eig').solve")
    return (lambda: inv.solve(V)), None


def case_solve_sylvester(P):
    assert P.kind in ("sylv", "schur")
    a, b, V = P.sign * P.D, P.A.T, P.V  # σ D U + U Aᵀ = V

    def sylv():
        return scipy.linalg.solve_sylvester(a, b, V)

    check_solution(sylv(), P, "scipy.linalg.solve_sylvester")
    return sylv, None


def case_eig_setup_solve(P):
    args, sign, V = P.args, P.sign, P.V

    def setup_solve():
        return kronlin.KronSumInverse(*args, sign=sign, method="eig").solve(V)

    check_solution(setup_solve(), P, "KronSumInverse(method='eig') set-up + solve")
    return setup_solve, None


def case_schur_setup_solve(P):
    args, sign, V = P.args, P.sign, P.V

    def setup_solve():
        return kronlin.KronSumInverse(*args, sign=sign, method="schur").solve(V)

    check_solution(setup_solve(), P, "KronSumInverse(method='schur') set-up + solve")
    return setup_solve, None


def case_smith_setup(P):
    args, sign = P.args, P.sign

    def setup_op():
        return kronlin.KronSumInverse(*args, sign=sign, method="smith")

    inv = setup_op()
    est = inv.solver.rho_estimate
    # An upper estimate of ρ(B⁻¹D)·ρ(A⁻¹C) = rho (float32 powers: a few ulps of slack).
    assert est >= P.rho * (1 - 1e3 * P.eps) and est < 1, f"smith rho_estimate {est:.6g} vs rho {P.rho}"
    check_solution(inv.solve(P.V), P, "KronSumInverse(method='smith') solve after a fresh set-up")
    P.__dict__.setdefault("smith_inv", inv)
    return setup_op, None


def case_smith_solve(P):
    inv, V = P.smith_inv, P.V
    check_solution(inv.solve(V), P, "KronSumInverse(method='smith').solve")
    return (lambda: inv.solve(V)), None


def case_dense_solve(P):
    A, B, C, D, V, sign = P.A, P.B, P.C, P.D, P.V, P.sign

    def dense():
        return scipy.linalg.solve(np.kron(A, B) + sign * np.kron(C, D), V.flatten("F"))

    u = dense()
    assert u.dtype == P.dtype
    check_solution(u.reshape(P.p, P.q).T, P, "dense scipy.linalg.solve(np.kron(A, B) ± np.kron(C, D), vec(V))")
    return dense, None


CASE_FUNCS = case_funcs(globals())


def _case(P, op, check: bool):
    return cached_case(P, op, check, CASE_FUNCS)


# -- timing (paired, as in test_bench_kron.py) ------------------------------------------------
def run_case(benchmark, P, family, variant, op, floor, cost, extra=None):
    """Check ``op``, then time it (paired with ``floor`` unless None); ``extra()`` adds to extra_info."""
    target, setup = _case(P, op, check=True)  # checks correctness, then hands back what to time
    extra = extra() if extra is not None else {}
    rounds, warmup = ROUNDS[cost][P.n]
    benchmark.group = f"{family} {P.q}x{P.p} {P.dtype.name} {variant}"
    benchmark.extra_info.update(
        family=family, op=op, floor=floor, variant=variant, sign=P.sign, rho=P.rho, n=P.n, q=P.q, p=P.p,
        shape=f"{P.q}x{P.p}", dtype=P.dtype.name, rounds=rounds, cost=cost, **extra,
    )
    if floor is None:
        time_paired(benchmark, target, setup, rounds, warmup)
        return
    ftarget, fsetup = _case(P, floor, check=False)
    time_paired(benchmark, target, setup, rounds, warmup, ftarget, fsetup)


def _grid_id(g):
    return f"{g[0]}x{g[0]}-{g[1]}"


def _case_id(c):
    return c[0]


def _sign(variant: str) -> int:
    return -1 if variant == "sign-1" else 1


@pytest.mark.parametrize("case", CASES["eig"], ids=_case_id)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("grid", EIG_GRID, ids=_grid_id)
def test_stein_eig(benchmark, grid, dtype, case):
    n, variant = grid
    P = problem("kfac", n, dtype, _sign(variant), EIG_RHO)
    run_case(benchmark, P, "eig", variant, *case)


@pytest.mark.parametrize("case", CASES["sylv"], ids=_case_id)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("grid", SYLV_GRID, ids=_grid_id)
def test_stein_sylv(benchmark, grid, dtype, case):
    n, variant = grid
    if dtype == "float32" and n > SYLV_MAX_FLOAT32:
        pytest.skip(f"solve_sylvester at n = {n} takes ~8 s a call: float64 only")
    P = problem("sylv", n, dtype, _sign(variant), None)
    run_case(benchmark, P, "sylv", variant, *case)


@pytest.mark.parametrize("case", CASES["schur"], ids=_case_id)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("grid", SCHUR_GRID, ids=_grid_id)
def test_stein_schur(benchmark, grid, dtype, case):
    n, variant = grid
    P = problem("schur", n, dtype, _sign(variant), None)
    run_case(benchmark, P, "schur", variant, *case)


@pytest.mark.parametrize("case", CASES["smith"], ids=_case_id)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("grid", SMITH_GRID, ids=_grid_id)
def test_stein_smith(benchmark, grid, dtype, case):
    n, variant = grid
    rho = float(variant[len("rho"):])
    P = problem("kfac", n, dtype, -1, rho)

    def extra():  # after the case's check: its solve has set solver.iterations
        if not case[0].startswith("smith"):
            return {}
        sv = P.smith_inv.solver
        return {"iterations": sv.iterations, "rho_estimate": sv.rho_estimate}

    run_case(benchmark, P, "smith", variant, *case, extra=extra)


@pytest.mark.parametrize("case", CASES["dense"], ids=_case_id)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("grid", DENSE_GRID, ids=_grid_id)
def test_stein_dense(benchmark, grid, dtype, case):
    n, variant = grid
    P = problem("kfac", n, dtype, _sign(variant), EIG_RHO)
    run_case(benchmark, P, "dense", variant, *case)
