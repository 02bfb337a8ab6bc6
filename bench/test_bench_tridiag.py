"""Benchmarks of K-FAC's block-tridiagonal inverse (issue 4) against its GEMM floor (docs/design.md §6).

Network: ``depth`` fully connected tanh layers of width ``w`` (layer k: ``W_k`` of shape
``(w, w + 1)``, homogeneous coordinate last), ``N = 2048`` examples.  Activations come
from a forward pass (``a_{k+1} = tanh(ā_k W_kᵀ)``, so consecutive layers' statistics are
correlated, as in a real network) and the back-propagated vectors from the backward
pass of Gaussian output gradients; the factors are ``kronlin.batch_factors(acts, grads)``
(one batch: the tridiagonal blocks come from one joint covariance, so every
``Σ_{i|i+1}`` is positive definite once damped) with factored damping ``gamma = 1e-2``,
``pi="trace"``.

Conventions of ``bench/test_bench_kron.py`` (threads pinned to one by ``conftest.py``):
each case checks its result first and then times it with ``benchmark.pedantic``; every
op is *paired* with its floor (re-timed right before each round;
``extra_info["paired_ratio"]`` = median of ``op_i / floor_i``); all cases of one
``(depth, width, dtype)`` run back to back, floors first.  ``extra_info``: ``family``,
``op``, ``floor``, ``n`` (= width), ``width``, ``depth``, ``q``, ``p`` (one layer's
weight shape), ``shape`` (``"<depth>L_<q>x<p>"``), ``dtype``, ``N``, ``gamma``,
``n_params``, ``gemms`` (GEMMs in the floor).

Families (``op -> floor``)::

  apply  8gemm (floor)           the matrix products of BlockTridiagInverse.apply, as plain NumPy GEMMs
                                 on the very arrays it uses (Ψ^G, Ψ^Ā, the Σ solvers' K1, K2) and
                                 weight-shaped operands: per coupled pair k < depth-1, two for Ξ
                                 (Ψ^G V Ψ^Āᵀ), four for Λ (K2ᵀ V K1, K2 Y K1ᵀ), two for Ξᵀ
                                 (Ψ^Gᵀ Y Ψ^Ā); the last layer's Λ block Σ_ℓ⁻¹ as G⁻¹ V A⁻¹ with
                                 explicit inverses: 8 (depth - 1) + 2 GEMMs in all
         tridiag_apply -> 8gemm  inv.apply(V_list)               (target <= 1.2x at 6 x 512)
         2gemm (floor)           G_k⁻¹ V_k A_k⁻¹ per layer (explicit inverses of the damped factors)
         diag_apply -> 2gemm     BlockDiagInverse.apply(V_list)  (Cholesky solves: the same flops)
  setup  geigh (floor)           scipy.linalg.eigh(C_k, Ā_kk) and eigh(D_k, G_kk) for each coupled
                                 pair: the LAPACK work of the Σ_{k|k+1} set-ups
         tridiag_setup -> geigh  BlockTridiagInverse(A_diag, G_diag, A_off, G_off, gamma, pi)
         diag_setup              BlockDiagInverse(A_diag, G_diag, gamma, pi) construction: it only
                                 validates and damps — the Cholesky factorizations are deferred to
                                 the first apply
         diag_setup_apply        BlockDiagInverse(...).apply(V_list): construction + first apply

``report.py`` also gives tridiag / diag for apply (≈ 4 by flop count) and set-up.

Grid: width ∈ (128, 256, 512, 1024) at depth 6 and depth ∈ (2, 4, 8) at width 512,
float32 and float64; the set-up family up to width 512 only.
"""

from __future__ import annotations

import functools

import numpy as np
import pytest
import scipy.linalg

import kronlin
from _harness import time_paired

SEED = 20240613
N_EXAMPLES = 2048
GAMMA = 1e-2
PI = "trace"
DTYPES = ["float32", "float64"]

#: (depth, width): width scaling at depth 6, depth scaling at width 512 (6 x 512 once).
CONFIGS = [(6, w) for w in (128, 256, 512, 1024)] + [(d, 512) for d in (2, 4, 8)]
SETUP_MAX_WIDTH = 512
#: The issue's target configuration (apply <= 1.2x its floor) gets at least this many rounds.
TARGET_CONFIG, TARGET_MIN_ROUNDS = (6, 512), 10

#: (family, op, floor); floors/baselines have floor None.  Order = run order within a config.
CASES = [
    ("setup", "geigh", None),
    ("setup", "tridiag_setup", "geigh"),
    ("setup", "diag_setup", None),
    ("setup", "diag_setup_apply", None),
    ("apply", "8gemm", None),
    ("apply", "tridiag_apply", "8gemm"),
    ("apply", "2gemm", None),
    ("apply", "diag_apply", "2gemm"),
]

#: Nominal single-core rates (flop/s) used only to pick the number of rounds.
NOMINAL_RATE = {"float64": 40e9, "float32": 80e9}


#: Per-layer Python/validation/LAPACK-call overheads (s) that the flop model misses at small widths.
OVERHEAD = {"setup": 4e-3, "apply": 2e-4}


def _rounds(seconds: float):
    """(rounds, warmup) so that a paired case (op + floor per round) takes about 3 s: 3 … 200 rounds."""
    rounds = int(max(3, min(200, 3.0 / max(2 * seconds, 1e-6))))
    return rounds, (1 if seconds < 1.0 else 0)


# -- the network and its factors ------------------------------------------------------------
def network(depth: int, width: int, rng):
    """acts[k] (N, w) = inputs of layer k, grads[k] (N, w) = ∂L/∂s_{k+1} of a tanh MLP, in float64."""
    N = N_EXAMPLES
    Ws = [rng.standard_normal((width, width + 1)) * (1.5 / np.sqrt(width)) for _ in range(depth)]
    a = rng.standard_normal((N, width))
    acts = []
    for W in Ws:
        acts.append(a)
        a = np.tanh(a @ W[:, :width].T + W[:, width])
    g = rng.standard_normal((N, width)) / np.sqrt(N)  # output gradients (sampled targets)
    grads = [None] * depth
    for k in reversed(range(depth)):
        grads[k] = g
        if k > 0:
            g = (g @ Ws[k][:, :width]) * (1.0 - acts[k] ** 2)
    return acts, grads


def _norm2(M, iters=50) -> float:
    """Power-iteration estimate (from below) of the largest eigenvalue of a symmetric PSD matrix."""
    v = np.ones(M.shape[0]) / np.sqrt(M.shape[0])
    lam = 0.0
    for _ in range(iters):
        w = M @ v
        lam = float(np.linalg.norm(w))
        if lam == 0.0:
            break
        v = w / lam
    return lam


class Problem:
    def __init__(self, depth: int, width: int, dtype: str):
        rng = np.random.default_rng([SEED, depth, width])
        self.depth, self.width, self.dtype = depth, width, np.dtype(dtype)
        self.eps = float(np.finfo(self.dtype).eps)
        acts, grads = network(depth, width, rng)
        f = kronlin.batch_factors([a.astype(self.dtype) for a in acts], [g.astype(self.dtype) for g in grads])
        self.A_diag, self.G_diag, self.A_off, self.G_off = f["A_diag"], f["G_diag"], f["A_off"], f["G_off"]
        self.shapes = [(G.shape[0], A.shape[0]) for A, G in zip(self.A_diag, self.G_diag)]  # (q_k, p_k)
        self.V64 = [rng.standard_normal(s) for s in self.shapes]
        self.V = [v.astype(self.dtype) for v in self.V64]
        self.cases = {}

    @property
    def args(self):
        return self.A_diag, self.G_diag, self.A_off, self.G_off

    @property
    def n_params(self) -> int:
        return sum(q * p for q, p in self.shapes)

    @property
    def flops_apply(self) -> float:
        q, p = self.shapes[0]
        return (8 * (self.depth - 1) + 2) * 2.0 * q * p * max(q, p)

    @property
    def flops_setup(self) -> float:
        q, p = self.shapes[0]
        return (self.depth - 1) * 12.0 * (q**3 + p**3)  # two generalized eigh per coupled pair

    @property
    def tol(self) -> float:
        return 64.0 * max(max(s) for s in self.shapes) * self.eps

    @functools.cached_property
    def ref(self):
        """Independent float64 quantities (from this dtype's factors): damped factors, Ψ, C, D, inverses."""
        A = [M.astype(np.float64) for M in self.A_diag]
        G = [M.astype(np.float64) for M in self.G_diag]
        Ao = [M.astype(np.float64) for M in self.A_off]
        Go = [M.astype(np.float64) for M in self.G_off]
        Ad, Gd = [], []
        for a, g in zip(A, G):  # K-FAC §6.3 with π = sqrt((tr A / p) / (tr G / q))
            pi = np.sqrt((np.trace(a) / a.shape[0]) / (np.trace(g) / g.shape[0]))
            Ad.append(a + pi * GAMMA * np.eye(a.shape[0]))
            Gd.append(g + GAMMA / pi * np.eye(g.shape[0]))
        psiA = [np.linalg.solve(Ad[k + 1], Ao[k].T).T for k in range(self.depth - 1)]
        psiG = [np.linalg.solve(Gd[k + 1], Go[k].T).T for k in range(self.depth - 1)]
        C = [psiA[k] @ Ao[k].T for k in range(self.depth - 1)]
        D = [psiG[k] @ Go[k].T for k in range(self.depth - 1)]
        C = [(M + M.T) / 2 for M in C]
        D = [(M + M.T) / 2 for M in D]
        nrm = _norm2
        # ‖Σ_{k|k+1}‖₂ <= ‖Ā‖‖G‖ + ‖C‖‖D‖ (estimates), for the backward errors
        snorm = [nrm(Ad[k]) * nrm(Gd[k]) + (nrm(C[k]) * nrm(D[k]) if k < self.depth - 1 else 0.0)
                 for k in range(self.depth)]
        return {"Ad": Ad, "Gd": Gd, "psiA": psiA, "psiG": psiG, "C": C, "D": D, "snorm": snorm,
                "Ainv": [np.linalg.inv(M) for M in Ad], "Ginv": [np.linalg.inv(M) for M in Gd]}

    @functools.cached_property
    def tri(self):
        return kronlin.BlockTridiagInverse(*self.args, gamma=GAMMA, pi=PI)

    @functools.cached_property
    def diag(self):
        return kronlin.BlockDiagInverse(self.A_diag, self.G_diag, gamma=GAMMA, pi=PI)


@functools.lru_cache(maxsize=1)
def problem(depth, width, dtype):
    return Problem(depth, width, dtype)


# -- checks (float64, independent NumPy code) ----------------------------------------------------
def _check_shapes(U, P, what):
    assert len(U) == P.depth, what
    for k, (u, s) in enumerate(zip(U, P.shapes)):
        assert u.shape == s and u.dtype == P.dtype, f"{what}: layer {k} gave {u.shape} {u.dtype}, want {s} {P.dtype}"


def check_tridiag(U, P, what):
    """``U = Ξᵀ Λ Ξ V``: with ``X = Ξ V`` and ``Y = Ξ⁻ᵀ U`` (unit triangular, forward substitution),
    every ``Σ_{k|k+1} Y_k = X_k`` (``Σ Y = G Y Aᵀ − D Y Cᵀ``, last layer ``G Y Aᵀ``) to a small
    normwise backward error."""
    _check_shapes(U, P, what)
    R, L, V = P.ref, P.depth, P.V64
    U = [u.astype(np.float64) for u in U]
    X = [V[k] - R["psiG"][k] @ V[k + 1] @ R["psiA"][k].T for k in range(L - 1)] + [V[-1]]
    Y = [U[0]]
    for k in range(1, L):
        Y.append(U[k] + R["psiG"][k - 1].T @ Y[k - 1] @ R["psiA"][k - 1])
    for k in range(L):
        SY = R["Gd"][k] @ Y[k] @ R["Ad"][k].T
        if k < L - 1:
            SY = SY - R["D"][k] @ Y[k] @ R["C"][k].T
        berr = np.linalg.norm(SY - X[k]) / (R["snorm"][k] * np.linalg.norm(Y[k]) + np.linalg.norm(X[k]))
        assert berr <= P.tol, f"{what}: layer {k}: backward error of Σ Y = X is {berr:.3g} > {P.tol:.3g}"


def check_diag(U, P, what):
    """``G_k U_k A_kᵀ = V_k`` for every layer (damped factors)."""
    _check_shapes(U, P, what)
    R = P.ref
    for k, (u, v) in enumerate(zip(U, P.V64)):
        u = u.astype(np.float64)
        res = R["Gd"][k] @ u @ R["Ad"][k].T - v
        berr = np.linalg.norm(res) / (R["snorm"][k] * np.linalg.norm(u) + np.linalg.norm(v))
        assert berr <= P.tol, f"{what}: layer {k}: backward error {berr:.3g} > {P.tol:.3g}"


def rel(a, b) -> float:
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), np.finfo(np.float64).tiny))


# -- cases: each checks its result, then returns what to time --------------------------------
def case_8gemm(P):
    inv, V, L = P.tri, P.V, P.depth
    psiA, psiG = inv.psi_A, inv.psi_G
    K = [(s.solver.K1, s.solver.K2) for s in inv.sigma]
    Ainv, Ginv = P.ref["Ainv"][-1].astype(P.dtype), P.ref["Ginv"][-1].astype(P.dtype)
    assert len(K) == L - 1 and all(K1.shape == (p, p) and K2.shape == (q, q)
                                   for (K1, K2), (q, p) in zip(K, P.shapes))

    def eight():
        out = []
        for k in range(L - 1):  # Ξ
            out.append(psiG[k] @ V[k + 1] @ psiA[k].T)
        for k in range(L - 1):  # Λ: the Σ_{k|k+1} solves
            K1, K2 = K[k]
            Y = K2.T @ V[k] @ K1
            out.append(K2 @ Y @ K1.T)
        out.append(Ginv @ V[-1] @ Ainv)  # Λ: Σ_ℓ
        for k in range(1, L):  # Ξᵀ
            out.append(psiG[k - 1].T @ V[k - 1] @ psiA[k - 1])
        return out

    out = eight()
    assert len(out) == 3 * (L - 1) + 1
    # Ψ as kronlin computed it vs the float64 reference (the Ξ products in the floor are those of apply)
    for k in range(L - 1):
        assert rel(psiA[k], P.ref["psiA"][k]) <= 1e3 * P.tol and rel(psiG[k], P.ref["psiG"][k]) <= 1e3 * P.tol
    return eight


def case_tridiag_apply(P):
    inv, V = P.tri, P.V
    check_tridiag(inv.apply(V), P, "BlockTridiagInverse.apply")
    return lambda: inv.apply(V)


def case_2gemm(P):
    V = P.V
    Ainv = [M.astype(P.dtype) for M in P.ref["Ainv"]]
    Ginv = [M.astype(P.dtype) for M in P.ref["Ginv"]]

    def two():
        return [g @ v @ a for g, v, a in zip(Ginv, V, Ainv)]

    check_diag(two(), P, "G⁻¹ V A⁻¹ with explicit inverses")
    return two


def case_diag_apply(P):
    inv, V = P.diag, P.V
    check_diag(inv.apply(V), P, "BlockDiagInverse.apply")
    return lambda: inv.apply(V)


def case_geigh(P):
    R, dt, L = P.ref, P.dtype, P.depth
    pairs = [(R["C"][k].astype(dt), R["Ad"][k].astype(dt), R["D"][k].astype(dt), R["Gd"][k].astype(dt))
             for k in range(L - 1)]

    def geigh():
        return [(scipy.linalg.eigh(C, A), scipy.linalg.eigh(D, G)) for C, A, D, G in pairs]

    for ((s1, K1), (s2, K2)), (C, A, D, G) in zip(geigh(), pairs):
        # Σ_{k|k+1} positive definite: 1 - s2 s1 > 0 (K-FAC §4.3)
        assert float(np.max(s1)) * float(np.max(s2)) < 1 and float(np.min(s1)) > -P.tol
        res = np.linalg.norm(C @ K1 - (A @ K1) * s1) / (np.linalg.norm(C) * np.linalg.norm(K1))
        assert res <= P.tol, f"eigh(C, A) residual {res:.3g}"
    return geigh


def case_tridiag_setup(P):
    args = P.args

    def setup_op():
        return kronlin.BlockTridiagInverse(*args, gamma=GAMMA, pi=PI)

    inv = setup_op()
    assert inv.n_layers == P.depth and inv.shapes == P.shapes and len(inv.sigma) == P.depth - 1
    check_tridiag(inv.apply(P.V), P, "BlockTridiagInverse(...).apply after a fresh set-up")
    P.__dict__.setdefault("tri", inv)
    return setup_op


def case_diag_setup(P):
    Ad, Gd = P.A_diag, P.G_diag

    def setup_op():
        return kronlin.BlockDiagInverse(Ad, Gd, gamma=GAMMA, pi=PI)

    check_diag(setup_op().apply(P.V), P, "BlockDiagInverse(...).apply after a fresh set-up")
    return setup_op


def case_diag_setup_apply(P):
    Ad, Gd, V = P.A_diag, P.G_diag, P.V

    def setup_apply():
        return kronlin.BlockDiagInverse(Ad, Gd, gamma=GAMMA, pi=PI).apply(V)

    check_diag(setup_apply(), P, "BlockDiagInverse(...).apply")
    return setup_apply


CASE_FUNCS = {name[len("case_"):]: fn for name, fn in globals().items() if name.startswith("case_")}


def _case(P, op, check: bool):
    if check or op not in P.cases:
        P.cases[op] = CASE_FUNCS[op](P)
    return P.cases[op]


def _params():
    out = []
    for depth, width in CONFIGS:
        for dtype in DTYPES:
            for case in CASES:
                if case[0] == "setup" and width > SETUP_MAX_WIDTH:
                    continue
                out.append(pytest.param((depth, width), dtype, case, id=f"d{depth}_w{width}-{dtype}-{case[0]}:{case[1]}"))
    return out


@pytest.mark.parametrize("config, dtype, case", _params())
def test_tridiag(benchmark, config, dtype, case):
    family, op, floor = case
    depth, width = config
    P = problem(depth, width, dtype)
    target = _case(P, op, check=True)  # checks correctness, then hands back what to time
    flops = P.flops_setup if family == "setup" else P.flops_apply
    rounds, warmup = _rounds(flops / NOMINAL_RATE[dtype] + OVERHEAD[family] * depth)
    if (depth, width) == TARGET_CONFIG and family == "apply":
        rounds = max(rounds, TARGET_MIN_ROUNDS)
    q, p = P.shapes[0]
    benchmark.group = f"{family} {depth}L_{q}x{p} {dtype}"
    benchmark.extra_info.update(
        family=family, op=op, floor=floor, n=width, width=width, depth=depth, q=q, p=p,
        shape=f"{depth}L_{q}x{p}", dtype=dtype, rounds=rounds, N=N_EXAMPLES, gamma=GAMMA, pi=PI,
        n_params=P.n_params, gemms=(8 * (depth - 1) + 2) if op == "8gemm" else (2 * depth if op == "2gemm" else None),
    )
    time_paired(benchmark, target, None, rounds, warmup, None if floor is None else _case(P, floor, check=False))
