"""Reproduce (at small scale) five claims from the papers behind ``kronlin.train`` (issue 7).

One command runs a fixed protocol, keeps every run's JSON record under
``bench/results/repro/`` and regenerates ``docs/reproduction.md`` from the kept
records only::

    python bench/reproduce.py                          # everything (about 45 min on 2 cores), then the report
    python bench/reproduce.py --tasks digits-ae        # one task's records only (about 10 min)
    python bench/reproduce.py --report-only            # rewrite the report and plots from the records

Protocol, per task in :data:`TASKS` (``digits-ae`` and ``curves-ae``, the
autoencoders the papers benchmark on, scaled down):

1. **Tuning** (seed :data:`TUNE_SEED`): every optimizer with hand-set
   hyper-parameters (SGD, FOOF, NGD, K-BFGS, K-BFGS(L)) runs each point of its
   grid in :data:`TUNE`; the point with the lowest final loss is kept.  The
   K-FAC family (K-FAC, tridiagonal, KFRA) adapts its damping and step itself
   and runs its registry defaults (the papers' settings), untuned.
2. **Evaluation** (seeds :data:`EVAL_SEEDS`, disjoint from the tuning seed, so
   the tuned methods are not scored on the run they were picked on): every
   entry of :data:`EVAL`, tuned ones with their kept point.
3. **Alignment** (claim 3, :mod:`_repro_align`): Botev et al.'s fig. 5–7
   protocol along a KFRA trajectory — per layer, the cosine of each curvature
   model's update with the exact damped block Gauss–Newton update on a probe
   batch.

Plus a **defaults check** (:data:`DEFAULTS_TASKS`): every registered optimizer
at its documented defaults on every task, one seed, to show that none of them
diverges or rejects a step there.

Each run is one process job (``spawn`` pool, :data:`WORKERS` workers) with one
BLAS thread.  Records: ``run__<label>__s<seed>.json`` / ``tune__<label>__s0.json``
as written by ``python -m kronlin.train`` (``task, opt, seed, config, loss,
seconds, rejected``) plus ``label``; ``align__s<seed>.json``
(``check__<task>-<opt>__s0.json`` in ``defaults/``)
(:func:`_repro_align.run_alignment`); ``meta.json`` (conditions, grids, wall
time, the tuned choices).  The report is :mod:`_repro_report`.
"""

from __future__ import annotations

import argparse
import glob
import itertools
import json
import os
import platform
import sys
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
for p in (HERE, ROOT):
    if p not in sys.path:
        sys.path.insert(0, p)

OUT_DIR = os.path.join(HERE, "results", "repro")
DOC = os.path.join(ROOT, "docs", "reproduction.md")
COMMAND = "python bench/reproduce.py"
WORKERS = 2

#: task -> iterations, batch, alignment probe settings (``max_params``: layers with more weights are skipped).
TASKS = {
    "digits-ae": {"steps": 800, "batch": 256,
                  "align": {"at": (10, 50, 100, 200, 400, 800), "probe_batch": 1000, "max_params": 9000, "seeds": (1, 2)}},
    "curves-ae": {"steps": 500, "batch": 256,
                  "align": {"at": (10, 50, 100, 250, 500), "probe_batch": 1000, "max_params": 5200, "seeds": (1,)}},
}  # fmt: skip
TUNE_SEED = 0
EVAL_SEEDS = (1, 2, 3)
#: label -> (optimizer, {hyper-parameter: grid}); the registry default of every swept value is in its grid.
TUNE = {
    "sgd": ("sgd", {"lr": (0.005, 0.01, 0.02, 0.05, 0.1)}),
    "foof": ("foof", {"lr": (0.03, 0.1, 0.3), "damping": (0.3, 1.0, 3.0)}),
    "ngd": ("ngd", {"lr": (0.1, 0.3, 1.0), "lam": (0.3, 1.0, 3.0)}),
    "kbfgs": ("kbfgs", {"lr": (0.03, 0.1, 0.3), "damping": (0.1, 0.3, 1.0)}),
    "kbfgs-l": ("kbfgs-l", {"lr": (0.03, 0.1, 0.3), "damping": (0.1, 0.3, 1.0)}),
}
#: label -> (optimizer, overrides) of the untuned evaluation entries.
FIXED = {
    "kfac": ("kfac", {}),
    "kfac-nomom": ("kfac", {"momentum": False}),  # like with like for KFRA (claim 3), which has no momentum
    "kfac-tridiag": ("kfac-tridiag", {}),
    "kfac-exactdamp": ("kfac", {"damping": "exact"}),
    "kfra": ("kfra", {}),
}
EVAL = tuple(FIXED) + tuple(TUNE)
ALIGN_METHODS = ("kfac", "kfra", "kflr")
DEFAULTS_TASKS = {"digits-clf": 300, "digits-conv": 300, "digits-ae": 300, "curves-ae": 200}


def grid_points(grid: dict) -> list[dict]:
    """Every combination of a ``{name: values}`` grid, as override dicts (first key slowest)."""
    keys = list(grid)
    return [dict(zip(keys, vals)) for vals in itertools.product(*(grid[k] for k in keys))]


def point_label(base: str, hp: dict) -> str:
    return base + "".join(f"-{k}{v:g}" for k, v in hp.items())


# ----------------------------------------------------------------------- jobs
def _one_run(job):
    """Train one configuration single-threaded and write its record; returns ``(path, losses)``.

    With the ``prefix`` ``"check"`` an optimizer that refuses the task's network
    (``ValueError`` at construction, e.g. the tridiagonal inverse on convolutions)
    gets a record ``{"task", "opt", "label", "skipped": message}`` instead.
    """
    prefix, label, opt, hp, seed, steps, task, batch, out_dir = job
    from threadpoolctl import threadpool_limits

    from kronlin.train.cli import setup, make_config, run_training, write_json

    config = make_config(task, opt, seed=seed, batch=batch, steps=steps, hp=hp)
    path = os.path.join(out_dir, f"{prefix}__{label}__s{seed}.json")
    if prefix == "check":
        try:
            setup(config)
        except ValueError as e:
            write_json(path, {"task": task, "opt": opt, "label": label, "skipped": str(e)})
            return path, []
    with threadpool_limits(1):
        rec = run_training(config)
    rec["label"] = label
    write_json(path, rec)
    return path, rec["loss"]


def _one_align(job):
    task, seed, steps, batch, a, out_dir = job
    import _repro_align

    path = os.path.join(out_dir, f"align__s{seed}.json")
    _repro_align.run_alignment(task, seed, steps=steps, batch=batch, probe_batch=a["probe_batch"], at=a["at"],
                               max_params=a["max_params"], methods=ALIGN_METHODS, out_path=path)  # fmt: skip
    return path, None


class _Runner:
    """Submit jobs to a process pool (or run them inline with ``workers=1``) and log completions.

    With ``verbose``, each finished job is logged on stdout and a progress line
    (jobs done of ``total``, elapsed time, an estimate of what remains from the
    mean time per job so far) is kept on stderr.
    """

    def __init__(self, workers, verbose, total=0, label="reproduce"):
        from kronlin.train.progress import Progress

        self.workers, self.verbose, self.t0 = workers, verbose, time.perf_counter()
        self.progress = Progress(total, label, enabled=verbose and total > 0)
        self.done = 0
        self.pool = None
        if workers > 1:
            import multiprocessing as mp

            self.pool = mp.get_context("spawn").Pool(workers)

    def submit(self, fn, job):
        if self.pool is None:
            res = fn(job)
            return _Done(res)
        return self.pool.apply_async(fn, (job,))

    def get(self, handle):
        path, res = handle.get()
        self.done += 1
        if self.verbose:
            print(f"[{time.perf_counter() - self.t0:7.1f}s] {os.path.relpath(path, OUT_DIR)}", flush=True)
            self.progress.update(self.done, None, time.perf_counter() - self.t0)
        return res

    def close(self):
        self.progress.close()
        if self.pool is not None:
            self.pool.close()
            self.pool.join()


class _Done:
    def __init__(self, res):
        self.res = res

    def get(self):
        return self.res


def final_loss(loss, w: int = 25) -> float:
    """Mean of the last ``w`` losses (non-finite losses count as +inf)."""
    x = np.asarray(loss[-w:], dtype=float)
    return float(np.mean(np.where(np.isfinite(x), x, np.inf))) if len(x) else float("inf")


def _clear(out_dir, patterns):
    os.makedirs(out_dir, exist_ok=True)
    for pat in patterns:
        for old in glob.glob(os.path.join(out_dir, pat)):
            os.remove(old)


def _meta_common(workers):
    return {"workers": workers, "threads_per_worker": 1, "command": COMMAND, "machine": platform.platform(),
            "processor": platform.processor() or platform.machine(), "cpu_count": os.cpu_count(),
            "python": platform.python_version(), "numpy": np.__version__,
            "finished": time.strftime("%Y-%m-%d %H:%M:%S %Z")}  # fmt: skip


def run_task(task, *, out_dir=None, cfg=None, tune=TUNE, fixed=FIXED, tune_seed=TUNE_SEED, eval_seeds=EVAL_SEEDS,
             align=True, workers=WORKERS, verbose=True) -> dict:  # fmt: skip
    """Tune, evaluate and probe one task; write its records and ``meta.json``; return the meta dict."""
    from kronlin.train.cli import write_json

    cfg = dict(TASKS[task] if cfg is None else cfg)
    out_dir = out_dir or os.path.join(OUT_DIR, task)
    _clear(out_dir, ["*.json", "*.png"])
    steps, batch = cfg["steps"], cfg["batch"]
    a = cfg.get("align") if align else None
    n_jobs = (sum(len(grid_points(g)) for _, g in tune.values()) + len(eval_seeds) * (len(fixed) + len(tune))
              + (len(a["seeds"]) if a else 0))  # fmt: skip
    R = _Runner(workers, verbose, n_jobs, f"reproduce {task}")
    t0 = time.perf_counter()
    # slow, independent jobs first: alignment, then tuning, then the untuned evaluation runs
    align_h = [R.submit(_one_align, (task, s, steps, batch, a, out_dir)) for s in a["seeds"]] if a else []
    tune_h = {}
    for base, (opt, grid) in tune.items():
        for hp in grid_points(grid):
            job = ("tune", point_label(base, hp), opt, hp, tune_seed, steps, task, batch, out_dir)
            tune_h[(base, json.dumps(hp))] = R.submit(_one_run, job)
    fixed_h = [R.submit(_one_run, ("run", lab, opt, hp, s, steps, task, batch, out_dir))
               for s in eval_seeds for lab, (opt, hp) in fixed.items()]  # fmt: skip
    scores = {key: final_loss(R.get(h)) for key, h in tune_h.items()}
    chosen = {}
    for base, (opt, grid) in tune.items():
        best = min((json.loads(k) for (b, k) in scores if b == base), key=lambda hp: scores[(base, json.dumps(hp))])
        chosen[base] = (opt, best)
    tuned_h = [R.submit(_one_run, ("run", lab, opt, hp, s, steps, task, batch, out_dir))
               for s in eval_seeds for lab, (opt, hp) in chosen.items()]  # fmt: skip
    for h in fixed_h + tuned_h + align_h:
        R.get(h)
    R.close()
    meta = {**_meta_common(workers), "task": task, "steps": steps, "batch": batch, "wall_seconds": time.perf_counter() - t0,
            "tune_seed": tune_seed, "eval_seeds": list(eval_seeds),
            "tune": {k: [o, {h: list(v) for h, v in g.items()}] for k, (o, g) in tune.items()},
            "fixed": {k: [o, hp] for k, (o, hp) in fixed.items()},
            "chosen": {k: [o, hp] for k, (o, hp) in chosen.items()},
            "align": ({**a, "methods": list(ALIGN_METHODS), "trajectory": "kfra"} if a else None)}  # fmt: skip
    write_json(os.path.join(out_dir, "meta.json"), meta)
    return meta


def run_defaults(*, out_dir=None, tasks=DEFAULTS_TASKS, seed=0, batch=256, workers=WORKERS, verbose=True) -> dict:
    """Every registered optimizer at its defaults on ``tasks`` (``{task: steps}``), one seed."""
    from kronlin.train.cli import write_json
    from kronlin.train.optim import OPTIMIZERS

    out_dir = out_dir or os.path.join(OUT_DIR, "defaults")
    _clear(out_dir, ["*.json"])
    R = _Runner(workers, verbose, len(tasks) * len(OPTIMIZERS), "reproduce defaults")
    t0 = time.perf_counter()
    hs = [R.submit(_one_run, ("check", f"{task}-{opt}", opt, {}, seed, steps, task, batch, out_dir))
          for task, steps in tasks.items() for opt in sorted(OPTIMIZERS)]  # fmt: skip
    for h in hs:
        R.get(h)
    R.close()
    meta = {**_meta_common(workers), "tasks": dict(tasks), "seed": seed, "batch": batch,
            "wall_seconds": time.perf_counter() - t0}  # fmt: skip
    write_json(os.path.join(out_dir, "meta.json"), meta)
    return meta


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--report-only", action="store_true", help="regenerate the report from the existing records")
    p.add_argument("--tasks", nargs="+", choices=list(TASKS) + ["defaults"], default=list(TASKS) + ["defaults"],
                   help="what to (re)run; the others' records are kept (default: all)")  # fmt: skip
    p.add_argument("--workers", type=int, default=WORKERS, help=f"parallel processes (default {WORKERS})")
    p.add_argument("--quiet", action="store_true", help="no job log and no progress line (stderr)")
    args = p.parse_args(argv)
    if not args.report_only:
        for task in args.tasks:
            kw = {"workers": args.workers, "verbose": not args.quiet}
            meta = run_defaults(**kw) if task == "defaults" else run_task(task, **kw)
            print(f"{task} done in {meta['wall_seconds']:.0f} s", flush=True)
    import _repro_report

    _repro_report.write_report(OUT_DIR, DOC)
    print(f"wrote {os.path.relpath(DOC, ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
