"""LAPACK ``?potrf`` and ``?potri`` with ``uplo='L'`` against ``uplo='U'`` (issue 13 item 1: the route per size).

The stacked Cholesky loop (``kronlin.kernels.potrf_stack``, ``csrc/cpu/cholesky_cpu.cpp``) calls SciPy's
``?potrf`` on the Fortran view of each C-ordered matrix.  Its ``'U'`` reads the C lower triangle in place;
its ``'L'`` needs the lower triangle transposed into the upper one first and the factor transposed back
after, which pays where ``'L'`` is clearly faster.  Here each routine runs on Fortran-ordered copies of
K-FAC-like SPD matrices (the copy into a reused buffer is inside every timing, alike for both), paired:
each round runs both ``uplo`` once, in alternating order; the ratio is the median over rounds of
``t_L / t_U``.  One BLAS thread (SciPy's OpenBLAS is loaded before the limit); kernel and load recorded.

    python bench/potrf_uplo.py        # -> bench/results/potrf_uplo.md
"""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

import numpy as np
from scipy.linalg import lapack

from _harness import one_thread
from block_stacks import kfac_like
from refresh import kernel_line, machine  # bench/refresh.py: the run's conditions

RESULTS = Path(__file__).resolve().parent / "results"
ORDERS = (16, 32, 48, 64, 96, 128, 256, 512, 1024, 2048)


def matrices(rng, n: int, dtype):
    """Enough matrices of order ``n`` for a timing of a few milliseconds (200 at 64²)."""
    count = max(1, (200 * 64**3) // n**3)
    return [np.asfortranarray(kfac_like(rng, n, dtype) + 0.1 * np.eye(n, dtype=dtype)) for _ in range(count)]


def timed_pair(run, rounds: int) -> tuple[float, float, float]:
    """Median ms of ``run("U")`` and ``run("L")`` and the median of their per-round ratio L / U."""
    t = {"U": [], "L": []}
    for r in range(rounds):
        for uplo in ("U", "L") if r % 2 else ("L", "U"):
            t0 = time.perf_counter()
            run(uplo)
            t[uplo].append(time.perf_counter() - t0)
    return (1e3 * statistics.median(t["U"]), 1e3 * statistics.median(t["L"]),
            statistics.median(a / b for a, b in zip(t["L"], t["U"])))


def main(rounds: int = 21):
    one_thread()
    start = machine()
    rng = np.random.default_rng(0)
    rows = []
    for n in ORDERS:
        for dtype in (np.float32, np.float64):
            Ms = matrices(rng, n, dtype)
            bufs = [M.copy(order="F") for M in Ms]
            potrf, potri = lapack.get_lapack_funcs(("potrf", "potri"), dtype=dtype)

            def factor(uplo):
                for M, C in zip(Ms, bufs):
                    C[...] = M
                    potrf(C, lower=int(uplo == "L"), clean=0, overwrite_a=1)

            Ls = [potrf(M, lower=1)[0] for M in Ms]
            factors = {"L": Ls, "U": [np.asfortranarray(L.T) for L in Ls]}

            def invert(uplo):
                for F, C in zip(factors[uplo], bufs):
                    C[...] = F
                    potri(C, lower=int(uplo == "L"), overwrite_c=1)

            reps = rounds if n <= 512 else max(7, rounds // 3)
            for name, run in (("?potrf", factor), ("?potri", invert)):
                rows.append((n, len(Ms), np.dtype(dtype).name, name) + timed_pair(run, reps))
    write_table("potrf_uplo", "LAPACK `?potrf` / `?potri`: `uplo='L'` against `uplo='U'`", start, rounds,
                "SciPy's wrappers on Fortran-ordered copies; the copy into a reused buffer is inside both timings.",
                ("routine", "'U' ms", "'L' ms", "L / U, paired"), rows)


def write_table(name: str, title: str, start: dict, rounds: int, note: str, columns: tuple, rows: list) -> None:
    """``results/<name>.md``: the run's conditions and one row ``(order, matrices, dtype, what, ms, ms, ratio)``
    per case of a paired comparison (``columns``: the headings after order, matrices and dtype)."""
    m = machine()
    out = [f"# {title}", "",
           f"`python bench/{name}.py`; one BLAS thread ({kernel_line(m['threadpool_info'])}); load "
           f"{start['loadavg']} → {m['loadavg']}; numpy {m['numpy']}; paired medians over {rounds} rounds "
           f"({max(7, rounds // 3)} above 512²). {note}", "",
           "| order | matrices | dtype | " + " | ".join(columns) + " |", "| ---: | ---: | --- | --- | ---: | ---: | ---: |"]
    out += [f"| {n} | {k} | {d} | {r} | {a:.3f} | {b:.3f} | {q:.3f} |" for n, k, d, r, a, b, q in rows]
    (RESULTS / f"{name}.md").write_text("\n".join(out) + "\n")
    print("\n".join(out))

if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 21)
