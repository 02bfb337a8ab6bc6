"""The main job's K-FAC step against SGD's, paired in one process (issue 13's "K-FAC step ≤ 2× SGD's").

    python bench/main_job_ratio.py        # writes bench/results/main_job_ratio.{json,md}

``python -m kronlin.train compare`` trains digits-ae with K-FAC and with SGD
(Nesterov momentum) from the same weights and batches.  Timing the two runs in
separate processes, as the README's first figures did, lets the machine's load
move between them (2.0–2.8× across runs on this shared 2-core machine).  Here
both optimizers train side by side in one process: after ``WARMUP`` iterations
each, every round runs ``BLOCK`` iterations of one then of the other (the order
alternates), each on its own trajectory and batches, and the figure is the
median over rounds of the per-round ratio.  ``BLOCK`` is a multiple of K-FAC's
T₃ = T₂ = 20, so every block holds the same share of refreshes and γ trials.
One BLAS thread.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import time

import scipy.linalg  # noqa: F401  (SciPy's OpenBLAS loaded before threadpool_limits, so the limit covers it)
from threadpoolctl import threadpool_info, threadpool_limits

from kronlin.train.cli import COMPARE_DEFAULT_TASK, DEFAULT_BATCH, draw_batches, make_config, setup

HERE = os.path.dirname(os.path.abspath(__file__))
OUT = os.path.join(HERE, "results", "main_job_ratio")
BLOCK = int(os.environ.get("BLOCK", "40"))
ROUNDS = int(os.environ.get("ROUNDS", "15"))
WARMUP = int(os.environ.get("WARMUP", "40"))


def trainer(opt: str):
    """A function running ``k`` more iterations of ``opt`` on the main job's task; returns seconds per iteration."""
    config = make_config(COMPARE_DEFAULT_TASK, opt, seed=0, batch=DEFAULT_BATCH, steps=10**9)
    task, net, data_rng, optimizer = setup(config)

    def run(k: int) -> float:
        t = time.perf_counter()
        for _ in range(k):
            X, Y = draw_batches(task, config["batch"], data_rng, optimizer.batches_per_step)
            optimizer.step(X, Y)
        return (time.perf_counter() - t) / k

    return run


def main() -> dict:
    load = os.getloadavg()
    with threadpool_limits(1):
        runs = {"kfac": trainer("kfac"), "sgd": trainer("sgd")}
        for run in runs.values():
            run(WARMUP)
        times = {k: [] for k in runs}
        for r in range(ROUNDS):
            for k in (("kfac", "sgd") if r % 2 else ("sgd", "kfac")):
                times[k].append(runs[k](BLOCK))
        blas = [f"{i.get('internal_api')} {i.get('version')} ({i.get('architecture')})"
                for i in threadpool_info() if i.get("user_api") == "blas"]
    ratios = [a / b for a, b in zip(times["kfac"], times["sgd"])]
    out = {"task": COMPARE_DEFAULT_TASK, "batch": DEFAULT_BATCH, "block": BLOCK, "rounds": ROUNDS, "warmup": WARMUP,
           "ms_per_iteration": {k: 1e3 * statistics.median(v) for k, v in times.items()},
           "ratio": statistics.median(ratios), "ratio_range": [min(ratios), max(ratios)], "ratios": ratios,
           "times": times, "blas": blas, "load_before": load, "load_after": os.getloadavg(),
           "python": platform.python_version()}
    with open(OUT + ".json", "w") as fh:
        json.dump(out, fh, indent=1)
    ms = out["ms_per_iteration"]
    md = [
        "# The main job's K-FAC step against SGD's, paired in one process", "",
        f"`python bench/main_job_ratio.py`: {out['task']}, batch {out['batch']}, one BLAS thread ({', '.join(blas)}); "
        f"{WARMUP} warm-up iterations each, then {ROUNDS} rounds of {BLOCK} iterations of each optimizer (order "
        f"alternating); load average {load[0]:.2f} before, {out['load_after'][0]:.2f} after.", "",
        "| K-FAC ms/iteration | SGD ms/iteration | K-FAC / SGD (median of per-round ratios) | range | target |",
        "| ---: | ---: | ---: | --- | --- |",
        f"| {ms['kfac']:.2f} | {ms['sgd']:.2f} | **{out['ratio']:.2f}×** | {out['ratio_range'][0]:.2f}–"
        f"{out['ratio_range'][1]:.2f} | ≤ 2 (issue 13) |", "",
    ]
    with open(OUT + ".md", "w") as fh:
        fh.write("\n".join(md))
    print("\n".join(md))
    return out


if __name__ == "__main__":
    main()
