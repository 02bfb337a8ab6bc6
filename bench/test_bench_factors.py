"""Benchmarks of ``FactorEstimator.update`` (K-FAC §5's running factor averages) against its GEMMs.

Conventions of ``bench/test_bench_kron.py`` (``bench/conftest.py`` pins BLAS and
OpenMP to one thread): each case is checked first (the estimator's factors
against ``XᵀX/N`` computed independently in float64), then timed with
``benchmark.pedantic``, every round paired with a run of its floor right before
it (``extra_info["paired_ratio"]``).  ``extra_info`` carries ``family``, ``op``,
``floor``, ``n``, ``shape``, ``dtype`` as ``bench/report.py`` reads them.

Family ``update`` (``op -> floor``)::

    gemms_diag (floor)                the products alone: aᵀa and gᵀg per layer
    update_diag -> gemms_diag         FactorEstimator(tridiagonal=False).update(acts, grads), warm
                                      (validation, the products, the decaying average)
    gemms_tridiag (floor)             the same plus a_kᵀa_{k+1} and g_kᵀg_{k+1}
    update_tridiag -> gemms_tridiag   FactorEstimator(tridiagonal=True).update(acts, grads)

Networks: ``curves`` (the curves-ae autoencoder of kronlin.train, 12 layers,
widths 784 … 6 … 784, batch 256) and ``mlp6x512`` (6 layers of width 512, batch 1024).
"""

from __future__ import annotations

import functools

import numpy as np
import pytest

from _harness import time_paired
from kronlin import FactorEstimator

SEED = 20261122
DTYPES = ["float32", "float64"]
NETS = {
    "curves": ([784, 200, 100, 50, 25, 12, 6, 12, 25, 50, 100, 200, 784], 256),
    "mlp6x512": ([512] * 7, 1024),
}
CASES = [
    ("update", "gemms_diag", None),
    ("update", "update_diag", "gemms_diag"),
    ("update", "gemms_tridiag", None),
    ("update", "update_tridiag", "gemms_tridiag"),
]


class Problem:
    def __init__(self, net: str, dtype: str):
        widths, N = NETS[net]
        rng = np.random.default_rng([SEED, N, len(widths)])
        self.N, self.dtype = N, np.dtype(dtype)
        ones = np.ones((N, 1))
        self.acts64 = [np.concatenate([np.tanh(rng.standard_normal((N, w))), ones], axis=1) for w in widths[:-1]]
        self.grads64 = [rng.standard_normal((N, w)) / np.sqrt(w) for w in widths[1:]]
        self.acts = [a.astype(self.dtype) for a in self.acts64]
        self.grads = [g.astype(self.dtype) for g in self.grads64]
        self.work = 2.0 * N * sum(a.shape[1] ** 2 + g.shape[1] ** 2 for a, g in zip(self.acts, self.grads))
        self.cases = {}

    def check(self, est, what):
        tol = 1e-4 if self.dtype == np.float32 else 1e-12  # one GEMM's accumulation error over N rows
        for mine, X in [(est.A_diag, self.acts64), (est.G_diag, self.grads64)]:
            for M, x in zip(mine, X):
                ref = x.T @ x / self.N
                err = np.linalg.norm(np.asarray(M, np.float64) - ref) / np.linalg.norm(ref)
                assert M.dtype == self.dtype and err < tol and np.array_equal(M, M.T), (what, err)


@functools.lru_cache(maxsize=1)
def problem(net, dtype):
    return Problem(net, dtype)


def _gemms(P, tridiagonal):
    acts, grads = P.acts, P.grads

    def gemms():
        out = [a.T @ a for a in acts] + [g.T @ g for g in grads]
        if tridiagonal:
            out += [acts[k].T @ acts[k + 1] for k in range(len(acts) - 1)]
            out += [grads[k].T @ grads[k + 1] for k in range(len(grads) - 1)]
        return out

    return gemms


def _update(P, tridiagonal, what):
    est = FactorEstimator(tridiagonal=tridiagonal, append_one=False)
    for _ in range(3):  # warm: past the first updates, the decaying average is in use
        est.update(P.acts, P.grads)
    P.check(est, what)
    return lambda: est.update(P.acts, P.grads)


FUNCS = {
    "gemms_diag": lambda P: _gemms(P, False),
    "gemms_tridiag": lambda P: _gemms(P, True),
    "update_diag": lambda P: _update(P, False, "update_diag"),
    "update_tridiag": lambda P: _update(P, True, "update_tridiag"),
}


@pytest.mark.parametrize("case", CASES, ids=[c[1] for c in CASES])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("net", list(NETS))
def test_factors(benchmark, net, dtype, case):
    family, op, floor = case
    P = problem(net, dtype)
    P.cases[op] = target = FUNCS[op](P)
    if floor is not None and floor not in P.cases:
        P.cases[floor] = FUNCS[floor](P)
    rounds, warmup = (60, 5) if P.work < 2e9 else (20, 2)
    benchmark.group = f"{family} {net} {dtype}"
    benchmark.extra_info.update(family=family, op=op, floor=floor, n=P.N, N=P.N, layers=len(P.acts), shape=net,
                                dtype=dtype, rounds=rounds)  # fmt: skip
    time_paired(benchmark, target, None, rounds, warmup, floor=P.cases.get(floor))
