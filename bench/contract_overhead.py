"""Overhead of the shared operator contract (issue 11): the installed kronlin against an older checkout.

Times ``Kron @ X`` and ``KronEigh.solve(X, damping)`` at p = q = 64 and 1024,
float64, BLAS pinned to one thread (threadpoolctl), *paired*: each round times
the old and the new code back to back on the same arrays (alternating which
goes first) and the reported figure is the median over rounds of new / old.

The old code is imported as a second package, ``kronlin_old``, from a
checkout (``git worktree add /tmp/old-main 7b89c64``); its compiled module is
the installed one's ``_C`` (csrc/ is unchanged between the two), copied in
when the checkout has none.

    python bench/contract_overhead.py --old /tmp/old-main --out bench/results/contract_overhead.md
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time

import numpy as np
import scipy.linalg  # noqa: F401  (SciPy's OpenBLAS loaded before threadpool_limits, so the limit covers it)

from _harness import load_package


def _blas() -> str:
    """Which BLAS kernel ran (OPENBLAS_CORETYPE changes it; results compare only like with like)."""
    from threadpoolctl import threadpool_info

    blas = [i for i in threadpool_info() if i.get("user_api") == "blas"]
    return ", ".join(f"{i.get('internal_api')} {i.get('version')} ({i.get('architecture')})" for i in blas) or "unknown"


def load_old(path: str):
    return load_package(os.path.join(path, "kronlin"), "kronlin_old")


def best_of(fn, reps: int) -> float:
    t0 = time.perf_counter()
    for _ in range(reps):
        fn()
    return (time.perf_counter() - t0) / reps


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--old", default="/tmp/old-main", help="checkout of the code to compare against")
    ap.add_argument("--rounds", type=int, default=21)
    ap.add_argument("--out", default=None, help="write a markdown report here")
    args = ap.parse_args()

    from threadpoolctl import threadpool_limits

    import kronlin

    old = load_old(args.old)
    rng = np.random.default_rng(0)
    rows = []
    with threadpool_limits(1):
        for n in (64, 1024):
            a = rng.standard_normal((2 * n, n))
            A = a.T @ a / (2 * n)
            G = A.copy()
            X = rng.standard_normal((n, n))
            ops = {}
            # one eigenbasis for both: since issue 13 the new eigh calls LAPACK's ?syevd directly (another
            # OpenBLAS build than NumPy's), so the two decompositions differ by rounding; the contract's
            # overhead is measured on identical inputs
            basis = tuple(kronlin.Kron(A, G).eigh())
            for name, lib in (("old", old), ("new", kronlin)):
                K = lib.Kron(A, G)
                E = lib.KronEigh(*basis)
                ops[name] = {"Kron @ X": lambda K=K: K @ X, "KronEigh.solve(X, 1e-3)": lambda E=E: E.solve(X, 1e-3)}
            np.testing.assert_allclose(ops["new"]["Kron @ X"](), ops["old"]["Kron @ X"](), rtol=1e-12)
            np.testing.assert_allclose(ops["new"]["KronEigh.solve(X, 1e-3)"](), ops["old"]["KronEigh.solve(X, 1e-3)"](),
                                       rtol=1e-10)
            reps = 200 if n <= 64 else 3
            for what in ("Kron @ X", "KronEigh.solve(X, 1e-3)"):
                f_old, f_new = ops["old"][what], ops["new"][what]
                f_old(), f_new()  # warm-up
                ratios, t_old, t_new = [], [], []
                for r in range(args.rounds):
                    if r % 2:
                        tn, to = best_of(f_new, reps), best_of(f_old, reps)
                    else:
                        to, tn = best_of(f_old, reps), best_of(f_new, reps)
                    ratios.append(tn / to)
                    t_old.append(to)
                    t_new.append(tn)
                rows.append((what, n, statistics.median(t_old), statistics.median(t_new), statistics.median(ratios),
                             min(ratios), max(ratios)))
                print(f"{what:26s} n={n:5d}  old {rows[-1][2] * 1e3:9.3f} ms  new {rows[-1][3] * 1e3:9.3f} ms  "
                      f"new/old median {rows[-1][4]:.4f}  (range {rows[-1][5]:.3f}-{rows[-1][6]:.3f})", flush=True)

    header = (f"# Overhead of the shared operator contract (issue 11)\n\n"
              f"`python bench/contract_overhead.py --old {args.old}`: the installed kronlin against the checkout "
              f"at `{args.old}`, float64, p = q = n, one BLAS thread (threadpoolctl), {args.rounds} paired rounds "
              f"(old and new back to back, alternating order), median of the per-round ratios new / old.\n\n"
              f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, Python "
              f"{platform.python_version()}, NumPy {np.__version__}; BLAS: {_blas()}; load average before: "
              f"{os.getloadavg()[0]:.2f}.\n\n"
              "| operation | n | old (median) | new (median) | new / old (median of pairs) | range |\n"
              "| --- | ---: | ---: | ---: | ---: | --- |\n")
    table = "".join(f"| `{w}` | {n} | {to * 1e3:.3f} ms | {tn * 1e3:.3f} ms | **{r:.4f}** | {lo:.3f} – {hi:.3f} |\n"
                    for w, n, to, tn, r, lo, hi in rows)
    if args.out:
        with open(args.out, "w") as fh:
            fh.write(header + table + "\nTarget: < 1.03 at n = 1024.\n")
        print("wrote", args.out)


if __name__ == "__main__":
    main()
