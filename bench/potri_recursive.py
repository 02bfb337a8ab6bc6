"""The SPD inverse from a Cholesky factor by halves against LAPACK ``?potri`` (issue 13 item 1: the route per size).

``?potri`` is ``?trtri`` (the triangular inverse ``L⁻¹``) then ``?lauum`` (``L⁻ᵀ L⁻¹``).  OpenBLAS's
``?trtri`` runs at a third of its ``?gemm``'s speed at 512²-1024² on one thread, so
``kronlin.kernels.potri_stack`` inverts the triangle by halves, ``L₂₁ ← −L₂₂⁻¹ (L₂₁ L₁₁⁻¹)``, with each
triangular product by halves again: nearly all flops become ``?gemm`` calls (``csrc/cpu/cholesky_cpu.cpp``,
reference ``kronlin.kernels.potri_stack_reference``), then ``?lauum``.  Here, on lower Cholesky factors of
K-FAC-like SPD matrices (the copy of the factors into the working stack is inside every timing, alike for
all), paired: each round runs every route once, in an order that alternates; each ratio is the median over
rounds of the per-round ratio to ``?potri`` in the same loop (compiled: the same C++ loop with
``by_halves=False``; Python: the loop of SciPy wrapper calls).  The Python by-halves reference loses to the
Python ``?potri`` loop (SciPy's wrappers copy every sub-block view), so without the extension kronlin keeps
``?potri``.  One BLAS thread (SciPy's OpenBLAS is loaded before the limit); kernel and load recorded.

    python bench/potri_recursive.py [rounds]     # -> bench/results/potri_recursive.md
"""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

import numpy as np

from kronlin import kernels

from _harness import one_thread
from block_stacks import kfac_like
from potrf_uplo import write_table
from refresh import machine  # bench/refresh.py: the run's conditions

RESULTS = Path(__file__).resolve().parent / "results"
ORDERS = (16, 32, 48, 64, 96, 128, 256, 512, 785, 1024, 1536, 2048)


def factors(rng, n: int, dtype):
    """A stack of lower Cholesky factors of order ``n``, enough for a timing of a few milliseconds (200 at 64²)."""
    count = max(1, (200 * 64**3) // n**3)
    S = np.stack([kfac_like(rng, n, dtype) + 0.1 * np.eye(n, dtype=dtype) for _ in range(count)])
    L, info = kernels.potrf_stack(S)
    assert not info.any()
    return L


def routes():
    """name -> (run(stack), the name of the ?potri route it is compared with)."""
    def ref(by_halves):
        def run(T):
            with kernels.disabled():
                return kernels.potri_stack_reference(T, by_halves=by_halves)
        return run

    return {"compiled ?potri": (lambda T: kernels.potri_stack(T, by_halves=False), None),
            "compiled by halves": (kernels.potri_stack, "compiled ?potri"),
            "Python ?potri": (ref(False), None),
            "Python by halves": (ref(True), "Python ?potri")}


def main(rounds: int = 21):
    one_thread()
    assert kernels.compiled(np) is not None, "the compiled kernels did not load"
    start = machine()
    rng = np.random.default_rng(0)
    R = routes()
    rows = []
    for n in ORDERS:
        for dtype in (np.float32, np.float64):
            L = factors(rng, n, dtype)
            T = np.empty_like(L)
            results = {}
            for name, (run, _) in R.items():  # the routes agree: the same inverses to round-off
                T[...] = L
                assert not run(T).any()
                results[name] = T.copy()
            scale = np.abs(results["compiled ?potri"]).max()
            for name, X in results.items():
                assert np.abs(X - results["compiled ?potri"]).max() <= 1e3 * n * np.finfo(dtype).eps * scale, name
            assert np.array_equal(results["compiled by halves"], results["Python by halves"])
            reps = rounds if n <= 512 else max(7, rounds // 3)
            t = {name: [] for name in R}
            names = list(R)
            for r in range(reps):
                for name in names if r % 2 else names[::-1]:
                    T[...] = L
                    t0 = time.perf_counter()
                    R[name][0](T)
                    t[name].append(time.perf_counter() - t0)
            for name, (_, base) in R.items():
                if base is None:
                    continue
                ratio = statistics.median(a / b for a, b in zip(t[name], t[base]))
                rows.append((n, L.shape[0], np.dtype(dtype).name, name, 1e3 * statistics.median(t[base]),
                             1e3 * statistics.median(t[name]), ratio))
    write_table("potri_recursive", "The SPD inverse by halves against LAPACK `?potri`", start, rounds,
                "Each route inverts the same stack of Cholesky factors (copied into the working stack inside every "
                "timing) and mirrors the result; ratios are per-round ratios to `?potri` in the same loop, compiled "
                "or Python.", ("route", "`?potri` ms", "by halves ms", "by halves / `?potri`, paired"), rows)

if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 21)
