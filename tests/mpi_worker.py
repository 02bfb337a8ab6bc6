"""Run under ``mpiexec -n R`` by tests/test_distributed.py; writes one ``rank<r>.json`` per rank to ``$KRONLIN_MPI_OUT``.

Scenarios (argv[1]):

* ``check`` — the distributed factors, estimator, gradient all-reduce and
  K-FAC step against the single-process computation on the concatenated
  batch (every rank recomputes the reference from the same seeded data), the
  packed reduction against a plain per-array ``Allreduce``, and the layer
  assignment.  Prints errors; the test asserts the tolerances.
* ``raise-refresh`` — rank 1 gets a non-finite factor for a layer it inverts:
  every rank must raise RankError (uncaught: every process exits non-zero).
* ``raise-update`` — rank 1's activations have the wrong width at the second
  update (after the layout was agreed): every rank must raise RankError.
* ``abort`` — rank 1 raises outside any guarded code while rank 0 waits in a
  barrier; install_abort_hook must end both.
"""

from __future__ import annotations

import json
import os
import sys

import numpy as np
from mpi4py import MPI

import kronlin
import kronlin.distributed as kd

comm = MPI.COMM_WORLD
rank, world = comm.Get_rank(), comm.Get_size()
SPLITS = {1: [23], 2: [16, 7], 3: [12, 0, 11]}  # uneven, one rank empty at 3 ranks
WIDTHS = [5, 7, 4, 3]  # a small tanh MLP 5-7-4-3


def emit(**kw):
    """Write this rank's results to $KRONLIN_MPI_OUT/rank<r>.json (stdout of several ranks may interleave)."""
    path = os.path.join(os.environ["KRONLIN_MPI_OUT"], f"rank{rank}.json")
    with open(path + ".tmp", "w") as f:
        json.dump({"rank": rank, "world": world, **kw}, f)
    os.replace(path + ".tmp", path)


def rel(a, b):
    a, b = np.asarray(a), np.asarray(b)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), np.finfo(np.float64).tiny))


def my_slice(N_total):
    sizes = SPLITS[world] if sum(SPLITS[world]) == N_total else [N_total // world] * world
    start = sum(sizes[:rank])
    return slice(start, start + sizes[rank]), sizes[rank]


def mlp_batch(rng, N):
    """Activations ā_k (without the 1), back-propagated g_k (squared loss) and the mean-loss gradient per layer."""
    Ws = [rng.standard_normal((WIDTHS[k + 1], WIDTHS[k] + 1)) / np.sqrt(WIDTHS[k] + 1) for k in range(len(WIDTHS) - 1)]
    X, Y = rng.standard_normal((N, WIDTHS[0])), rng.standard_normal((N, WIDTHS[-1]))
    acts, pre = [], []
    a = X
    for k, W in enumerate(Ws):
        acts.append(a)
        s = np.concatenate([a, np.ones((N, 1))], axis=1) @ W.T
        pre.append(s)
        a = s if k == len(Ws) - 1 else np.tanh(s)
    g = a - Y  # ∂(½‖out − y‖²)/∂s per example
    grads = [None] * len(Ws)
    for k in range(len(Ws) - 1, -1, -1):
        grads[k] = g
        if k:
            g = (g @ Ws[k][:, :-1]) * (1 - np.tanh(pre[k - 1]) ** 2)
    return Ws, acts, grads


def layer_grads(acts, grads, sl, n):
    """Mean-loss gradient over the rows ``sl`` (zeros when the rank holds no example)."""
    out = []
    for a, g in zip(acts, grads):
        ab = np.concatenate([a[sl], np.ones((n, 1))], axis=1)
        out.append(g[sl].T @ ab / n if n else np.zeros((g.shape[1], ab.shape[1])))
    return out


def check():
    res = {}
    rng = np.random.default_rng(7)
    N = 23
    sl, n = my_slice(N)
    # --- factors: dense tridiagonal, weight-sharing, float32; three updates of the running averages
    est_tri = kd.DistributedFactorEstimator(comm, tridiagonal=True)
    est_conv = kd.DistributedFactorEstimator(comm, tridiagonal=False)
    est32 = kd.DistributedFactorEstimator(comm, tridiagonal=True)
    ref_tri = kronlin.FactorEstimator(tridiagonal=True)
    ref_conv = kronlin.FactorEstimator(tridiagonal=False)
    ref32 = kronlin.FactorEstimator(tridiagonal=True)
    err_tri = err_conv = err32 = 0.0
    for it in range(3):
        _, acts, grads = mlp_batch(rng, N)
        est_tri.update([a[sl] for a in acts], [g[sl] for g in grads])
        ref_tri.update(acts, grads)
        pa = [rng.standard_normal((N, 6, 4)), rng.standard_normal((N, 3))]
        pg = [rng.standard_normal((N, 6, 5)), rng.standard_normal((N, 2))]
        est_conv.update([a[sl] for a in pa], [g[sl] for g in pg])
        ref_conv.update(pa, pg)
        a32, g32 = [a.astype(np.float32) for a in acts], [g.astype(np.float32) for g in grads]
        est32.update([a[sl] for a in a32], [g[sl] for g in g32])
        ref32.update(a32, g32)
        for key in ("A_diag", "G_diag", "A_off", "G_off"):
            err_tri = max([err_tri] + [rel(x, y) for x, y in zip(getattr(est_tri, key), getattr(ref_tri, key))])
            err32 = max([err32] + [rel(x, y) for x, y in zip(getattr(est32, key), getattr(ref32, key))])
        for key in ("A_diag", "G_diag"):
            err_conv = max([err_conv] + [rel(x, y) for x, y in zip(getattr(est_conv, key), getattr(ref_conv, key))])
    res["factor_err"] = err_tri
    res["factor_err_conv"] = err_conv
    res["factor_err_f32"] = err32
    res["factor_dtype_f32"] = str(est32.A_diag[0].dtype)
    res["symmetric"] = all(np.array_equal(M, M.T) for M in est_tri.A_diag + est_tri.G_diag)
    res["est_step"] = est_tri.step
    # the tridiagonal inverse of the reduced statistics (its set-ups sharded over the ranks)
    V = [rng.standard_normal((WIDTHS[k + 1], WIDTHS[k] + 1)) for k in range(len(WIDTHS) - 1)]
    res["tridiag_err"] = max(rel(x, y) for x, y in zip(est_tri.block_tridiag_inverse(gamma=0.1).apply(V),
                                                        ref_tri.block_tridiag_inverse(gamma=0.1).apply(V)))
    # the same, its set-ups sharded (DistributedTridiag) against the single-process operator from the same
    # (replicated) averages: bit for bit, float64 and float32
    for name, est in (("f64", est_tri), ("f32", est32)):
        args = (est.A_diag, est.G_diag, est.A_off, est.G_off)
        shapes = [(G.shape[0], A.shape[0]) for A, G in zip(est.A_diag, est.G_diag)]
        dt = kd.DistributedTridiag(comm, shapes)
        Vd = [v.astype(est.A_diag[0].dtype) for v in V]
        got, want = dt.build(*args, gamma=0.1).apply(Vd), kronlin.BlockTridiagInverse(*args, gamma=0.1).apply(Vd)
        res[f"tridiag_sharded_equal_{name}"] = all(np.array_equal(x, y) and x.dtype == y.dtype
                                                   for x, y in zip(got, want))  # fmt: skip
        res["tridiag_owners"], res["tridiag_mine"] = list(dt.assignment.owners), sorted(dt.refresh_times)
    # a Σ_{2|3} that is not positive definite (stale cross-layer factor): a LinAlgError on the rank that sets
    # that pair up is a RankError naming it on every rank
    bad_off = [est_tri.A_off[0], 50.0 * est_tri.A_off[1]]
    try:
        kronlin.BlockTridiagInverse(est_tri.A_diag, est_tri.G_diag, bad_off, est_tri.G_off, gamma=0.1)
        res["tridiag_bad_single"] = None
    except np.linalg.LinAlgError as e:
        res["tridiag_bad_single"] = str(e)
    try:
        dt = kd.DistributedTridiag(comm, [(G.shape[0], A.shape[0]) for A, G in zip(est_tri.A_diag, est_tri.G_diag)])
        dt.build(est_tri.A_diag, est_tri.G_diag, bad_off, est_tri.G_off, gamma=0.1)
        res["tridiag_bad_sharded"] = None
    except kd.RankError as e:
        res["tridiag_bad_sharded"] = [e.only("LinAlgError"), sorted(e.failures), str(e)]
    # a step that overflows (finite gradient scaled to max|V| = 1e308): FloatingPointError on every rank, for
    # the communication- and the memory-optimal placement (the owner's step is broadcast, then checked)
    shapes = [(G.shape[0], A.shape[0]) for A, G in zip(est_tri.A_diag, est_tri.G_diag)]
    big = [v / np.max(np.abs(v)) * 1e308 for v in V]
    res["overflow"] = {}
    for damping in ("factored", "exact"):  # exact: KronEigh.solve refuses on the worker, the check-in tells all
        for frac in sorted({1.0, 1.0 / world}):
            kf = kd.DistributedKFAC(comm, shapes, grad_worker_fraction=frac, damping=damping)
            kf.refresh(est_tri.A_diag, est_tri.G_diag, gamma=0.1)
            try:
                kf.precondition(big, damping=1e-3)
                res["overflow"][f"{damping} {frac}"] = None
            except FloatingPointError as e:
                res["overflow"][f"{damping} {frac}"] = str(e)
            kf.free()
    try:
        kronlin.BlockDiagInverse(est_tri.A_diag, est_tri.G_diag, gamma=0.1).apply(big)
        res["overflow_single"] = None
    except FloatingPointError as e:
        res["overflow_single"] = str(e)

    # --- packed reduction against a plain per-array Allreduce
    _, acts, grads = mlp_batch(rng, N)
    log = kd.CommLog()
    red = kd.FactorReducer(comm, tridiagonal=True, log=log)
    red.reduce([a[sl] for a in acts], [g[sl] for g in grads])  # first call agrees on the layout
    log.clear()
    packed = red.reduce([a[sl] for a in acts], [g[sl] for g in grads])
    local = kronlin.batch_factors([a[sl] for a in acts], [g[sl] for g in grads]) if n else None
    plain, plain_bytes, plain_calls = {}, 0, 0
    cnt = np.array([float(n)])
    comm.Allreduce(MPI.IN_PLACE, cnt, op=MPI.SUM)
    for key in ("A_diag", "G_diag", "A_off", "G_off"):
        plain[key] = []
        for k, M in enumerate(packed[key]):
            buf = local[key][k] * n if local is not None else np.zeros_like(M)
            buf = np.ascontiguousarray(buf)
            comm.Allreduce(MPI.IN_PLACE, buf, op=MPI.SUM)
            plain_bytes += buf.nbytes
            plain_calls += 1
            plain[key].append(buf / cnt[0])
    res["packed_vs_plain"] = max(rel(packed[k][i], plain[k][i]) for k in plain for i in range(len(plain[k])))
    res["packed_calls"] = len(log.entries)
    res["packed_bytes"] = log.per_kind().get("factor_allreduce", 0)
    res["plain_calls"] = plain_calls
    res["plain_bytes"] = plain_bytes

    # --- K-FAC step of the small MLP: every placement and both damping modes against one process
    fracs = sorted({1.0, 1.0 / world})
    _, acts, grads = mlp_batch(rng, N)
    est = kd.DistributedFactorEstimator(comm, tridiagonal=False)
    ref = kronlin.FactorEstimator(tridiagonal=False)
    for it in range(2):
        _, acts, grads = mlp_batch(rng, N)
        est.update([a[sl] for a in acts], [g[sl] for g in grads])
        ref.update(acts, grads)
    g_local = layer_grads(acts, grads, sl, n)
    g_glob = kd.allreduce_mean(comm, g_local, n)
    g_ref = layer_grads(acts, grads, slice(0, N), N)
    res["grad_err"] = max(rel(x, y) for x, y in zip(g_glob, g_ref))
    shapes = [tuple(G.shape) for G in g_ref]
    step_ref = ref.block_diag_inverse(gamma=0.3).apply(g_ref)
    eighs = [kronlin.Kron(A, G).eigh() for A, G in zip(ref.A_diag, ref.G_diag)]
    step_ref_exact = [e.solve(V, damping=0.05) for e, V in zip(eighs, g_ref)]
    # second_factor=False (FOOF): V (Ā + 0.3 I)⁻¹ as the single process's Kron(Ā + 0.3 I, I).solve
    step_ref_input = [kronlin.Kron(A + 0.3 * np.eye(len(A)), np.eye(V.shape[0])).solve(V)
                      for A, V in zip(ref.A_diag, g_ref)]  # fmt: skip
    wants = {"factored": step_ref, "exact": step_ref_exact, "input": step_ref_input}
    res["steps"] = {}
    for frac in fracs:
        for mode in ("factored", "exact", "input"):
            clog = kd.CommLog()
            kf = kd.DistributedKFAC(comm, shapes, damping="factored" if mode == "input" else mode,
                                    grad_worker_fraction=frac, log=clog, second_factor=mode != "input")  # fmt: skip
            G_diag, pi = (None, 1.0) if mode == "input" else (est.G_diag, "trace")
            kf.refresh(est.A_diag, G_diag, gamma=0.3, pi=pi)
            step = kf.precondition(g_glob, damping=0.05)
            frozen = kf.frozen(damping=0.05)
            kf.refresh(est.A_diag, G_diag, gamma=0.7, pi=pi)
            kept = frozen.apply(g_glob)  # the first refresh's preconditioner, after a second refresh
            want = wants[mode]
            flat = np.concatenate([s.ravel() for s in step])
            same = comm.allgather(flat.tobytes())
            res["steps"][f"{mode}@{frac:.3f}"] = {
                "err": max(rel(x, y) for x, y in zip(step, want)),
                "identical_across_ranks": all(s == same[0] for s in same),
                "frozen_kept": all(np.array_equal(x, y) for x, y in zip(kept, step)),
                "held": sorted(kf._held), "owners": list(kf.assignment.owners),
                "bytes": clog.per_kind(),
            }
            kf.free()

    # --- the assignment: identical on every rank, balanced
    curves = [784, 200, 100, 50, 25, 12, 6, 12, 25, 50, 100, 200, 784]
    cshapes = [(curves[k + 1], curves[k] + 1) for k in range(12)]
    a = kd.assign(kd.layer_costs(cshapes), world)
    res["curves_owners"] = list(a.owners)
    res["curves_loads"] = list(a.loads)
    emit(**res)


def raise_refresh():
    shapes = [(3, 4), (2, 4)]
    kf = kd.DistributedKFAC(comm, shapes)
    A = [np.eye(4), np.eye(4)]
    G = [np.eye(3), np.eye(2)]
    if rank == 1:  # only rank 1 sees the bad factor of a layer it owns
        A = [np.full((4, 4), np.nan) if k in kf.my_layers else A[k] for k in range(2)]
    try:
        kf.refresh(A, G, gamma=0.1)
    except kd.RankError as e:
        emit(raised=str(e))
        raise
    emit(raised=None)


def raise_update():
    est = kd.DistributedFactorEstimator(comm, tridiagonal=False)
    rng = np.random.default_rng(0)
    est.update([rng.standard_normal((4, 3))], [rng.standard_normal((4, 2))])
    width = 5 if rank == 1 else 3
    try:
        est.update([rng.standard_normal((4, width))], [rng.standard_normal((4, 2))])
    except kd.RankError as e:
        emit(raised=str(e))
        raise
    emit(raised=None)


def abort():
    kd.install_abort_hook(comm)
    if rank == 1:
        raise ValueError("boom outside any guarded region")
    comm.Barrier()  # rank 0 would wait here forever without the hook
    emit(raised=None)


if __name__ == "__main__":
    {"check": check, "raise-refresh": raise_refresh, "raise-update": raise_update, "abort": abort}[sys.argv[1]]()
