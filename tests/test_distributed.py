"""kronlin.distributed: in-process tests of the pure parts, and 1/2/3-rank runs under mpiexec.

The MPI runs launch ``tests/mpi_worker.py`` with ``mpiexec -n R`` as a
subprocess with a timeout (the process group is killed and the test fails if
it is exceeded: nothing here can hang).  Each rank recomputes the
single-process reference from the same seeded data and prints its errors; the
tolerances are asserted here.  Skipped, with the reason, when mpi4py or
mpiexec is missing (``pip install '.[mpi]'``).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import kronlin.distributed as kd

from mpi_helpers import MPIEXEC, mpi_env, needs_mpi, run_killable

WORKER = Path(__file__).with_name("mpi_worker.py")
TIMEOUT = 60  # seconds per mpiexec run; a run takes ~1-3 s here

EPS64 = np.finfo(np.float64).eps
EPS32 = np.finfo(np.float32).eps
# the distributed sums differ from one process's only in the order of additions (a few ulps),
# and the steps add the conditioning of these small, well-damped factors (< 1e2)
FACTOR_RTOL = 1e-13
STEP_RTOL = 1e-12
FACTOR_RTOL_F32 = 200 * EPS32  # ~2.4e-5: the same few-ulp argument in float32


def run_mpi(n: int, scenario: str, outdir, timeout: float = TIMEOUT):
    """``mpiexec -n n python mpi_worker.py scenario``: (returncode, per-rank results, output). Never hangs."""
    outdir = Path(outdir)
    outdir.mkdir(parents=True, exist_ok=True)
    rc, out = run_killable([MPIEXEC, "-n", n, sys.executable, WORKER, scenario], timeout,
                           env=mpi_env(KRONLIN_MPI_OUT=str(outdir)))  # fmt: skip
    results = {}
    for f in sorted(outdir.glob("rank*.json")):
        r = json.loads(f.read_text())
        results[r["rank"]] = r
    return rc, results, out


# ----------------------------------------------------------------------------------- pure parts
@pytest.mark.parametrize("n", [0, 1, 2, 5, 17])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_pack_symmetric_roundtrip(n, dtype):
    rng = np.random.default_rng(n)
    M = rng.standard_normal((n, n)).astype(dtype)
    M = M + M.T
    v = kd.pack_symmetric(np, M)
    assert v.shape == (n * (n + 1) // 2,) and v.dtype == dtype
    np.testing.assert_array_equal(v, M[np.triu_indices(n)])
    B = kd.unpack_symmetric(np, v, n)
    assert B.dtype == dtype
    np.testing.assert_array_equal(B, M)


def test_unpack_is_exactly_symmetric_from_the_upper_triangle():
    M = np.arange(16.0).reshape(4, 4)  # not symmetric: the lower triangle is ignored
    B = kd.unpack_symmetric(np, kd.pack_symmetric(np, M), 4)
    np.testing.assert_array_equal(B, np.triu(M) + np.triu(M, 1).T)


CURVES = [784, 200, 100, 50, 25, 12, 6, 12, 25, 50, 100, 200, 784]
CURVES_SHAPES = [(CURVES[k + 1], CURVES[k] + 1) for k in range(12)]


def _brute_force_best(costs, world):
    best = float("inf")
    for code in range(world ** len(costs)):
        loads = [0.0] * world
        for c in costs:
            loads[code % world] += c
            code //= world
        best = min(best, max(loads))
    return best


@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_assign_is_lpt_balanced_and_deterministic(world):
    rng = np.random.default_rng(world)
    for _ in range(20):
        costs = list(rng.uniform(0.1, 10.0, size=int(rng.integers(1, 8))))
        a = kd.assign(costs, world)
        assert a.owners == kd.assign(list(costs), world).owners  # deterministic
        assert len(a.owners) == len(costs) and all(0 <= o < world for o in a.owners)
        loads = [sum(c for c, o in zip(costs, a.owners) if o == r) for r in range(world)]
        np.testing.assert_allclose(a.loads, loads, rtol=1e-12)
        # Graham's bound for LPT: makespan <= (4/3 - 1/(3m)) * optimum
        assert max(loads) <= (4 / 3 - 1 / (3 * world)) * _brute_force_best(costs, world) * (1 + 1e-12)


def test_assign_curves_ae_two_ranks_splits_the_two_big_layers():
    a = kd.assign(kd.layer_costs(CURVES_SHAPES), 2)
    assert a.owners[0] != a.owners[11]  # the 785- and 784-wide factors go to different ranks
    assert a.imbalance < 1.05
    assert kd.assign(kd.layer_costs(CURVES_SHAPES), 1).owners == (0,) * 12


def test_assign_ties_go_to_the_lowest_rank_and_layer():
    a = kd.assign([1.0, 1.0, 1.0, 1.0], 2)
    assert a.owners == (0, 1, 0, 1)


def test_assign_grid_follows_kaisa():
    # 8 ranks, 2 gradient workers per layer: columns {c, c+4}, rows {0..3}, {4..7}
    a = kd.assign([5.0, 4.0, 3.0, 2.0, 1.0], 8, grad_worker_fraction=0.25)
    assert a.n_grad_workers == 2 and a.n_columns == 4
    assert a.column_ranks(1) == [1, 5] and a.row_ranks(1) == [4, 5, 6, 7]
    for k, o in enumerate(a.owners):  # the holders of layer k are its owner's column
        assert k in a.layers_of_column(a.column(o))
    # communication-optimal: one column of everyone; memory-optimal: every rank its own column
    assert kd.assign([1.0], 4, 1.0).n_columns == 1 and kd.assign([1.0], 4, 0.25).n_columns == 4


@pytest.mark.parametrize("frac", [0.3, 1.5, -0.1])
def test_grad_worker_fraction_must_give_a_divisor(frac):
    with pytest.raises(ValueError, match="grad_worker_fraction"):
        kd.grad_workers(4, frac)


def test_assign_rejects_bad_costs():
    with pytest.raises(ValueError, match="costs"):
        kd.assign([1.0, float("nan")], 2)


def test_layer_costs_model():
    c = kd.layer_costs([(10, 20)])
    c0, c3 = kd.COST_MODELS["factored"]
    assert c == [pytest.approx(2 * c0 + c3 * (20**3 + 10**3))]
    with pytest.raises(ValueError, match="damping"):
        kd.layer_costs([(2, 2)], "cholesky")


def test_tridiag_costs_model():
    # part k: Cholesky of layers k and k+1 and the generalized eigenproblems of layer k; the last: one layer
    shapes = [(10, 20), (5, 11), (3, 6)]
    fac, eig = kd.layer_costs(shapes, "factored"), kd.layer_costs(shapes, "exact")
    assert kd.tridiag_costs(shapes) == [fac[0] + fac[1] + eig[0], fac[1] + fac[2] + eig[1], fac[2]]
    assert kd.tridiag_costs(shapes[:1]) == fac[:1] and kd.tridiag_costs([]) == []


def _mpi4py_loaded_after(modules: str):
    """Run ``import sys, <modules>`` in a fresh interpreter; it prints whether mpi4py got imported."""
    code = f"import sys, {modules}; print('mpi4py' in sys.modules)"
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                          cwd=str(Path(__file__).parent))  # fmt: skip


def test_import_kronlin_does_not_import_mpi4py():
    out = _mpi4py_loaded_after("kronlin, kronlin.train")
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False"


def test_distributed_package_imports_mpi4py_lazily():
    out = _mpi4py_loaded_after("kronlin.distributed")
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False"


# ------------------------------------------------------------------------------ under mpiexec
@pytest.fixture(scope="module", params=[1, 2, 3], ids=lambda n: f"{n}rank")
def check_run(request, tmp_path_factory):
    if MPIEXEC is None:
        pytest.skip("mpi4py or mpiexec missing; pip install '.[mpi]'")
    n = request.param
    rc, results, out = run_mpi(n, "check", tmp_path_factory.mktemp(f"check{n}"))
    assert rc == 0, out[-4000:]
    assert sorted(results) == list(range(n)), out[-4000:]
    return n, results


@needs_mpi
def test_factors_equal_single_process(check_run):
    n, results = check_run
    for r in results.values():
        assert r["factor_err"] <= FACTOR_RTOL  # dense, diagonal + cross-layer, 3 running-average updates
        assert r["factor_err_conv"] <= FACTOR_RTOL  # weight-sharing (N, T, d) layers
        assert r["factor_err_f32"] <= FACTOR_RTOL_F32 and r["factor_dtype_f32"] == "float32"
        assert r["symmetric"] and r["est_step"] == 3
        # Σ set-ups (sharded) from the reduced statistics; Ψ/Σ solves amplify the factors' rounding a little
        assert r["tridiag_err"] <= 1e-12


@needs_mpi
def test_sharded_tridiag_inverse_equals_the_single_process_one(check_run):
    n, results = check_run
    owners = results[0]["tridiag_owners"]
    assert len(owners) == 3 and sorted(set(owners)) == list(range(min(n, 3)))  # 3 parts (2 pairs + last) spread
    for r, res in results.items():
        # bit for bit, from the same replicated averages: the parts are the single-process set-ups
        assert res["tridiag_sharded_equal_f64"] and res["tridiag_sharded_equal_f32"]
        assert res["tridiag_owners"] == owners and res["tridiag_mine"] == [k for k, o in enumerate(owners) if o == r]
        # an indefinite Σ_{2|3} (pair 1): the single process's LinAlgError, on every rank, from pair 1's owner
        assert "Σ_{2|3} (layers 1 and 2) is not positive definite" in res["tridiag_bad_single"]
        only_linalg, failed, msg = res["tridiag_bad_sharded"]
        assert only_linalg and failed == [owners[1]] and "Σ_{2|3} (layers 1 and 2) is not positive definite" in msg


@needs_mpi
def test_an_overflowing_step_is_refused_on_every_rank_for_every_placement(check_run):
    n, results = check_run
    assert "is not finite although every input was" in results[0]["overflow_single"]
    for res in results.values():
        assert sorted(res["overflow"]) == sorted({f"{d} {f}" for d in ("factored", "exact") for f in (1.0, 1.0 / n)})
        for key, msg in res["overflow"].items():  # FloatingPointError, as BlockDiagInverse's / KronEigh's refusal
            assert msg is not None and "is not finite although every input was" in msg, key
            if key.startswith("factored"):
                assert "the preconditioned gradient of layer" in msg
    assert len({json.dumps(res["overflow"]) for res in results.values()}) == 1  # the same verdict everywhere


@needs_mpi
def test_gradient_allreduce_is_the_global_batch_gradient(check_run):
    n, results = check_run
    for r in results.values():
        assert r["grad_err"] <= 100 * EPS64  # a weighted sum of n terms: a few ulps


@needs_mpi
def test_packed_reduction_equals_plain_allreduce_in_one_collective(check_run):
    n, results = check_run
    for r in results.values():
        assert r["packed_vs_plain"] <= 10 * EPS64
        assert r["packed_calls"] == 1 and r["plain_calls"] == 10  # 3 Ā, 3 G, 2 Ā_off, 2 G_off: one call instead of 10
        # triangles instead of full symmetric blocks: 5-7-4-3 MLP has (6,8,5) and (7,4,3)
        tri = sum(m * (m + 1) // 2 for m in (6, 8, 5, 7, 4, 3))
        full_sym = sum(m * m for m in (6, 8, 5, 7, 4, 3))
        off = 6 * 8 + 8 * 5 + 7 * 4 + 4 * 3
        assert r["packed_bytes"] == 8 * (2 + tri + off)
        assert r["plain_bytes"] == 8 * (full_sym + off)


@needs_mpi
def test_kfac_step_equals_single_process_for_every_placement(check_run):
    n, results = check_run
    modes = ("factored", "exact", "input")  # input: second_factor=False (FOOF's V (Ā + λI)⁻¹)
    want = {f"{m}@1.000" for m in modes} | {f"{m}@{1 / n:.3f}" for m in modes}
    owners = None
    for r in results.values():
        assert set(r["steps"]) == want
        for name, s in r["steps"].items():
            assert s["err"] <= STEP_RTOL, name
            assert s["identical_across_ranks"], name
            assert s["frozen_kept"], name  # frozen(): a later refresh does not change an earlier preconditioner
            owners = owners or s["owners"]
            assert s["owners"] == owners  # the assignment is identical on every rank
            if name.endswith("@1.000"):  # communication-optimal: every rank holds every inverse
                assert s["held"] == [0, 1, 2]
                assert "step_bcast" not in s["bytes"]
            else:  # memory-optimal: only the owner holds a layer's inverse, and the step is broadcast
                assert s["held"] == [k for k, o in enumerate(owners) if o == r["rank"]]
                assert "inverse_bcast" not in s["bytes"]
                assert s["bytes"]["step_bcast"] == 2 * 8 * (7 * 6 + 4 * 8 + 3 * 5)  # two precondition() calls
    if n > 1:
        assert len(set(owners)) == n  # 3 layers spread over the ranks


@needs_mpi
def test_assignment_identical_and_balanced_on_every_rank(check_run):
    n, results = check_run
    owners = {tuple(r["curves_owners"]) for r in results.values()}
    assert len(owners) == 1
    costs = kd.layer_costs(CURVES_SHAPES)
    lower = max(max(costs), sum(costs) / n)  # no assignment can beat this makespan
    for r in results.values():
        # LPT guarantees 4/3 - 1/(3n) of the optimum; on these costs it is within 1% of the lower bound
        assert max(r["curves_loads"]) <= 1.01 * lower


@needs_mpi
@pytest.mark.parametrize("n", [2, 3])
@pytest.mark.parametrize("scenario,message", [
    ("raise-refresh", "rank 1: ValueError: A_diag"),
    ("raise-update", "rank 1: ValueError: the layers changed"),
])  # fmt: skip
def test_a_rank_that_raises_ends_every_rank_with_its_message(n, scenario, message, tmp_path):
    rc, results, out = run_mpi(n, scenario, tmp_path)
    assert rc != 0
    assert sorted(results) == list(range(n)), out[-4000:]  # every rank raised RankError ...
    for r in results.values():
        assert r["raised"] is not None and message in r["raised"]
    assert "RankError: " in out  # ... and re-raised it uncaught (the outputs of the ranks may interleave)


@needs_mpi
def test_uncaught_exception_aborts_every_rank(tmp_path):
    rc, results, out = run_mpi(2, "abort", tmp_path, timeout=30)
    assert rc != 0
    assert "boom outside any guarded region" in out and "aborting all ranks" in out
    assert not results  # rank 0 never got past its barrier


def test_rank_error_only_names_the_failure_types():
    # kronlin.train turns a RankError whose failures are all LinAlgErrors back into a LinAlgError (a skipped γ)
    assert kd.RankError("refresh", 2, {1: "LinAlgError: not positive definite"}).only("LinAlgError")
    mixed = kd.RankError("refresh", 3, {0: "ValueError: bad", 2: "LinAlgError: singular"})
    assert not mixed.only("LinAlgError") and mixed.only("LinAlgError", "ValueError")
