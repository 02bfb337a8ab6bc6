"""Measured scaling of kronlin.distributed: 1 vs 2 ranks (refresh, step, bytes per placement).

    python bench/distributed_scaling.py            # runs mpiexec -n 1 and -n 2 of itself, writes
                                                   # bench/results/distributed_scaling.{json,md}

Every rank pins BLAS/OpenMP to one thread (threadpoolctl), so 2 ranks use the
machine's 2 cores.  Models: curves-ae's 12 dense layers (784-200-100-50-25-12-6
mirrored, kronlin.train.data) and a 6 × 1024 MLP.  Factors are Wishart
matrices of the right sizes (the same seed on every rank, as the all-reduced
statistics would be); the global batch of N = 256 examples is split over the
ranks.  Timings are the maximum over ranks of each repetition (the
collective's wall time), reported as the median of the repetitions.

The machine's cores are shared with other users, so 1 and 2 ranks are run
alternately, ``ROUNDS`` times (default 3), and each figure is the median over
the rounds; the load average is recorded before every run.  The refresh is
split into its compute (the busiest rank's own inversions, ``refresh_times``)
and the rest (waiting for the slower rank, the exchange, unpacking).  The
whole training step is measured on curves-ae with ``python -m kronlin.train
--distributed`` (kfac, batch 256, per-iteration seconds of the record).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import scipy.linalg  # noqa: F401  (SciPy's OpenBLAS loaded before threadpool_limits, so the limit covers it)

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
CURVES = [784, 200, 100, 50, 25, 12, 6, 12, 25, 50, 100, 200, 784]
MODELS = {"curves-ae": CURVES, "mlp-6x1024": [1024] * 7}
N_GLOBAL, T3 = 256, 20


def _wishart(rng, n, m):
    X = rng.standard_normal((m, n))
    return X.T @ X / m


def worker():
    from mpi4py import MPI
    from threadpoolctl import threadpool_limits

    import kronlin
    import kronlin.distributed as kd

    comm = MPI.COMM_WORLD
    rank, world = comm.Get_rank(), comm.Get_size()
    reps = int(os.environ.get("REPS", "7"))
    out = {"world": world, "models": {}}

    cpu = []

    def timed(fn):
        comm.Barrier()
        t0, c0 = time.perf_counter(), time.process_time()
        fn()
        t = np.array([time.perf_counter() - t0, time.process_time() - c0])
        comm.Allreduce(MPI.IN_PLACE, t, op=MPI.MAX)
        cpu.append(float(t[1]))  # the busiest rank's CPU seconds: the work split, free of other users' load
        return float(t[0])

    with threadpool_limits(1):
        for name, widths in MODELS.items():
            rng = np.random.default_rng(0)
            L = len(widths) - 1
            shapes = [(widths[k + 1], widths[k] + 1) for k in range(L)]
            A = [_wishart(rng, p, 2 * p) for q, p in shapes]
            G = [_wishart(rng, q, 2 * q) for q, p in shapes]
            V = [rng.standard_normal(s) for s in shapes]
            n_local = N_GLOBAL // world
            acts = [rng.standard_normal((n_local, widths[k])) for k in range(L)]
            grads = [rng.standard_normal((n_local, widths[k + 1])) for k in range(L)]
            res = {"shapes": shapes}
            # single-process reference refresh (what kfac.py does today), on every rank at once
            if world == 1:
                res["blockdiag_refresh_s"] = float(np.median([timed(lambda: kronlin.BlockDiagInverse(A, G, gamma=1e-2))
                                                              for _ in range(reps)]))  # fmt: skip
            for frac in sorted({1.0, 1.0 / world}, reverse=True):
                tag = "comm-opt" if frac == 1.0 else "mem-opt"
                if world == 1:
                    tag = "single"
                log = kd.CommLog()
                kf = kd.DistributedKFAC(comm, shapes, grad_worker_fraction=frac, log=log)
                est = kd.DistributedFactorEstimator(comm, tridiagonal=False, log=log)
                est.update(acts, grads)  # the first update agrees on the layout
                log.clear()
                cpu.clear()
                t_ref, t_compute = [], []
                for _ in range(reps):
                    t_ref.append(timed(lambda: kf.refresh(A, G, gamma=1e-2)))
                    t_compute.append(max(comm.allgather(sum(kf.refresh_times.values()))))
                cpu_ref = list(cpu)
                per_layer = comm.allgather(kf.refresh_times)
                refresh_bytes = {k: v / reps for k, v in log.per_kind().items()}
                log.clear()
                step = kf.precondition(V)
                ref = kronlin.BlockDiagInverse(A, G, gamma=1e-2).apply(V)
                err = max(float(np.linalg.norm(s - r) / np.linalg.norm(r)) for s, r in zip(step, ref))
                log.clear()

                def one_step():  # the K-FAC work of one iteration beyond forward/backward
                    est.update(acts, grads)
                    g = kd.allreduce_mean(comm, V, n_local, log=log)
                    kf.precondition(g)

                t_step = [timed(one_step) for _ in range(reps)]
                step_bytes = {k: v / reps for k, v in log.per_kind().items()}
                res[tag] = {
                    "refresh_s": float(np.median(t_ref)), "refresh_min_s": float(min(t_ref)), "refresh_all_s": t_ref,
                    "refresh_cpu_s": float(np.median(cpu_ref)),
                    "refresh_compute_s": float(np.median(t_compute)),
                    "step_s": float(np.median(t_step)),
                    "step_with_refresh_s": float(np.median(t_step)) + float(np.median(t_ref)) / T3,
                    "owners": list(kf.assignment.owners), "modelled_loads_s": list(kf.assignment.loads),
                    "per_layer_s": {int(k): v for d in per_layer for k, v in d.items()},
                    "refresh_bytes": refresh_bytes, "step_bytes": step_bytes, "step_rel_err": err,
                }
                kf.free()
            out["models"][name] = res
        if world == 1 and os.environ.get("FIT", "1") == "1":  # per-factor times for the cost model
            fit = {"factored": {}, "exact": {}}
            for n in (16, 64, 128, 256, 512, 785, 1025):
                M = _wishart(np.random.default_rng(n), n, 2 * n)
                one = np.eye(1)
                fit["factored"][n] = float(np.median([timed(lambda: kronlin.BlockDiagInverse([M], [one], gamma=1e-2))
                                                      for _ in range(5)]))  # fmt: skip
                fit["exact"][n] = float(np.median([timed(lambda: kronlin.Kron(M, one).eigh()) for _ in range(3)]))
            out["factor_times_s"] = fit
    if rank == 0:
        print("RESULT " + json.dumps(out), flush=True)


def _fit(times):
    """Least-squares ``t = c0 + c3·n³`` with relative weights, from ``{n: seconds}``."""
    n = np.array([float(k) for k in times]), np.array(list(times.values()))
    X = np.stack([np.ones_like(n[0]), n[0] ** 3], axis=1) / n[1][:, None]
    c, *_ = np.linalg.lstsq(X, np.ones_like(n[1]), rcond=None)
    return float(c[0]), float(c[1])


def kaisa_bytes(shapes, world, frac, dtype_bytes=8):
    """Payload bytes per step implied by KAISA's placements, with and without triangle packing.

    Factor all-reduce every step; gradient all-reduce every step; inverse
    broadcast to the ``g`` gradient workers every T₃ steps (none when g = 1);
    preconditioned-gradient broadcast from the workers to their rows (none when
    g = world).  Counted per rank taking part, as :class:`CommLog` does.
    """
    g = max(1, round(frac * world))
    sym = sum(p * (p + 1) // 2 + q * (q + 1) // 2 for q, p in shapes)
    full = sum(p * p + q * q for q, p in shapes)
    grad = sum(p * q for q, p in shapes)
    out = {
        "factor_allreduce": (2 + sym) * dtype_bytes, "factor_allreduce_full_blocks": full * dtype_bytes,
        "grad_allreduce": (2 + grad) * dtype_bytes,
        "inverse_bcast_per_refresh": (sym * dtype_bytes if g > 1 else 0),
        "step_bcast": (grad * dtype_bytes if g < world else 0),
    }
    return out


def driver():
    if "--report-only" in sys.argv:  # re-project from the committed measurements
        summary = json.loads((RESULTS / "distributed_scaling.json").read_text())
        runs = {int(k): v for k, v in summary["runs"].items()}
        return _report(summary, runs)
    rounds = {1: [], 2: []}
    loads = []
    train = {}
    env = dict(os.environ, OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1")
    for r in range(int(os.environ.get("ROUNDS", "3"))):
        for n in (1, 2):  # alternated, so that a change of the machine's load hits both
            loads.append((r, n, os.getloadavg()[0]))
            cmd = [str(Path(sys.executable).parent / "mpiexec"), "-n", str(n), sys.executable, __file__, "--worker"]
            p = subprocess.run(cmd, capture_output=True, text=True, timeout=1200, env=dict(env, FIT="1" if r == 0 else "0"))
            if p.returncode:
                raise SystemExit(p.stdout[-3000:] + p.stderr[-3000:])
            line = [ln for ln in p.stdout.splitlines() if ln.startswith("RESULT ")][0]
            rounds[n].append(json.loads(line[len("RESULT "):]))
        for n, placement in ((0, None), (1, "comm-opt"), (2, "comm-opt"), (2, "mem-opt")):
            loads.append((r, f"train {n} {placement}", os.getloadavg()[0]))
            train.setdefault(f"{n} {placement}", []).append(train_step(n, placement, env))
    runs = {n: _median_rounds(rs) for n, rs in rounds.items()}
    fit = {mode: _fit({int(k): v for k, v in t.items()}) for mode, t in runs[1]["factor_times_s"].items()}
    fit["per_layer"] = _fit_layers(runs[1])
    import platform

    import numpy

    summary = {"loadavg_after": os.getloadavg(), "loadavg_before_each_run": loads,
               "machine": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
               "numpy": numpy.__version__, "N_global": N_GLOBAL, "T3": T3, "fit_c0_c3": fit, "runs": runs,
               "rounds": rounds, "train_step": {k: _median_train(v) for k, v in train.items()}}  # fmt: skip
    return _report(summary, runs)


TRAIN_STEPS = 60


def train_step(n, placement, env):
    """Per-iteration seconds of ``kronlin.train`` on curves-ae (kfac, batch 256): n = 0 one plain process."""
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "rec.json")
        cmd = [sys.executable, "-m", "kronlin.train", "--task", "curves-ae", "--opt", "kfac", "--batch", "256",
               "--steps", str(TRAIN_STEPS), "--quiet", "--out", out]  # fmt: skip
        if n:
            cmd = [str(Path(sys.executable).parent / "mpiexec"), "-n", str(n)] + cmd
            cmd += ["--distributed", "--placement", placement]
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=1200, env=env)
        if p.returncode:
            raise SystemExit(p.stdout[-3000:] + p.stderr[-3000:])
        rec = json.loads(Path(out).read_text())
    dt = np.diff([0.0] + rec["seconds"])[3:]  # iterations 4.. (1-3 refresh every time, K-FAC §8)
    return {"median_s": float(np.median(dt)), "mean_s": float(np.mean(dt)), "final_loss": rec["loss"][-1]}


def _median_train(rs):
    return {"median_s": float(np.median([r["median_s"] for r in rs])), "mean_s": float(np.median([r["mean_s"] for r in rs])),
            "rounds": rs, "final_loss": rs[0]["final_loss"]}  # fmt: skip


def _median_rounds(rs):
    """One run's structure with every timing replaced by its median over the rounds (``*_s`` scalars)."""
    out = json.loads(json.dumps(rs[0]))
    for name, res in out["models"].items():
        for tag, d in res.items():
            if not isinstance(d, dict):
                if tag.endswith("_s"):
                    res[tag] = float(np.median([r["models"][name][tag] for r in rs]))
                continue
            for key, v in d.items():
                if key.endswith("_s") and isinstance(v, float):
                    d[key] = float(np.median([r["models"][name][tag][key] for r in rs]))
            d["per_layer_s"] = {k: float(np.median([r["models"][name][tag]["per_layer_s"][k] for r in rs]))
                                for k in d["per_layer_s"]}  # fmt: skip
    return out


def _fit_layers(run1):
    """``cost(layer) = 2·c0 + c3·(p³ + q³)`` fitted (relative least squares) to the 1-rank refresh's per-layer times."""
    X, y = [], []
    for name, res in run1["models"].items():
        for k, t in res["single"]["per_layer_s"].items():
            q, p = res["shapes"][int(k)]
            X.append([2.0, float(p) ** 3 + float(q) ** 3])
            y.append(t)
    X, y = np.array(X), np.array(y)
    c, *_ = np.linalg.lstsq(X / y[:, None], np.ones_like(y), rcond=None)
    return float(c[0]), float(c[1])


def _placements(runs, name):
    """The 1-rank run and the 2-rank comm-opt and mem-opt runs of one model."""
    return runs[1]["models"][name]["single"], runs[2]["models"][name]["comm-opt"], runs[2]["models"][name]["mem-opt"]


def _report(summary, runs):
    fit = summary["fit_c0_c3"]
    for name, widths in MODELS.items():
        shapes = [(widths[k + 1], widths[k] + 1) for k in range(len(widths) - 1)]
        summary.setdefault("kaisa_formula_bytes", {})[name] = {
            tag: kaisa_bytes(shapes, 2, frac) for tag, frac in (("comm-opt", 1.0), ("mem-opt", 0.5))
        }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "distributed_scaling.json").write_text(json.dumps(summary, indent=1))
    lines = ["# kronlin.distributed: 1 vs 2 ranks (one BLAS thread per rank)", "",
             f"N = {N_GLOBAL} global batch, T3 = {T3}; medians of repetitions, max over ranks.", "",
             f"Load average after the runs (other users of the 2 cores): {summary['loadavg_after']}", "",
             "| model | 1 rank refresh (min) | BlockDiagInverse | 2 ranks refresh comm-opt (min) | ratio (min) "
             "| busiest rank's CPU 1 → 2 ranks | mem-opt refresh (min) | step 1 rank | step 2 ranks comm-opt | mem-opt |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]  # fmt: skip
    for name in MODELS:
        r1, (s, c, m) = runs[1]["models"][name], _placements(runs, name)
        lines.append(f"| {name} | {s['refresh_s'] * 1e3:.1f} ({s['refresh_min_s'] * 1e3:.1f}) ms "
                     f"| {r1['blockdiag_refresh_s'] * 1e3:.1f} ms "
                     f"| {c['refresh_s'] * 1e3:.1f} ({c['refresh_min_s'] * 1e3:.1f}) ms "
                     f"| **{c['refresh_s'] / s['refresh_s']:.2f}×** ({c['refresh_min_s'] / s['refresh_min_s']:.2f}×) "
                     f"| {s['refresh_cpu_s'] * 1e3:.1f} → {c['refresh_cpu_s'] * 1e3:.1f} ms "
                     f"({c['refresh_cpu_s'] / s['refresh_cpu_s']:.2f}×) "
                     f"| {m['refresh_s'] * 1e3:.1f} ({m['refresh_min_s'] * 1e3:.1f}) ms | {s['step_s'] * 1e3:.2f} ms "
                     f"| {c['step_s'] * 1e3:.2f} ms | {m['step_s'] * 1e3:.2f} ms |")  # fmt: skip
    lines += ["", "Where the 2-rank refresh goes (medians): the busiest rank's own inversions, and the rest "
              "(waiting for the slower rank, the Allgatherv of the inverses, unpacking the other rank's triangles):", "",
              "| model | 1 rank: inversions / refresh | 2 ranks comm-opt: busiest rank's inversions / refresh "
              "(rest) | mem-opt: inversions / refresh (rest) |",
              "| --- | ---: | ---: | ---: |"]  # fmt: skip
    for name in MODELS:
        s, c, m = _placements(runs, name)
        if "refresh_compute_s" in s:
            lines.append(f"| {name} | {s['refresh_compute_s'] * 1e3:.1f} / {s['refresh_s'] * 1e3:.1f} ms "
                         f"| {c['refresh_compute_s'] * 1e3:.1f} / {c['refresh_s'] * 1e3:.1f} ms "
                         f"({(c['refresh_s'] - c['refresh_compute_s']) * 1e3:.1f} ms) "
                         f"| {m['refresh_compute_s'] * 1e3:.1f} / {m['refresh_s'] * 1e3:.1f} ms "
                         f"({(m['refresh_s'] - m['refresh_compute_s']) * 1e3:.1f} ms) |")  # fmt: skip
    rounds, loads = summary.get("rounds"), summary.get("loadavg_before_each_run")
    if rounds and loads:  # paired: each round ran 1 rank, then 2 ranks, back to back
        lines += ["", "Per round (1 rank, then 2 ranks, back to back; the load average before each):", "",
                  "| round | load before 1 / 2 ranks | model | 1 rank refresh | comm-opt | mem-opt "
                  "| 1 rank step | comm-opt | mem-opt |",
                  "| ---: | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |"]  # fmt: skip
        for i, (r1, r2) in enumerate(zip(rounds.get("1", rounds.get(1)), rounds.get("2", rounds.get(2)))):  # JSON: str keys
            la = [x[2] for x in loads if x[0] == i and x[1] in (1, 2)]
            for name in MODELS:
                s, c, m = (r1["models"][name]["single"], r2["models"][name]["comm-opt"], r2["models"][name]["mem-opt"])
                lines.append(f"| {i} | {la[0]:.1f} / {la[1]:.1f} | {name} | {s['refresh_s'] * 1e3:.1f} ms "
                             f"| {c['refresh_s'] / s['refresh_s']:.2f}× | {m['refresh_s'] / s['refresh_s']:.2f}× "
                             f"| {s['step_s'] * 1e3:.1f} ms | {c['step_s'] / s['step_s']:.2f}× "
                             f"| {m['step_s'] / s['step_s']:.2f}× |")  # fmt: skip
    tr = summary.get("train_step")
    if tr:
        base = tr["0 None"]
        lines += ["", f"Whole training step, curves-ae, kfac, batch 256, {TRAIN_STEPS} iterations "
                  "(`python -m kronlin.train`; seconds per iteration 4.., median over rounds):", "",
                  "| run | median | ratio | mean (refreshes amortised) | ratio |", "| --- | ---: | ---: | ---: | ---: |"]
        for key, label in (("0 None", "1 process"), ("1 comm-opt", "1 rank --distributed"),
                           ("2 comm-opt", "2 ranks comm-opt"), ("2 mem-opt", "2 ranks mem-opt")):  # fmt: skip
            t = tr[key]
            lines.append(f"| {label} | {t['median_s'] * 1e3:.1f} ms | {t['median_s'] / base['median_s']:.2f}× "
                         f"| {t['mean_s'] * 1e3:.1f} ms | {t['mean_s'] / base['mean_s']:.2f}× |")  # fmt: skip
    loads = summary.get("loadavg_before_each_run")
    if loads:
        vals = [x[2] for x in loads]
        lines += ["", f"1-minute load average before each run: {min(vals):.2f}–{max(vals):.2f} "
                  f"(median {float(np.median(vals)):.2f}) on {summary.get('cpus')} CPUs."]
    lines += ["", "Bytes per step (payload per rank, 2 ranks), measured by CommLog vs KAISA's placement formulas:", "",
              "| model | placement | factor all-reduce | (full blocks) | gradient all-reduce | step broadcast "
              "| inverse broadcast per refresh | measured = formula |",
              "| --- | --- | ---: | ---: | ---: | ---: | ---: | --- |"]  # fmt: skip
    for name in MODELS:
        for tag in ("comm-opt", "mem-opt"):
            meas = runs[2]["models"][name][tag]
            f = summary["kaisa_formula_bytes"][name][tag]
            sb, rb = meas["step_bytes"], meas["refresh_bytes"]
            ok = (sb.get("factor_allreduce", 0) == f["factor_allreduce"] and sb.get("grad_allreduce", 0) == f["grad_allreduce"]
                  and sb.get("step_bcast", 0) == f["step_bcast"]
                  and rb.get("inverse_bcast", 0) == f["inverse_bcast_per_refresh"])  # fmt: skip
            lines.append(f"| {name} | {tag} | {f['factor_allreduce'] / 1e6:.2f} MB | {f['factor_allreduce_full_blocks'] / 1e6:.2f} MB "
                         f"| {f['grad_allreduce'] / 1e6:.2f} MB | {f['step_bcast'] / 1e6:.2f} MB "
                         f"| {f['inverse_bcast_per_refresh'] / 1e6:.2f} MB | {ok} |")  # fmt: skip
    lines += ["", f"Cost model fit t = c0 + c3·n³ per factor: factored {fit['factored']}, exact {fit['exact']}; "
              f"per layer (2·c0 + c3·(p³ + q³), the 1-rank refresh's measured layer times): {fit.get('per_layer')}", ""]
    proj = project(json.loads(json.dumps(summary)))
    summary["projection"] = proj
    (RESULTS / "distributed_scaling.json").write_text(json.dumps(summary, indent=1))
    lines += ["## Projected K-FAC time per step, weak scaling (128 examples per rank, T3 = 20)", "",
              "| model | network | ranks | comm-opt | mem-opt | refresh makespan | factor all-reduce |",
              "| --- | --- | ---: | ---: | ---: | ---: | ---: |"]
    for name, pr in proj.items():
        for key, row in pr["rows"].items():
            net, W = key.split(" | ")
            lines.append(f"| {name} | {net} | {W} | {row['comm-opt'] * 1e3:.1f} ms | {row['mem-opt'] * 1e3:.1f} ms "
                         f"| {row['refresh'] * 1e3:.1f} ms | {row['factor_allreduce'] * 1e3:.2f} ms |")  # fmt: skip
    (RESULTS / "distributed_scaling.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))



# ------------------------------------------------------------------ projection (docs/scaling.md)
NETWORKS = {"100 Gb/s, 5 µs": (12.5e9, 5e-6), "10 Gb/s, 20 µs": (1.25e9, 20e-6)}
PROJECT_RANKS = (1, 2, 8, 32, 128, 512)


def _allreduce(m, W, B, a):
    """Ring/Rabenseifner all-reduce of m bytes: 2·log2(W)·α latency, 2(W−1)/W·m/B bandwidth."""
    return 0.0 if W == 1 else 2 * np.log2(W) * a + 2 * (W - 1) / W * m / B


def _bcast(m, W, B, a):
    """Pipelined (scatter + allgather) broadcast of m bytes: log2(W)·α + 2·m/B (≈ m/B for long messages)."""
    return 0.0 if W == 1 else np.log2(W) * a + 2 * (W - 1) / W * m / B


def project(summary, n_local=128):
    """Weak-scaling projection of the K-FAC work per step (n_local examples per rank, T3 = 20).

    t(W) = stats GEMMs (constant per rank) + factor all-reduce + gradient all-reduce
         + preconditioning (all layers for comm-opt; the owned layers + step broadcasts for mem-opt)
         + [LPT makespan of the fitted refresh costs + inverse broadcasts (comm-opt)] / T3.
    The GEMM rate is fitted to the 1-rank step; the refresh costs to the per-factor times.
    """
    import kronlin.distributed as kd

    fit = summary["fit_c0_c3"]
    c0, c3 = fit.get("per_layer", fit["factored"])  # fitted to the refresh's measured per-layer times
    out = {}
    for name, widths in MODELS.items():
        shapes = [(widths[k + 1], widths[k] + 1) for k in range(len(widths) - 1)]
        # multiply-adds: the factors' syrk over the batch, the two GEMMs G⁻¹ V Ā⁻¹ per layer
        pre_fl = sum(q * q * p + q * p * p for q, p in shapes)
        s1 = summary["runs"]["1"]["models"][name]["single"]["step_s"]
        rate = (sum(N_GLOBAL * (p * p + q * q) for q, p in shapes) + pre_fl) / s1  # of the 1-rank step, N = 256
        stats_t = sum(n_local * (p * p + q * q) for q, p in shapes) / rate
        MF = 8 * (2 + sum(p * (p + 1) // 2 + q * (q + 1) // 2 for q, p in shapes))
        Mg = 8 * (2 + sum(p * q for q, p in shapes))
        costs = [2 * c0 + c3 * (p**3 + q**3) for q, p in shapes]
        res = {}
        for net, (B, a) in NETWORKS.items():
            for W in PROJECT_RANKS:
                asg = kd.assign(costs, W)
                makespan = max(asg.loads)
                roots = min(W, len(shapes))
                comm = _allreduce(MF, W, B, a) + _allreduce(Mg, W, B, a)
                t_comm_opt = stats_t + comm + pre_fl / rate + (makespan + roots * _bcast(MF / roots, W, B, a)) / T3
                own = max(sum((q * q * p + q * p * p) for k, (q, p) in enumerate(shapes) if asg.owners[k] == r)
                          for r in range(min(W, len(shapes))))  # fmt: skip
                t_mem_opt = stats_t + comm + own / rate + roots * _bcast(Mg / roots, W, B, a) + makespan / T3
                res[f"{net} | {W}"] = {"comm-opt": t_comm_opt, "mem-opt": t_mem_opt, "refresh": makespan,
                                       "factor_allreduce": _allreduce(MF, W, B, a)}  # fmt: skip
        out[name] = {"rate_flops": rate, "stats_s": stats_t, "precond_all_s": pre_fl / rate, "rows": res}
    return out


if __name__ == "__main__":
    if {"-h", "--help"} & set(sys.argv[1:]):
        print(__doc__.strip() + "\n\n    --report-only   re-project from the committed measurements (no MPI runs)")
    elif set(sys.argv[1:]) - {"--worker", "--report-only"}:
        sys.exit(f"{sys.argv[0]}: unknown arguments {sys.argv[1:]}; see --help")
    else:
        worker() if "--worker" in sys.argv else driver()
