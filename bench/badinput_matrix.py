"""The bad-input matrix of issue 17 item 7 at scale: thousands of calls of every public entry point.

Runs ``tests/badinput.py`` (hypothesis, derandomized; public kronlin names only)
once per entry-point group, each group in its own subprocess so that a crash
(a signal) is counted and attributed instead of ending the run, and writes the
outcome counts per entry point — a clear error naming the argument, a result
agreeing with the dense extended-precision reference, anything else — to
``bench/results/badinput.json`` and ``bench/results/badinput.md``.

    python bench/badinput_matrix.py [--examples 2000]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from collections import Counter

HERE = os.path.dirname(os.path.abspath(__file__))
MATRIX = os.path.join(HERE, "..", "tests", "badinput.py")
GROUPS = ("Kron", "KronEigh", "damping", "stein", "tridiag", "woodbury", "factors", "misc")


def run_group(group: str, examples: int, trace: str) -> dict:
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, MATRIX, "--examples", str(examples), "--groups", group, "--trace", trace],
                          capture_output=True, text=True)
    seconds = time.perf_counter() - t0
    if proc.returncode != 0:  # a crash (negative: the signal) or an exception of the driver itself
        with open(trace) as fh:
            last = fh.read().splitlines()[-1:]
        return {"crashed": True, "status": proc.returncode, "last_call": last, "stderr": proc.stderr[-2000:],
                "seconds": seconds}
    out = json.loads(proc.stdout.splitlines()[-1])
    return {"crashed": False, "counts": out["counts"], "failures": out["failures"], "seconds": seconds}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--examples", type=int, default=2000, help="hypothesis examples per group")
    ap.add_argument("--out", default=os.path.join(HERE, "results", "badinput"))
    args = ap.parse_args()
    results = {}
    for group in GROUPS:
        trace = f"{args.out}.{group}.trace"
        open(trace, "w").close()
        results[group] = run_group(group, args.examples, trace)
        os.remove(trace) if not results[group]["crashed"] else None
        r = results[group]
        print(group, "CRASHED" if r["crashed"] else {k: sum(c.get(k, 0) for c in r["counts"].values())
                                                      for k in ("bad_input", "error", "correct", "other")},
              f"{r['seconds']:.0f} s", flush=True)
    total, crashes = Counter(), sum(r["crashed"] for r in results.values())
    rows = []
    for group, r in results.items():
        if r["crashed"]:
            rows.append(f"| {group} | — | crashed (status {r['status']}) at {r['last_call']} | | | | |")
            continue
        for label, c in sorted(r["counts"].items()):
            total.update(c)
            n = c.get("bad_input", 0) + c.get("well_posed", 0)
            rows.append(f"| {group} | `{label}` | {n} | {c.get('bad_input', 0)} | {c.get('error', 0)} | "
                        f"{c.get('correct', 0)} | {c.get('other', 0)} |")
    n_all = total["bad_input"] + total["well_posed"]
    meta = {"examples_per_group": args.examples, "python": platform.python_version(), "machine": platform.machine()}
    with open(args.out + ".json", "w") as fh:
        json.dump({"meta": meta, "total": dict(total, calls=n_all, crashes=crashes), "groups": results}, fh, indent=1)
    md = [
        "# The bad-input matrix (issue 17 item 7)", "",
        f"`python bench/badinput_matrix.py --examples {args.examples}`: `tests/badinput.py` per entry-point group, "
        f"each group in its own subprocess (a crash is counted, not fatal). Each call is a public kronlin entry point "
        f"with none, one or two arguments replaced by a bad value (None, strings, scalars or bare arrays for lists, "
        f"ragged lists, bool/int/complex/float16/object dtypes, torch tensors, a dimension more or less, wrong shapes, "
        f"NaN/Inf, size 0, non-square, non-symmetric, indefinite, singular, huge and tiny magnitudes, bad parameters, "
        f"choices and switches), or by a valid array in another layout (byte-swapped, unaligned, Fortran, strided, "
        f"subclassed, read-only), which must give the correct result. Outcomes: **error** — "
        f"ValueError/TypeError/LinAlgError/FloatingPointError naming the argument; **correct** — finite, of the right "
        f"shape and dtype, and within a dtype-, order- and condition-aware bound of a dense reference in extended "
        f"precision (where the problem is too ill-conditioned for the reference to answer to working accuracy, a "
        f"componentwise backward error of at most 100·n·eps instead); **other** — anything else.", "",
        f"**Total: {n_all} calls ({total['bad_input']} with a bad input, {total['well_posed']} well-posed): "
        f"{total['error']} clear errors, {total['correct']} correct results, {total['other']} other, "
        f"{crashes} crashes.**", "",
        "| group | entry point | calls | with a bad input | clear error | correct result | other |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: |",
        *rows, "",
    ]
    fails = [f for r in results.values() if not r["crashed"] for f in r["failures"]]
    if fails:
        md += ["First 'other' cases:", ""] + [f"- {f}" for f in fails[:40]] + [""]
    with open(args.out + ".md", "w") as fh:
        fh.write("\n".join(md))
    print(md[4])


if __name__ == "__main__":
    main()
