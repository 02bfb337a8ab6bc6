"""Benchmarks of ``WoodburyFisher`` and its weight-sharing Gram kernel (docs/design.md §6).

Conventions of ``bench/test_bench_kron.py`` (run with ``bench/conftest.py``:
BLAS and OpenMP pinned to one thread): every operation is checked first, then
timed with ``benchmark.pedantic`` next to the floor it cannot beat, measured in
the same run on the same arrays; each round of an operation is *paired* with a
run of its floor right before it (``extra_info["paired_ratio"]`` = median of
``op_i / floor_i``).  ``extra_info`` carries ``family``, ``op``, ``floor``,
``n``, ``shape``, ``dtype`` (as ``bench/report.py`` reads them) plus the sizes.

Families (``op -> floor``)::

    solve   woodbury_gemms (floor): per layer A @ Uᵀ and (w ⊙ E)ᵀ A, the two GEMMs of a solve
            woodbury_solve -> woodbury_gemms        F.solve(U), Gram and Cholesky cached
            woodbury_setup_solve -> woodbury_gemms  fresh operator: Gram (N² Σ(d_in + d_out)),
                                                    Cholesky (N³/3) and the solve
            Grid: N in 16..1024 with two 512 x 512 layers (the N³ term shows only at large N),
            and P with two d x d layers, d in 256..2000 at N = 64 ("small": N = 8, d = 64).
    gram    gram_reference (floor): the einsum/GEMM composition (A Aᵀ) ⊙ (E Eᵀ) summed over
                                    T x T blocks, a block of examples at a time (<= 64 MiB)
            gram_kernel -> gram_reference           the compiled tiled kernel (kronlin._C)
            gram_composition_full -> gram_reference the composition in one block, (N·T)² entries
                                                    (only where that fits: T <= 256)
            gram_grad -> gram_reference             explicit per-example gradients (the "grad"
                                                    method the cost model picks for large T)
            N = 16, d_in = d_out = 64, T in (16, 64, 256, 1024).  extra_info["peak_bytes"]:
            NumPy's peak allocation of one call (tracemalloc), plus for the kernel its C++
            workspace (the packed copy of the inputs), which tracemalloc cannot see.
    gtu     gemm (floor): A @ Uᵀ;  woodbury_gtu -> gemm: Gᵀu (the GEMM plus the row sums), timed through the
            public F.quad(U) = scale·|Gᵀu|², which adds U's validation and an M-term sum (before the layout
            change of issue 11 item 5 it called the private Gᵀu helper, without the validation)

The solve memory of the issue (two 2000 x 2000 layers, N = 64) is recorded as
``extra_info["solve_peak_bytes"]`` of the ``P64_2x2000`` solve cases.
"""

from __future__ import annotations

import functools
import tracemalloc

import numpy as np
import pytest

from _harness import time_paired
from kronlin import WoodburyFisher, kernels
from kronlin.kernels import gram_shared, gram_shared_grad, gram_shared_reference

SEED = 20240611
DTYPES = ["float32", "float64"]
REL_DAMPING = 1e-3  # λ = REL_DAMPING · trace(K) / M

# -- solve grid: (id, N, d) with two d x d dense layers ----------------------------------
SOLVE_SHAPES = [("small", 8, 64)]
SOLVE_SHAPES += [(f"N{n}_2x512", n, 512) for n in (16, 32, 64, 128, 256, 512, 1024)]
SOLVE_SHAPES += [(f"P64_2x{d}", 64, d) for d in (256, 1024, 2000)]  # N64_2x512 is the d = 512 point

SOLVE_CASES = [
    ("solve", "woodbury_gemms", None),
    ("solve", "woodbury_solve", "woodbury_gemms"),
    ("solve", "woodbury_setup_solve", "woodbury_gemms"),
]

# -- gram grid ------------------------------------------------------------------------------
GRAM_N, GRAM_DA, GRAM_DE = 16, 64, 64
GRAM_T = (16, 64, 256, 1024)
FULL_COMPOSITION_MAX_T = 256
GRAM_CASES = [
    ("gram", "gram_reference", None),
    ("gram", "gram_kernel", "gram_reference"),
    ("gram", "gram_composition_full", "gram_reference"),
    ("gram", "gram_grad", "gram_reference"),
]
GTU_CASES = [("gtu", "gemm", None), ("gtu", "woodbury_gtu", "gemm")]


def _rounds(work: float):
    """(rounds, warmup) for a case of about ``work`` multiply-adds."""
    if work < 2e7:
        return 200, 10
    if work < 2e8:
        return 40, 3
    if work < 2e9:
        return 10, 1
    return 4, 1


def rel(a, b) -> float:
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), np.finfo(np.float64).tiny))


# -- problems -----------------------------------------------------------------------------
class SolveProblem:
    def __init__(self, N: int, d: int, dtype: str):
        rng = np.random.default_rng([SEED, N, d])
        self.N, self.d, self.dtype = N, d, np.dtype(dtype)
        self.eps = float(np.finfo(self.dtype).eps)
        self.acts64 = [rng.standard_normal((N, d)) / np.sqrt(d) for _ in range(2)]
        self.errs64 = [rng.standard_normal((N, d)) / np.sqrt(d) for _ in range(2)]
        self.U64 = [rng.standard_normal((d, d)) for _ in range(2)]
        self.acts = [a.astype(self.dtype) for a in self.acts64]
        self.errs = [e.astype(self.dtype) for e in self.errs64]
        self.U = [u.astype(self.dtype) for u in self.U64]
        self.w = rng.standard_normal(N).astype(self.dtype)
        K = WoodburyFisher(self.acts64, self.errs64, 0.0).gram()
        self.lam = REL_DAMPING * float(np.trace(K)) / N
        self.knorm = float(np.linalg.eigvalsh(K)[-1])  # ‖F‖₂ = ‖K‖₂
        self.cases = {}

    @functools.cached_property
    def F(self):
        F = WoodburyFisher(self.acts, self.errs, self.lam)
        F.logdet()  # the cached set-up: logdet() builds the Gram and its Cholesky, which solve() reuses
        return F

    @property
    def work(self) -> float:
        return 4.0 * self.N * 2 * self.d * self.d

    def check(self, X, what):
        """Normwise backward error of (λI + F) x = u, F applied by direct float64 NumPy (independent code)."""
        assert [x.shape for x in X] == [u.shape for u in self.U] and all(x.dtype == self.dtype for x in X), what
        X = [x.astype(np.float64) for x in X]
        v = sum(np.sum((a @ x.T) * e, axis=1) for a, e, x in zip(self.acts64, self.errs64, X))  # g_iᵀ x
        r2 = x2 = u2 = 0.0
        for a, e, x, u in zip(self.acts64, self.errs64, X, self.U64):
            Fx = (e * v[:, None]).T @ a / self.N
            r2 += float(np.sum((Fx + self.lam * x - u) ** 2))
            x2 += float(np.sum(x * x))
            u2 += float(np.sum(u * u))
        berr = np.sqrt(r2) / ((self.knorm + self.lam) * np.sqrt(x2) + np.sqrt(u2))
        tol = 64 * self.N * self.eps
        assert berr <= tol, f"{what}: backward error {berr:.3g} > {tol:.3g}"


@functools.lru_cache(maxsize=1)
def solve_problem(N, d, dtype):
    return SolveProblem(N, d, dtype)


class GramProblem:
    def __init__(self, T: int, dtype: str):
        rng = np.random.default_rng([SEED, T])
        self.T, self.dtype = T, np.dtype(dtype)
        self.eps = float(np.finfo(self.dtype).eps)
        N, da, de = GRAM_N, GRAM_DA, GRAM_DE
        self.A64 = rng.standard_normal((N, T, da))
        self.E64 = rng.standard_normal((N, 1, T, de))
        self.A, self.E = self.A64.astype(self.dtype), self.E64.astype(self.dtype)
        self.cases = {}

    @functools.cached_property
    def K64(self):
        return gram_shared_grad(np, self.A64, self.E64)  # independent method, float64

    @property
    def work(self) -> float:
        return GRAM_N * (GRAM_N + 1) / 2 * self.T**2 * (GRAM_DA + GRAM_DE)

    def check(self, K, what):
        assert K.shape == (GRAM_N, GRAM_N) and K.dtype == self.dtype, what
        err = rel(K, self.K64)
        tol = 16 * self.T * self.eps * 10
        assert err <= tol, f"{what}: relative error {err:.3g} > {tol:.3g}"


@functools.lru_cache(maxsize=1)
def gram_problem(T, dtype):
    return GramProblem(T, dtype)


def numpy_peak(fn) -> int:
    tracemalloc.start()
    try:
        fn()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


# -- solve cases ------------------------------------------------------------------------------
def solve_case_woodbury_gemms(P):
    acts, errs, U, w = P.acts, P.errs, P.U, P.w

    def gemms():
        out = []
        for a, e, u in zip(acts, errs, U):
            a @ u.T
            out.append((e * w[:, None]).T @ a)
        return out

    gemms()
    return gemms


def solve_case_woodbury_solve(P):
    F, U = P.F, P.U
    P.check(F.solve(U), "WoodburyFisher.solve")
    return lambda: F.solve(U)


def solve_case_woodbury_setup_solve(P):
    acts, errs, U, lam = P.acts, P.errs, P.U, P.lam

    def setup_solve():
        return WoodburyFisher(acts, errs, lam).solve(U)

    P.check(setup_solve(), "WoodburyFisher(...).solve")
    return setup_solve


@pytest.mark.parametrize("case", SOLVE_CASES, ids=lambda c: f"{c[0]}:{c[1]}")
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SOLVE_SHAPES, ids=lambda s: s[0])
def test_woodbury_solve(benchmark, shape, dtype, case):
    family, op, floor = case
    sid, N, d = shape
    P = solve_problem(N, d, dtype)
    P.cases[op] = target = SOLVE_FUNCS[op](P)  # checks correctness, then hands back what to time
    rounds, warmup = _rounds(P.work * (2 if op == "woodbury_setup_solve" else 1))
    benchmark.group = f"{family} {sid} {dtype}"
    benchmark.extra_info.update(
        family=family, op=op, floor=floor, n=N, N=N, d=d, layers="2 dense d x d", P=2 * d * d,
        shape=sid, dtype=dtype, rounds=rounds, damping=P.lam,
    )
    if op == "woodbury_solve" and d == 2000:
        peak = numpy_peak(lambda: P.F.solve(P.U))
        benchmark.extra_info.update(solve_peak_bytes=peak, dense_gradient_bytes=2 * d * d * N * P.dtype.itemsize)
    _run_paired(benchmark, target, None, _floor(P, floor, SOLVE_FUNCS), rounds, warmup)


SOLVE_FUNCS = {"woodbury_gemms": solve_case_woodbury_gemms, "woodbury_solve": solve_case_woodbury_solve,
               "woodbury_setup_solve": solve_case_woodbury_setup_solve}


def _floor(P, floor, funcs):
    """The floor's target, built here when the floor case itself was deselected (-k)."""
    if floor is None:
        return None
    if floor not in P.cases:
        P.cases[floor] = funcs[floor](P)
    return P.cases[floor]


# -- gram cases -------------------------------------------------------------------------------
def gram_case_gram_reference(G):
    A, E = G.A, G.E
    G.check(gram_shared_reference(np, A, E), "gram_shared_reference")
    return lambda: gram_shared_reference(np, A, E)


def gram_case_gram_kernel(G):
    if kernels.compiled(np) is None:
        pytest.skip("kronlin._C is absent or disabled")
    A, E = G.A, G.E
    G.check(gram_shared(np, A, E, "kernel"), "gram kernel")
    return lambda: gram_shared(np, A, E, "kernel")


def gram_case_gram_composition_full(G):
    if G.T > FULL_COMPOSITION_MAX_T:
        pytest.skip(f"the single-block composition needs 3 x (N·T)² = {3 * (GRAM_N * G.T) ** 2 * 8 / 2**30:.1f} GiB")
    A, E = G.A, G.E
    G.check(gram_shared_reference(np, A, E, block_bytes=2**62), "full composition")
    return lambda: gram_shared_reference(np, A, E, block_bytes=2**62)


def gram_case_gram_grad(G):
    A, E = G.A, G.E
    G.check(gram_shared_grad(np, A, E), "gram_shared_grad")
    return lambda: gram_shared_grad(np, A, E)


@pytest.mark.parametrize("case", GRAM_CASES, ids=lambda c: f"{c[0]}:{c[1]}")
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("T", GRAM_T, ids=lambda t: f"T{t}")
def test_woodbury_gram(benchmark, T, dtype, case):
    family, op, floor = case
    G = gram_problem(T, dtype)
    G.cases[op] = target = GRAM_FUNCS[op](G)
    rounds, warmup = _rounds(G.work)
    peak = numpy_peak(target)
    if op == "gram_kernel":  # the packed copy of A and E, invisible to tracemalloc
        lanes = 8 if G.dtype == np.float64 else 16
        peak += GRAM_N * -(-T // lanes) * lanes * (GRAM_DA + GRAM_DE) * G.dtype.itemsize
    benchmark.group = f"{family} T{T} {dtype}"
    benchmark.extra_info.update(
        family=family, op=op, floor=floor, n=T, T=T, N=GRAM_N, d_in=GRAM_DA, d_out=GRAM_DE,
        shape=f"N{GRAM_N}_T{T}_{GRAM_DE}x{GRAM_DA}", dtype=dtype, rounds=rounds, peak_bytes=peak,
        isa=getattr(kernels.compiled(np), "woodbury_gram_isa", lambda: None)(),
    )
    _run_paired(benchmark, target, None, _floor(G, floor, GRAM_FUNCS), rounds, warmup)


GRAM_FUNCS = {"gram_reference": gram_case_gram_reference, "gram_kernel": gram_case_gram_kernel,
              "gram_composition_full": gram_case_gram_composition_full, "gram_grad": gram_case_gram_grad}


# -- Gᵀu: the GEMM and what a fused kernel could save -------------------------------------------
def gtu_case_gemm(P):
    a, u = P.acts[0], P.U[0]
    return lambda: a @ u.T


def gtu_case_woodbury_gtu(P):
    F1 = WoodburyFisher(P.acts[:1], P.errs[:1], P.lam)
    u = P.U[0]
    v = F1.quad([u])  # scale·|Gᵀu|²: Gᵀu plus a sum over its M entries
    ref = np.sum((P.acts64[0] @ P.U64[0].T) * P.errs64[0], axis=1)
    assert rel(v, F1.scale * np.sum(ref * ref)) <= 64 * 2000 * P.eps, "uᵀFu = scale·|Gᵀu|² differs from the direct float64 evaluation"
    return lambda: F1.quad([u])


GTU_FUNCS = {"gemm": gtu_case_gemm, "woodbury_gtu": gtu_case_woodbury_gtu}


@pytest.mark.parametrize("case", GTU_CASES, ids=lambda c: f"{c[0]}:{c[1]}")
@pytest.mark.parametrize("dtype", DTYPES)
def test_woodbury_gtu(benchmark, dtype, case):
    """One 2000 x 2000 dense layer, N = 64: Gᵀu against its GEMM A @ Uᵀ."""
    family, op, floor = case
    P = solve_problem(64, 2000, dtype)
    P.cases["gtu:" + op] = target = GTU_FUNCS[op](P)
    benchmark.group = f"{family} N64_2000x2000 {dtype}"
    benchmark.extra_info.update(family=family, op=op, floor=floor, n=64, N=64, d=2000, shape="N64_2000x2000",
                                dtype=dtype, rounds=40)
    ftarget = None
    if floor is not None:
        ftarget = P.cases.get("gtu:" + floor) or GTU_FUNCS[floor](P)
    _run_paired(benchmark, target, None, ftarget, 40, 3)


# -- paired timing (as in test_bench_kron.py) -------------------------------------------------------
def _run_paired(benchmark, target, setup, ftarget, rounds, warmup):
    time_paired(benchmark, target, setup, rounds, warmup, ftarget)
