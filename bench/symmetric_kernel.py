"""The symmetric-matrix kernels (``kronlin.kernels.asymmetry`` / ``mirror_lower``) against their NumPy references.

The symmetry check runs on every symmetric input (``Kron.eigh``, ``Factor``, the
block inverses) and the mirror after every LAPACK ``?potri`` (SPD inverses);
both are one O(n²) pass beside an O(n³) factorization.  Paired (each round runs
every route once, in a fresh random order, on the same input), one BLAS thread,
kernel and load recorded; the table gives medians and, as the floor, one
``numpy.isfinite(x).all()`` pass over the same array (one read of memory).

    python bench/symmetric_kernel.py        # -> bench/results/symmetric_kernel.md
"""

from __future__ import annotations

import statistics
import sys
from pathlib import Path

import numpy as np
import scipy.linalg  # noqa: F401  (loads SciPy's OpenBLAS before the thread limit)
import threadpoolctl

from _harness import shuffled_rounds
from kronlin import kernels
from refresh import kernel_line, machine  # bench/refresh.py: the run's conditions

RESULTS = Path(__file__).resolve().parent / "results"


def routes(x, L):
    def ref(fn, *a):
        def run():
            with kernels.disabled():
                fn(np, *a)
        return run

    return {
        "asymmetry (kernel)": lambda: kernels.asymmetry(np, x),
        "asymmetry (reference)": ref(kernels.asymmetry, x),
        "mirror_lower (kernel)": lambda: kernels.mirror_lower(np, L),
        "mirror_lower (reference)": ref(kernels.mirror_lower, L),
        "isfinite pass (floor)": lambda: bool(np.isfinite(x).all()),
    }


def main(rounds: int = 21):
    threadpoolctl.threadpool_limits(1)
    start = machine()
    rng = np.random.default_rng(0)
    rows = []
    for dtype in ("float32", "float64"):
        for shape in ((512, 512), (1024, 1024), (2048, 2048), (200, 64, 64)):
            a = rng.standard_normal(shape).astype(dtype)
            x = a + np.swapaxes(a, -1, -2)
            L = np.tril(a)
            fs = routes(x, L)
            times = shuffled_rounds(fs, rounds)
            floor = times["isfinite pass (floor)"]
            for k, v in times.items():
                rows.append((" x ".join(map(str, shape)), dtype, k, statistics.median(v) * 1e3,
                             statistics.median(t / f for t, f in zip(v, floor))))
    m = machine()
    out = ["# Symmetric-matrix kernels against their NumPy references", "",
           f"`python bench/symmetric_kernel.py`; one BLAS thread ({kernel_line(m['threadpool_info'])}); load "
           f"{start['loadavg']} → {m['loadavg']}; numpy {m['numpy']}; paired medians over {rounds} rounds.", "",
           "| shape | dtype | route | median ms | ratio to one isfinite pass |", "| --- | --- | --- | ---: | ---: |"]
    out += [f"| {s} | {d} | {k} | {t:.3f} | {r:.2f} |" for s, d, k, t, r in rows]
    (RESULTS / "symmetric_kernel.md").write_text("\n".join(out) + "\n")
    print("\n".join(out))


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 21)
