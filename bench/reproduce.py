"""Reproduce (at small scale) five claims from the papers behind ``kronlin.train`` (issue 7).

One command runs a fixed grid, keeps every run's JSON record under
``bench/results/repro/`` and regenerates ``docs/reproduction.md`` from the kept
records only::

    python bench/reproduce.py                 # run the grid (about 5 min on 2 cores), then write the report
    python bench/reproduce.py --report-only   # rewrite the report and plots from the existing records

The grid (:data:`GRID`) is deliberately small so that it fits in well under
15 minutes of wall time on a 2-core machine: task ``digits-ae`` (sklearn 8x8
digits, autoencoder 64-128-64-32-8-32-64-128-64), batch 256, :data:`STEPS`
iterations, seeds :data:`SEEDS`, one BLAS thread per process, two worker
processes.  Records are ``{"task", "opt", "seed", "config", "loss", "seconds"}``
as written by ``python -m kronlin.train`` plus a ``"label"`` (the grid entry).

The alignment experiment (claim 3) writes ``align__<opt>__s<seed>.json``: at a
few checkpoints of a K-FAC and a KFRA run it builds, for the small layers only,
the dense per-layer Gauss-Newton block ``(1/N) Σ J_lᵀ H J_l`` of the current
mini-batch from ``gn_vp`` on unit vectors, solves ``(G_ll + d I) Δ_l = −∇_l h``
with the optimizer's own Tikhonov-equivalent damping ``d`` and records the
cosine similarity of the optimizer's proposal ``precondition(grads)`` with it.
"""

from __future__ import annotations

import argparse
import glob
import json
import math
import os
import platform
import sys
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

OUT_DIR = os.path.join(HERE, "results", "repro")
DOC = os.path.join(ROOT, "docs", "reproduction.md")
COMMAND = "python bench/reproduce.py"

TASK = "digits-ae"
STEPS = 800
BATCH = 256
SEEDS = (0, 1, 2)
SGD_LRS = (0.005, 0.01, 0.02, 0.05)
SMOOTH = 25  # window (iterations) of the moving average used for "reached" / "final" losses

#: label -> (optimizer, hyper-parameter overrides).  Everything else is the registry default.
GRID = {
    **{f"sgd-lr{lr:g}": ("sgd", {"lr": lr}) for lr in SGD_LRS},
    "kfac": ("kfac", {}),
    "kfac-tridiag": ("kfac-tridiag", {}),
    "kfac-exactdamp": ("kfac", {"damping": "exact"}),
    "kfra": ("kfra", {}),
    "ngd": ("ngd", {}),
    "foof": ("foof", {}),
    "kbfgs": ("kbfgs", {}),
    "kbfgs-l": ("kbfgs-l", {}),
}
ALIGN_OPTS = ("kfac", "kfra")
ALIGN_SEEDS = (0, 1, 2)
ALIGN_AT = (10, 100, 400, 800)  # checkpoints (iterations done before the measurement)
ALIGN_MAX_PARAMS = 2200  # layers with more weights (incl. bias) are skipped: the dense block is built column by column


# ----------------------------------------------------------------------- runs
def _one_run(job):
    label, opt, hp, seed, steps, task, batch, out_dir = job
    from threadpoolctl import threadpool_limits

    from kronlin.train.cli import make_config, run_training, write_json

    with threadpool_limits(1):
        cfg = make_config(task, opt, seed=seed, batch=batch, steps=steps, hp=hp)
        rec = run_training(cfg)
    rec["label"] = label
    path = os.path.join(out_dir, f"run__{label}__s{seed}.json")
    write_json(path, rec)
    return path, rec["seconds"][-1] if rec["seconds"] else 0.0


def _gn_block(net, trace, loss, layer):
    """Dense ``(1/N) Σ J_lᵀ H J_l`` for one layer (row-major flattening of its weight array)."""
    shape = net.params[layer].shape
    d = int(np.prod(shape))
    G = np.empty((d, d))
    V = [np.zeros_like(W) for W in net.params]
    for j in range(d):
        V[layer].flat[j] = 1.0
        G[:, j] = net.gn_vp(trace, loss, V)[layer].ravel()
        V[layer].flat[j] = 0.0
    return 0.5 * (G + G.T)


def _one_align(job):
    opt_name, seed, steps, task_name, batch, at, max_params, out_dir = job
    from threadpoolctl import threadpool_limits

    from kronlin.train.cli import _setup, make_config, write_json

    with threadpool_limits(1):
        cfg = make_config(task_name, opt_name, seed=seed, batch=batch, steps=steps)
        task, net, data_rng, opt = _setup(cfg)
        layers = [i for i, W in enumerate(net.params) if W.size <= max_params]
        out = {"task": task_name, "opt": opt_name, "seed": seed, "batch": batch, "layers": layers,
               "layer_shapes": [list(net.params[i].shape) for i in layers], "checkpoints": []}
        todo = sorted(a for a in at if a <= steps)
        for it in range(steps + 1):
            if todo and it == todo[0]:
                todo.pop(0)
                X, Y = task.sample_batch(batch, np.random.default_rng(10_000 + it))  # a fixed probe batch
                _, grads, trace = net.loss_and_grads(X, Y, task.loss)
                eta = opt.hparams["eta"]
                grads = [G + eta * W for G, W in zip(grads, net.params)]
                prop = opt.precondition(grads)
                damp = float(opt._tikhonov(opt.gamma))
                cos = []
                for li in layers:
                    G = _gn_block(net, trace, task.loss, li)
                    ex = -np.linalg.solve(G + damp * np.eye(len(G)), grads[li].ravel())
                    p = prop[li].ravel()
                    cos.append(float(p @ ex / (np.linalg.norm(p) * np.linalg.norm(ex))))
                out["checkpoints"].append({"iteration": it, "damping": damp, "gamma": float(opt.gamma),
                                           "cosine": cos})  # fmt: skip
            if it < steps:
                X, Y = task.sample_batch(batch, data_rng)
                opt.step(X, Y)
    path = os.path.join(out_dir, f"align__{opt_name}__s{seed}.json")
    write_json(path, out)
    return path, 0.0


def run_grid(*, out_dir=OUT_DIR, grid=GRID, seeds=SEEDS, steps=STEPS, task=TASK, batch=BATCH,
             align_opts=ALIGN_OPTS, align_seeds=ALIGN_SEEDS, align_at=ALIGN_AT, align_max_params=ALIGN_MAX_PARAMS,
             workers=2, verbose=True) -> float:  # fmt: skip
    """Run every grid entry for every seed (and the alignment probes); return the wall time in seconds."""
    os.makedirs(out_dir, exist_ok=True)
    for old in glob.glob(os.path.join(out_dir, "*.json")):
        os.remove(old)
    align_jobs = [(o, s, steps, task, batch, tuple(align_at), align_max_params, out_dir)
                  for o in align_opts for s in align_seeds]  # fmt: skip
    run_jobs = [(label, opt, hp, seed, steps, task, batch, out_dir)
                for seed in seeds for label, (opt, hp) in grid.items()]  # fmt: skip
    jobs = [(_one_align, j) for j in align_jobs] + [(_one_run, j) for j in run_jobs]  # slow ones first
    t0 = time.perf_counter()
    if workers > 1:
        import multiprocessing as mp

        with mp.get_context("spawn").Pool(workers) as pool:
            res = [pool.apply_async(f, (j,)) for f, j in jobs]
            for r in res:
                path, _ = r.get()
                if verbose:
                    print(f"[{time.perf_counter() - t0:6.1f}s] {os.path.basename(path)}", flush=True)
    else:
        for f, j in jobs:
            path, _ = f(j)
            if verbose:
                print(f"[{time.perf_counter() - t0:6.1f}s] {os.path.basename(path)}", flush=True)
    wall = time.perf_counter() - t0
    meta = {"wall_seconds": wall, "workers": workers, "threads_per_worker": 1, "command": COMMAND,
            "machine": platform.platform(), "processor": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(), "python": platform.python_version(), "numpy": np.__version__,
            "task": task, "steps": steps, "batch": batch, "seeds": list(seeds),
            "grid": {k: [v[0], v[1]] for k, v in grid.items()},
            "align": {"opts": list(align_opts), "seeds": list(align_seeds), "at": list(align_at),
                      "max_params": align_max_params},
            "finished": time.strftime("%Y-%m-%d %H:%M:%S %Z")}  # fmt: skip
    from kronlin.train.cli import write_json

    write_json(os.path.join(out_dir, "meta.json"), meta)
    return wall


# --------------------------------------------------------------------- report
def load_records(out_dir=OUT_DIR):
    runs, aligns = {}, []
    for p in sorted(glob.glob(os.path.join(out_dir, "run__*.json"))):
        with open(p) as f:
            r = json.load(f)
        runs.setdefault(r["label"], {})[r["seed"]] = r
    for p in sorted(glob.glob(os.path.join(out_dir, "align__*.json"))):
        with open(p) as f:
            aligns.append(json.load(f))
    meta = {}
    if os.path.exists(os.path.join(out_dir, "meta.json")):
        with open(os.path.join(out_dir, "meta.json")) as f:
            meta = json.load(f)
    return runs, aligns, meta


def smooth(loss, w=SMOOTH):
    """Trailing moving average (the first ``w-1`` entries average what exists so far)."""
    y = np.asarray(loss, dtype=float)
    c = np.cumsum(np.insert(y, 0, 0.0))
    n = np.arange(1, len(y) + 1)
    lo = np.maximum(n - w, 0)
    return (c[n] - c[lo]) / (n - lo)


def final(rec):
    return float(smooth(rec["loss"])[-1]) if rec["loss"] else math.nan


def ms_per_it(rec):
    return 1000.0 * rec["seconds"][-1] / len(rec["seconds"]) if rec["seconds"] else math.nan


def first_reach(rec, target):
    s = smooth(rec["loss"])
    idx = np.nonzero(s <= target)[0]
    return int(idx[0]) + 1 if len(idx) else None


def ms(xs, fmt="{:.4g}"):
    xs = [x for x in xs if x is not None and np.isfinite(x)]
    if not xs:
        return "–"
    if len(xs) == 1:
        return fmt.format(xs[0])
    return f"{fmt.format(np.mean(xs))} ± {fmt.format(np.std(xs, ddof=1))}"


def _mean(xs):
    xs = [x for x in xs if x is not None and np.isfinite(x)]
    return float(np.mean(xs)) if xs else math.nan


def compare_means(a, b):
    """``(mean(a) - mean(b), significant)``; significant: |difference| > 2 standard errors (Welch)."""
    a = np.asarray([x for x in a if np.isfinite(x)], dtype=float)
    b = np.asarray([x for x in b if np.isfinite(x)], dtype=float)
    d = float(a.mean() - b.mean())
    va = a.var(ddof=1) / len(a) if len(a) > 1 else 0.0
    vb = b.var(ddof=1) / len(b) if len(b) > 1 else 0.0
    return d, abs(d) > 2.0 * math.sqrt(va + vb)


def loss_at_seconds(rec, t):
    """Smoothed loss at the last iteration finished by wall time ``t``."""
    sec = np.asarray(rec["seconds"])
    i = int(np.searchsorted(sec, t, side="right")) - 1
    return float(smooth(rec["loss"])[max(i, 0)])


def tuned_sgd(runs):
    labels = [k for k in runs if k.startswith("sgd-lr")]
    if not labels:
        return None
    return min(labels, key=lambda k: _mean([final(r) for r in runs[k].values()]))


def plot(runs, labels, path, title):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import LogFormatter

    fig = Figure(figsize=(11, 4.2), layout="constrained")
    FigureCanvasAgg(fig)
    ax_it, ax_s = fig.subplots(1, 2, sharey=True)
    for i, lab in enumerate(labels):
        if lab not in runs:
            continue
        recs = [runs[lab][s] for s in sorted(runs[lab])]
        n = min(len(r["loss"]) for r in recs)
        L = np.array([smooth(r["loss"])[:n] for r in recs])
        S = np.array([r["seconds"][:n] for r in recs]).mean(axis=0)
        it = np.arange(1, n + 1)
        m = L.mean(axis=0)
        for ax, x in ((ax_it, it), (ax_s, S)):
            ax.plot(x, m, color=f"C{i}", lw=1.8, label=lab)
            if len(recs) > 1:
                ax.fill_between(x, L.min(axis=0), L.max(axis=0), color=f"C{i}", alpha=0.15)
    for ax, xl in ((ax_it, "iteration"), (ax_s, "seconds (mean over seeds)")):
        ax.set_xlabel(xl)
        ax.set_yscale("log")
        ax.yaxis.set_major_formatter(LogFormatter())
        ax.yaxis.set_minor_formatter(LogFormatter(minor_thresholds=(2, 0.5)))
        ax.grid(True, which="both", alpha=0.3)
    ax_it.set_ylabel(f"training loss ({SMOOTH}-it. mean; band: seed range)")
    ax_it.legend(fontsize=8)
    fig.suptitle(title)
    fig.savefig(path, format="png", dpi=110)


def _table(runs, labels, extra=None):
    head = "| run | seeds | final loss (smoothed) | best loss | ms / iteration |" + (" " + extra[0] + " |" if extra else "")
    lines = [head, "|" + " --- |" * (head.count("|") - 1)]
    for lab in labels:
        if lab not in runs:
            lines.append(f"| {lab} | 0 | not run | | |" + (" |" if extra else ""))
            continue
        recs = list(runs[lab].values())
        row = (f"| {lab} | {len(recs)} | {ms([final(r) for r in recs])} | "
               f"{ms([float(np.nanmin(r['loss'])) for r in recs])} | {ms([ms_per_it(r) for r in recs], '{:.1f}')} |")  # fmt: skip
        if extra:
            row += " " + extra[1](lab) + " |"
        lines.append(row)
    return "\n".join(lines)


def _hp(runs, lab):
    r = next(iter(runs[lab].values()))
    return r["config"]["hparams"]


def write_report(out_dir=OUT_DIR, doc=DOC, make_plots=True) -> str:
    runs, aligns, meta = load_records(out_dir)
    rel = os.path.relpath(out_dir, os.path.dirname(os.path.abspath(doc)))
    steps = meta.get("steps", "?")
    seeds = meta.get("seeds", sorted({s for r in runs.values() for s in r}))
    P = []
    P.append("# Reproduction of five claims (issue 7)\n")
    P.append("Generated by `bench/reproduce.py` from the JSON records in `bench/results/repro/` "
             "(do not edit by hand; `python bench/reproduce.py --report-only` regenerates it).\n")  # fmt: skip
    P.append("## What was run\n")
    wall = meta.get("wall_seconds")
    P.append(
        f"* Command: `{meta.get('command', COMMAND)}` — total wall time of the grid "
        f"**{wall / 60:.1f} min** ({wall:.0f} s)" if wall else f"* Command: `{COMMAND}`"
    )
    P.append(f"* Machine: {meta.get('machine', '?')}, {meta.get('cpu_count', '?')} cores, processor `{meta.get('processor', '?')}`; "
             f"Python {meta.get('python', '?')}, NumPy {meta.get('numpy', '?')}.")  # fmt: skip
    P.append(f"* {meta.get('workers', 2)} worker processes, each with **one BLAS thread** "
             "(`threadpoolctl.threadpool_limits(1)`). Two runs share the machine at any time, so "
             "ms/iteration are comparable with each other but not with an idle machine.")  # fmt: skip
    P.append(f"* Task **{meta.get('task', TASK)}** only (8×8 digits, autoencoder 64-128-64-32-8-32-64-128-64, "
             f"sigmoid BCE summed over pixels), batch {meta.get('batch', BATCH)}, **{steps} iterations**, seeds {seeds}. "
             "The budget was ≤ 15 min wall for the whole grid on this 2-core machine, which is why the grid is this small.")  # fmt: skip
    al = meta.get("align")
    if al:
        P.append(f"* Claim 3 alignment probes: {al['opts']} runs (registry defaults), seeds {al['seeds']}, measured before iterations {al['at']} "
                 f"(i.e. after that many steps), layers with ≤ {al['max_params']} weights.")  # fmt: skip
    P.append("* Grid (label: optimizer, overrides; all other hyper-parameters are the registry defaults):")
    for lab, (opt, hp) in meta.get("grid", {k: list(v) for k, v in GRID.items()}).items():
        P.append(f"  * `{lab}`: `{opt}` {json.dumps(hp) if hp else '(defaults)'}")
    P.append(f"* Losses are the mini-batch training loss after each step; \"final\" is the mean of the last "
             f"{SMOOTH} iterations, \"reaches\" means the {SMOOTH}-iteration trailing moving average first drops "
             "to the target. Tables give mean ± sample std over seeds.\n")  # fmt: skip

    verdicts = {}
    # ---------------- claim 1
    P.append("## Claim 1 — K-FAC (with momentum) needs far fewer iterations than tuned SGD with momentum\n")
    P.append("K-FAC §13: K-FAC reaches SGD's final loss in a fraction of SGD's iterations. SGD (Nesterov momentum 0.9) "
             f"lr tuned over {list(SGD_LRS)} by mean final loss.\n")  # fmt: skip
    best = tuned_sgd(runs)
    if best and "kfac" in runs:
        sgd_labels = [k for k in runs if k.startswith("sgd-lr")]
        P.append(_table(runs, sgd_labels + ["kfac"]) + "\n")
        rows, ratios = [], []
        for s in sorted(runs["kfac"]):
            if s not in runs[best]:
                continue
            target = final(runs[best][s])
            hit = first_reach(runs["kfac"][s], target)
            n = len(runs[best][s]["loss"])
            ratio = n / hit if hit else None
            ratios.append(ratio)
            t_k = runs["kfac"][s]["seconds"][hit - 1] if hit else None
            t_s = runs[best][s]["seconds"][-1]
            rows.append(f"| {s} | {target:.4g} | {hit if hit else 'never'} | {n} | "
                        f"{f'{ratio:.1f}×' if ratio else '–'} | {f'{t_k:.2f}' if t_k else '–'} | {t_s:.2f} |")  # fmt: skip
        P.append(f"Tuned SGD: **{best}**. Iteration at which K-FAC's smoothed loss first reaches tuned SGD's final loss (same seed):\n")
        P.append("| seed | SGD final loss | K-FAC reaches it at iteration | SGD iterations | ratio | K-FAC seconds to reach | SGD seconds |")
        P.append("| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
        P.extend(rows)
        good = [r for r in ratios if r]
        if len(good) == len(ratios) and good:
            mr = np.mean(good)
            v = "holds" if mr >= 3 else "partly"
            verdicts[1] = (v, (f"K-FAC reaches tuned SGD ({best})'s final loss after {steps / mr:.0f} iterations on average vs SGD's {steps} "
                              f"(ratio {ms(good, '{:.1f}')}; paper-style 'far fewer' taken as ratio ≥ 3)"))
        else:
            verdicts[1] = ("does not hold", "K-FAC did not reach tuned SGD's final loss on every seed")
        P.append(f"\n**Verdict: {verdicts[1][0]}** — {verdicts[1][1]}. "
                 "Caveat: 'far fewer' in the paper is on MNIST/CURVES/FACES autoencoders over 10⁴+ iterations; here "
                 f"{steps} iterations on a tiny autoencoder, and SGD is tuned only over 4 learning rates at fixed momentum.\n")  # fmt: skip
        if make_plots:
            plot(runs, [best, "kfac"], os.path.join(out_dir, "claim1_kfac_vs_sgd.png"), f"{TASK}: K-FAC vs tuned SGD")
        P.append(f"![claim 1]({rel}/claim1_kfac_vs_sgd.png)\n")
    else:
        verdicts[1] = ("not run", "records missing")

    # ---------------- claim 2
    P.append("## Claim 2 — block-tridiagonal K-FAC: more progress per iteration, more cost per iteration\n")
    if "kfac" in runs and "kfac-tridiag" in runs:
        cps = [c for c in (50, 100, 200, 400, 800) if c <= min(len(r["loss"]) for r in runs["kfac"].values())]
        P.append(_table(runs, ["kfac", "kfac-tridiag"]) + "\n")
        P.append("Smoothed loss at equal iterations:\n")
        P.append("| iteration | " + " | ".join(str(c) for c in cps) + " |")
        P.append("| --- |" + " ---: |" * len(cps))
        for lab in ("kfac", "kfac-tridiag"):
            P.append(f"| {lab} | " + " | ".join(ms([float(smooth(r['loss'])[c - 1]) for r in runs[lab].values()]) for c in cps) + " |")
        # iterations for tridiag to reach block-diagonal's final loss
        savings = []
        for s in runs["kfac"]:
            if s in runs["kfac-tridiag"]:
                hit = first_reach(runs["kfac-tridiag"][s], final(runs["kfac"][s]))
                n = len(runs["kfac"][s]["loss"])
                savings.append(1 - hit / n if hit else None)
        ok = [x for x in savings if x is not None]
        fd = _mean([final(r) for r in runs["kfac"].values()])
        ft = _mean([final(r) for r in runs["kfac-tridiag"].values()])
        cd = _mean([ms_per_it(r) for r in runs["kfac"].values()])
        ct = _mean([ms_per_it(r) for r in runs["kfac-tridiag"].values()])
        wins = sum(final(runs["kfac-tridiag"][s]) < final(runs["kfac"][s]) for s in runs["kfac"] if s in runs["kfac-tridiag"])
        P.append(f"\nTridiagonal reaches block-diagonal's final loss with "
                 f"{'saving ' + ms([100 * x for x in ok], '{:.0f}') + '% of the iterations' if len(ok) == len(savings) else 'not on every seed'} "
                 f"(per seed: {[None if x is None else round(100 * x) for x in savings]}%); final loss lower on {wins}/{len(savings)} seeds; "
                 f"cost {ct:.1f} vs {cd:.1f} ms/iteration (×{ct / cd:.2f}).\n")  # fmt: skip
        more_progress = ft < fd and len(ok) == len(savings) and wins == len(savings)
        costs_more = ct > cd
        if more_progress and costs_more:
            sav = np.mean(ok) * 100
            verdicts[2] = ("holds" if sav >= 25 else "partly",
                           f"tridiag final {ft:.4g} vs {fd:.4g}, {sav:.0f}% fewer iterations to block-diag's final loss (paper 25-40%), ×{ct / cd:.2f} ms/it")
        elif costs_more:
            verdicts[2] = ("partly" if ft < fd else "does not hold",
                           f"tridiag final {ft:.4g} vs block-diag {fd:.4g} (lower on {wins}/{len(savings)} seeds); it does cost ×{ct / cd:.2f} ms/it")
        else:
            verdicts[2] = ("does not hold", f"tridiag final {ft:.4g} vs {fd:.4g}, ×{ct / cd:.2f} ms/it")
        P.append(f"**Verdict: {verdicts[2][0]}** — {verdicts[2][1]}. Caveat: the paper's gain is measured on "
                 "large autoencoders (MNIST/CURVES/FACES) where the between-layer correlations the tridiagonal model captures "
                 f"are larger; here (8 small layers, an 8-unit bottleneck, {steps} iterations) the direction is what can be checked, "
                 "the size of the gain less so. 'Partly' means the direction holds but the saving is below the paper's 25%. "
                 "The cost ratio here is dominated by per-iteration Python overhead, not the O(d³) algebra.\n")  # fmt: skip
        if make_plots:
            plot(runs, ["kfac", "kfac-tridiag"], os.path.join(out_dir, "claim2_tridiag.png"), f"{TASK}: block-diagonal vs block-tridiagonal K-FAC")
        P.append(f"![claim 2]({rel}/claim2_tridiag.png)\n")
    else:
        verdicts[2] = ("not run", "records missing")

    # ---------------- claim 3
    P.append("## Claim 3 — KFRA's updates align better with the block-diagonal Gauss-Newton update than K-FAC's\n")
    if aligns:
        a0 = aligns[0]
        P.append(f"Exact block-diagonal GN update computed only for layers {a0['layers']} (weight shapes incl. bias column "
                 f"{a0['layer_shapes']}, ≤ {ALIGN_MAX_PARAMS} weights each: the dense block is built from one `gn_vp` per unit vector); "
                 "the first two and last two layers (≈ 8.3k weights each) are left out. At each checkpoint a fixed probe mini-batch "
                 f"of {a0['batch']} examples gives the gradient ∇h (with the η term) and the dense block G_ll; the exact update is "
                 "−(G_ll + d I)⁻¹∇_l h with d the optimizer's own Tikhonov-equivalent damping (`_tikhonov(γ)`: γ² for K-FAC, γ+η for KFRA), "
                 "compared by cosine with the optimizer's proposal `precondition(grads)` (its own factors, factored damping). "
                 "Each optimizer is measured along its own trajectory (seeds " + str(sorted({a['seed'] for a in aligns})) + ").\n")  # fmt: skip
        P.append("| optimizer | seed | iteration | damping d | " + " | ".join(f"cos layer {i}" for i in a0["layers"]) + " | mean |")
        P.append("| --- | ---: | ---: | ---: |" + " ---: |" * (len(a0["layers"]) + 1))
        means = {}
        for a in aligns:
            for c in a["checkpoints"]:
                m = float(np.mean(c["cosine"]))
                means.setdefault(a["opt"], []).append(m)
                P.append(f"| {a['opt']} | {a['seed']} | {c['iteration']} | {c['damping']:.3g} | "
                         + " | ".join(f"{x:.3f}" for x in c["cosine"]) + f" | {m:.3f} |")  # fmt: skip
        P.append("")
        by_it = {}
        for a in aligns:
            for c in a["checkpoints"]:
                by_it.setdefault(c["iteration"], {}).setdefault(a["opt"], []).append(float(np.mean(c["cosine"])))
        opts_a = sorted({a["opt"] for a in aligns})
        P.append("Mean cosine (over the measured layers) by checkpoint, mean ± std over seeds:\n")
        P.append("| iteration | " + " | ".join(opts_a) + " |")
        P.append("| ---: |" + " ---: |" * len(opts_a))
        for it_ in sorted(by_it):
            P.append(f"| {it_} | " + " | ".join(ms(by_it[it_].get(o, []), "{:.3f}") for o in opts_a) + " |")
        P.append("")
        if "kfra" in runs:
            P.append(_table(runs, ["kfac", "kfra"]) + "\n")
        mk, mr = _mean(means.get("kfac", [])), _mean(means.get("kfra", []))
        dcos, sig_cos = compare_means(means.get("kfra", []), means.get("kfac", []))
        fks = [final(r) for r in runs.get("kfac", {}).values()]
        frs = [final(r) for r in runs.get("kfra", {}).values()]
        fk, fr = _mean(fks), _mean(frs)
        dloss, sig_loss = compare_means(frs, fks)
        # equal wall time: K-FAC's loss when the (cheaper) KFRA run of the same seed ends
        eq = [(final(runs["kfra"][s]), loss_at_seconds(runs["kfac"][s], runs["kfra"][s]["seconds"][-1]))
              for s in runs.get("kfra", {}) if s in runs.get("kfac", {})]
        if eq:
            P.append(f"At equal wall time (when KFRA's run ends, {ms([runs['kfra'][s]['seconds'][-1] for s in runs['kfra']], '{:.1f}')} s): "
                     f"KFRA {ms([e[0] for e in eq])} vs K-FAC {ms([e[1] for e in eq])}.\n")  # fmt: skip
        align_better = dcos > 0 and sig_cos
        perf = dloss <= 0 or not sig_loss
        verdicts[3] = ("holds" if align_better and perf else "partly" if align_better or perf else "does not hold",
                       f"mean cosine with the exact block-GN update KFRA {mr:.3f} vs K-FAC {mk:.3f} "
                       f"({'significantly higher' if align_better else 'not significantly higher'} over checkpoints×seeds); "
                       f"final loss at equal iterations KFRA {fr:.4g} vs K-FAC {fk:.4g} ({'KFRA significantly worse' if not perf else 'KFRA not worse'})"
                       + (f"; at equal wall time KFRA {_mean([e[0] for e in eq]):.4g} vs K-FAC {_mean([e[1] for e in eq]):.4g}" if eq else ""))  # fmt: skip
        P.append(f"**Verdict: {verdicts[3][0]}** — {verdicts[3][1]}. Caveats: only the 4 small middle layers; "
                 "K-FAC's factors are sampled-Fisher running averages over past batches while KFRA's are computed from the current "
                 "batch at refresh time (every T3=20 iterations), so neither is evaluated on exactly the probe batch; "
                 "K-FAC runs with momentum (its default) and KFRA without (Botev's setting), so the loss comparison mixes the curvature "
                 "model with the step rule; the adapted damping becomes tiny (down to ~1e-6) late in the runs, so the exact damped "
                 "block-GN update is dominated by near-null directions of G_ll, which drives the cosine of both methods down "
                 "(layer 2 especially) — Botev et al. compare at fixed, larger damping on bigger networks. KFRA is cheaper per "
                 "iteration here (no sampled backward pass), which is why it does better per second than per iteration.\n")  # fmt: skip
        if make_plots and "kfra" in runs:
            plot(runs, ["kfac", "kfra"], os.path.join(out_dir, "claim3_kfra.png"), f"{TASK}: K-FAC vs KFRA")
            P.append(f"![claim 3]({rel}/claim3_kfra.png)\n")
    else:
        verdicts[3] = ("not run", "alignment records missing")

    # ---------------- claim 4
    P.append("## Claim 4 — K-FAC beats exact subsampled NGD; factored damping is what makes it work; FOOF matches K-FAC more cheaply\n")
    labs4 = ["kfac", "kfac-exactdamp", "ngd", "foof"]
    if all(l in runs for l in labs4):
        P.append(_table(runs, labs4) + "\n")
        f = {l: _mean([final(r) for r in runs[l].values()]) for l in labs4}
        c = {l: _mean([ms_per_it(r) for r in runs[l].values()]) for l in labs4}
        F = {l: [final(r) for r in runs[l].values()] for l in labs4}
        d_a, s_a = compare_means(F["kfac"], F["ngd"])
        d_b, s_b = compare_means(F["kfac"], F["kfac-exactdamp"])
        a = d_a < 0 and s_a
        b = d_b < 0 and s_b
        cc = f["foof"] <= f["kfac"] * 1.02 and c["foof"] < c["kfac"]
        parts = [f"K-FAC {f['kfac']:.4g} vs NGD {f['ngd']:.4g} ({'better' if a else 'not significantly better'})",
                 f"factored {f['kfac']:.4g} vs exact damping {f['kfac-exactdamp']:.4g} ({'factored significantly better' if b else 'no significant final difference: exact Tikhonov damping ends as well, factored is ahead early' if not s_b else 'exact damping better'})",
                 f"FOOF {f['foof']:.4g} at {c['foof']:.1f} ms/it vs K-FAC at {c['kfac']:.1f} ms/it ({'matches/beats and cheaper' if cc else 'does not both match and cost less'})"]  # fmt: skip
        at100 = {l: _mean([float(smooth(r["loss"])[min(99, len(r["loss"]) - 1)]) for r in runs[l].values()]) for l in labs4}
        parts.append(f"at iteration 100: factored {at100['kfac']:.4g} vs exact {at100['kfac-exactdamp']:.4g}, "
                     f"NGD {at100['ngd']:.4g}, FOOF {at100['foof']:.4g}")
        n_ok = sum([a, b, cc])
        verdicts[4] = ("holds" if n_ok == 3 else "does not hold" if n_ok == 0 else "partly", "; ".join(parts))
        P.append(f"**Verdict: {verdicts[4][0]}** — {verdicts[4][1]}. Caveats: Benzing et al. compare on MNIST/CIFAR-scale "
                 "autoencoders and classifiers with hyper-parameters tuned per method; here every optimizer runs its registry "
                 "defaults (NGD: lr 1, λ 3 adaptive, one MC sample; FOOF: lr 0.1, damping 1) on one small task, so the ranking "
                 "may reflect defaults more than the methods.\n")  # fmt: skip
        if make_plots:
            plot(runs, labs4, os.path.join(out_dir, "claim4_ngd_foof.png"), f"{TASK}: K-FAC, K-FAC exact damping, NGD, FOOF")
        P.append(f"![claim 4]({rel}/claim4_ngd_foof.png)\n")
    else:
        verdicts[4] = ("not run", "records missing")

    # ---------------- claim 5
    P.append("## Claim 5 — K-BFGS and K-BFGS(L) perform comparably to K-FAC\n")
    labs5 = ["kfac", "kbfgs", "kbfgs-l"]
    if all(l in runs for l in labs5):
        P.append(_table(runs, labs5) + "\n")
        f = {l: _mean([final(r) for r in runs[l].values()]) for l in labs5}
        rel_gap = {l: f[l] / f["kfac"] - 1 for l in ("kbfgs", "kbfgs-l")}
        fs = _mean([final(r) for r in runs[best].values()]) if best else math.nan
        span = fs - f["kfac"]  # how much K-FAC gains over tuned SGD
        frac = {l: (f[l] - f["kfac"]) / span if span > 0 else math.nan for l in ("kbfgs", "kbfgs-l")}
        comp = all(fr_ <= 0.25 for fr_ in frac.values())
        some = all(f[l] < fs for l in frac)
        verdicts[5] = ("holds" if comp else "partly" if some else "does not hold",
                       (f"final K-BFGS {f['kbfgs']:.4g} ({100 * rel_gap['kbfgs']:+.0f}%), K-BFGS(L) {f['kbfgs-l']:.4g} "
                       f"({100 * rel_gap['kbfgs-l']:+.0f}%) vs K-FAC {f['kfac']:.4g} and tuned SGD {fs:.4g}: K-BFGS keeps "
                       f"{100 * (1 - frac['kbfgs']):.0f}% / K-BFGS(L) {100 * (1 - frac['kbfgs-l']):.0f}% of K-FAC's gain over SGD"))  # fmt: skip
        P.append(f"\"Comparable\" is taken as: the final loss is no more than 25% of the way from K-FAC's back to tuned SGD's (the losses have a large irreducible floor, so a relative gap in % understates differences); \"partly\": between K-FAC and tuned SGD.\n\n**Verdict: {verdicts[5][0]}** — {verdicts[5][1]}. "
                 "Caveats: Ren et al.'s table 3 is on MNIST/FACES/CURVES autoencoders with tuned learning rates and damping; "
                 "K-BFGS here runs its defaults (lr 0.03, damping 0.3) untuned.\n")  # fmt: skip
        if make_plots:
            plot(runs, labs5, os.path.join(out_dir, "claim5_kbfgs.png"), f"{TASK}: K-FAC vs K-BFGS, K-BFGS(L)")
        P.append(f"![claim 5]({rel}/claim5_kbfgs.png)\n")
    else:
        verdicts[5] = ("not run", "records missing")

    P.append("## Summary\n")
    P.append("| claim | verdict | key numbers |")
    P.append("| --- | --- | --- |")
    for k in range(1, 6):
        v, why = verdicts.get(k, ("not run", ""))
        P.append(f"| {k} | {v} | {why} |")
    P.append("\n## Left out\n")
    P.extend([
        ("* Every task but digits-ae: curves-ae (784-wide autoencoder, the paper-like task), digits-clf and digits-conv were not "
        "run to keep the grid within the 15-minute budget on 2 cores. The papers' results are on MNIST/CURVES/FACES (and CIFAR "
        "for Benzing) with 10⁴–10⁵ iterations; nothing here is at that scale."),
        (f"* Only {steps} iterations and {len(seeds)} seeds; only SGD's learning rate is tuned (4 values, momentum fixed at 0.9 Nesterov); "
        "every second-order method runs its registry defaults (no tuning of λ, γ, T₁–T₃, learning rates)."),
        "* No wall-clock comparison on an idle machine: two runs share the 2 cores, one BLAS thread each.",
        "* Claim 1: K-FAC with Polyak averaging and the paper's exponentially increasing batch-size schedule were not used; fixed batch 256.",
        ("* Claim 3: the exact block-GN comparison covers only the 4 middle layers (≤ 2.2k weights) and 4 checkpoints per run; KFLR (registered) was not compared; "
        "the per-layer cosine plots of Botev fig. 5–7 are given as a table, not a plot; the damping of the exact update is the optimizer's "
        "Tikhonov-equivalent, not a fixed common value."),
        ("* Claim 4: NGD's own hyper-parameters (λ, samples, labels) and FOOF's (lr, damping, T) were not tuned; Benzing's per-update "
        "cost comparison at matched update frequency was not reproduced (ms/iteration with each method's default refresh schedule only)."),
        "* Claim 5: no test-loss / generalisation numbers (training loss only), no Ren et al. damping variants.",
        "* Test-set losses, generalisation and memory use were not measured for any claim.",
    ])
    text = "\n".join(P) + "\n"
    os.makedirs(os.path.dirname(os.path.abspath(doc)), exist_ok=True)
    with open(doc, "w") as f:
        f.write(text)
    return text


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--report-only", action="store_true", help="regenerate the report from the existing records")
    p.add_argument("--workers", type=int, default=2, help="parallel processes (default 2)")
    args = p.parse_args(argv)
    if not args.report_only:
        wall = run_grid(workers=args.workers)
        print(f"grid done in {wall:.0f} s")
    write_report()
    print(f"wrote {os.path.relpath(DOC, ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
