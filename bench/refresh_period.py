"""K-FAC's time per iteration against its refresh period T₃ (issue 13 item 4: refresh frequency as a knob).

    python bench/refresh_period.py                 # writes bench/results/refresh_period.{json,md,png}

Runs ``kronlin.train``'s K-FAC on curves-ae (batch 256, one BLAS thread) for
``STEPS`` iterations at each refresh period in :data:`PERIODS` (γ adapted every
``T₂ = T₃·⌈20/T₃⌉`` iterations, the smallest multiple of T₃ not below the
default 20), and plain SGD on the same batches as the floor.  The time per
iteration is the mean of the record's per-iteration seconds after the first
three (which always refresh), so refreshes are amortised as in training.
Periods and SGD are run alternately for ``ROUNDS`` rounds; each figure is the
median over the rounds.

``--before REF`` also runs kronlin as of git ``REF`` (its package and its own
compiled module, built here) at T₃ = 20 and T₃ = 1 in the same rounds: issue 13's
target compares K-FAC refreshing every step with the T₃ = 20 step of the day the
issue was filed (REF = eb4e0f7, the last commit before its work), paired round by
round (the median of the per-round ratios).

    python bench/refresh_period.py [--before eb4e0f7]   # -> bench/results/refresh_period{,_before}.{json,md}
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
import time

import numpy as np
import scipy.linalg  # noqa: F401  (SciPy's OpenBLAS loaded before threadpool_limits, so the limit covers it)
from threadpoolctl import threadpool_info, threadpool_limits

from kronlin.train import cli

HERE = os.path.dirname(os.path.abspath(__file__))
OUT = os.path.join(HERE, "results", "refresh_period")
PERIODS = (1, 2, 5, 10, 20, 50)
STEPS = int(os.environ.get("STEPS", "60"))
ROUNDS = int(os.environ.get("ROUNDS", "3"))
TASK, BATCH = "curves-ae", 256


BEFORE_PERIODS = (20, 1)


def ms_per_iteration(opt: str, hp: dict, train=cli) -> float:
    """Mean seconds per iteration after the third (ms), one run of ``STEPS`` iterations, seed 0, with the training
    module ``train`` (this kronlin's ``kronlin.train.cli``, or a ``--before`` ref's)."""
    rec = train.run_training(train.make_config(TASK, opt, seed=0, batch=BATCH, steps=STEPS, hp=hp))
    s = np.diff([0.0] + rec["seconds"])[3:]
    return 1000.0 * float(np.mean(s))


def t2_for(t3: int) -> int:
    return t3 * math.ceil(20 / t3)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--before", default=None, help="git ref also timed at T3 = 20 and 1 (its own compiled module)")
    a = ap.parse_args(argv)
    before = None
    if a.before:
        import importlib

        from _harness import package_at

        package_at(a.before, "kronlin_before", build=True)
        before = importlib.import_module("kronlin_before.train.cli")
    rows = {p: [] for p in PERIODS}
    old = {p: [] for p in BEFORE_PERIODS} if before is not None else {}
    sgd = []
    with threadpool_limits(1):
        assert all(i["num_threads"] == 1 for i in threadpool_info()), threadpool_info()
        for r in range(ROUNDS):
            cases = [("new", p) for p in PERIODS] + [("old", p) for p in old]
            sgd.append(ms_per_iteration("sgd", {}))
            for which, p in cases if r % 2 == 0 else cases[::-1]:
                hp = {"T3": p, "T2": t2_for(p)}
                (rows if which == "new" else old)[p].append(
                    ms_per_iteration("kfac", hp, cli if which == "new" else before))
            print(f"round {r}: sgd {sgd[-1]:.1f} ms, kfac " + ", ".join(f"T3={p}: {rows[p][-1]:.1f}" for p in PERIODS)
                  + "".join(f", before T3={p}: {v[-1]:.1f}" for p, v in old.items()), flush=True)
    if before is not None:
        report_before(a.before, rows, old, sgd)
    return report(rows, sgd)


def write_json(suffix: str, **data) -> dict:
    """``refresh_period<suffix>``: the run's settings, ``data`` and its conditions (OpenBLAS kernel, load, machine);
    returns what it wrote."""
    kernels = sorted({str(i.get("architecture")) for i in threadpool_info() if i.get("internal_api") == "openblas"})
    res = {"task": TASK, "batch": BATCH, "steps": STEPS, "rounds": ROUNDS, **data, "openblas_kernel": kernels,
           "load_after": os.getloadavg(), "machine": platform.platform(),
           "finished": time.strftime("%Y-%m-%d %H:%M:%S %Z")}  # fmt: skip
    with open(OUT + suffix, "w") as f:
        json.dump(res, f, indent=1)
    return res


def write_md(suffix: str, lines: list) -> None:
    """A report's table: ``OUT + suffix``, and the same on standard output."""
    with open(OUT + suffix, "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


def report(rows: dict, sgd: list) -> int:
    """``refresh_period.{json,md,png}``: this kronlin's time per iteration at every period, and SGD's."""
    res = write_json(".json", sgd_ms=sgd, kfac_ms={str(p): v for p, v in rows.items()},
                     t2={str(p): t2_for(p) for p in PERIODS})
    kernels = res["openblas_kernel"]
    med_sgd = statistics.median(sgd)
    lines = [f"# K-FAC time per iteration against the refresh period T₃ ({TASK}, batch {BATCH})", "",
             f"{STEPS} iterations per run, mean per-iteration seconds after the third, median of {ROUNDS} alternated "
             f"rounds; one BLAS thread (OpenBLAS {', '.join(kernels)}); load average after: "
             f"{', '.join(f'{x:.2f}' for x in res['load_after'])}. SGD on the same batches: {med_sgd:.1f} ms.", "",
             "| T₃ | T₂ | K-FAC ms / iteration | / SGD | / T₃ = 20 |", "| ---: | ---: | ---: | ---: | ---: |"]  # fmt: skip
    ref = statistics.median(rows[20])
    for p in PERIODS:
        m = statistics.median(rows[p])
        lines.append(f"| {p} | {t2_for(p)} | {m:.1f} | {m / med_sgd:.2f}× | {m / ref:.2f}× |")
    write_md(".md", lines)
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6, 4), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    ax.plot(PERIODS, [statistics.median(rows[p]) for p in PERIODS], marker="o", label="K-FAC")
    ax.axhline(med_sgd, color="0.5", ls="--", label="SGD")
    ax.set_xscale("log")
    ax.set_xticks(PERIODS, [str(p) for p in PERIODS])
    ax.set_xlabel("refresh period T₃ (iterations)")
    ax.set_ylabel("ms per iteration (median of rounds)")
    ax.set_ylim(0, None)
    ax.grid(True, alpha=0.3)
    ax.legend()
    ax.set_title(f"{TASK}, batch {BATCH}, one BLAS thread")
    fig.savefig(OUT + ".png", dpi=110)
    return 0


def report_before(ref: str, rows: dict, old: dict, sgd: list) -> None:
    """``refresh_period_before.{json,md}``: this kronlin at every period against ``ref`` at T₃ = 20 and 1."""
    res = write_json("_before.json", before=ref, sgd_ms=sgd, kfac_ms={str(p): v for p, v in rows.items()},
                     before_kfac_ms={str(p): v for p, v in old.items()})
    kernels = res["openblas_kernel"]
    ref20 = old[20]
    lines = [f"# K-FAC time per iteration against T₃, and kronlin as of `{ref}` ({TASK}, batch {BATCH})", "",
             f"`python bench/refresh_period.py --before {ref}`: {STEPS} iterations per run, mean per-iteration seconds "
             f"after the third; {ROUNDS} rounds, the cases alternating in order; one BLAS thread (OpenBLAS "
             f"{', '.join(kernels)}); load average after: {', '.join(f'{x:.2f}' for x in res['load_after'])}. "
             f"SGD on the same batches: {statistics.median(sgd):.1f} ms. Ratios are medians of per-round ratios "
             f"(range in brackets).", "",
             f"| kronlin | T₃ | ms / iteration | / this kronlin's T₃ = 20 | / `{ref}`'s T₃ = 20 |",
             "| --- | ---: | ---: | ---: | ---: |"]

    def ratio(v, ref_v):
        q = sorted(a / b for a, b in zip(v, ref_v))
        return f"{statistics.median(q):.2f}× ({q[0]:.2f}–{q[-1]:.2f})"

    for p in PERIODS:
        lines.append(f"| this | {p} | {statistics.median(rows[p]):.1f} | {ratio(rows[p], rows[20])} | "
                     f"{ratio(rows[p], ref20)} |")
    for p, v in old.items():
        lines.append(f"| `{ref}` | {p} | {statistics.median(v):.1f} | | {ratio(v, ref20)} |")
    write_md("_before.md", lines)


if __name__ == "__main__":
    sys.exit(main())
