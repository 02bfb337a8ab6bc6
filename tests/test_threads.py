"""Operators shared between threads: cached factorizations appear whole or not at all (issue 17, items 1-2).

Each scenario runs in a subprocess, so a heap corruption (SciPy's ``lu_solve``
writes to the pivots it is given, and four threads sharing one cached LU
aborted the interpreter) is a test failure, not the end of the test run.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

_PRELUDE = textwrap.dedent(
    """
    import sys, threading
    import numpy as np
    import kronlin

    rng = np.random.default_rng(0)
    errors = []

    def hammer(make_op, call, threads=8, rounds=20, calls=6, fresh=True):
        op = make_op()
        for _ in range(rounds):
            if fresh:
                op = make_op()  # cold caches: every thread races to build them
            barrier = threading.Barrier(threads)
            want = call(make_op())  # the answer of a private operator

            def work():
                barrier.wait()
                try:
                    for _ in range(calls):
                        got = call(op)
                        if not np.allclose(got, want, rtol=1e-12, atol=1e-12):
                            errors.append("wrong result")
                except Exception as exc:  # noqa: BLE001
                    errors.append(repr(exc))

            ts = [threading.Thread(target=work) for _ in range(threads)]
            for t in ts:
                t.start()
            for t in ts:
                t.join()

    def spd(n):
        X = rng.standard_normal((3 * n, n))
        return X.T @ X / (3 * n) + 0.1 * np.eye(n)
    """
)

SCENARIOS = {
    # issue 17 item 1: non-SPD factors -> one shared LU (the glibc abort), warm caches as in the report
    "kron_lu_shared_pivots": """
        A = rng.standard_normal((96, 96)) + 30 * np.eye(96)
        G = rng.standard_normal((80, 80)) + 27 * np.eye(80)
        X = rng.standard_normal((80, 96))
        K = kronlin.Kron(A, G)
        hammer(lambda: K, lambda op: op.solve(X), threads=4, rounds=30, calls=12, fresh=False)
        hammer(lambda: kronlin.Kron(A, G), lambda op: op.solve(X), threads=4, rounds=10, calls=4)
    """,
    # issue 17 item 2: the cold-cache race (_fa published before _fg existed), Cholesky factors
    "cold_caches": """
        A, G = spd(50), spd(40)
        X = rng.standard_normal((40, 50))
        hammer(lambda: kronlin.Kron(A, G), lambda op: op.solve(X))
        hammer(lambda: kronlin.Kron(A, G), lambda op: op.logdet())
        hammer(lambda: kronlin.Kron(A, G), lambda op: op.eigh().solve(X, 0.1))
        hammer(lambda: kronlin.DampedKron(A, G, 0.1, mode="factored"), lambda op: op.solve(X))
        hammer(lambda: kronlin.DampedKron(A, G, 0.1, mode="exact"), lambda op: op.solve(X))
        C, D = rng.standard_normal((50, 50)), rng.standard_normal((40, 40))
        hammer(lambda: kronlin.KronSumInverse(A + 5 * np.eye(50), G, C, D, method="schur"), lambda op: op.T.solve(X))
        acts, errs = [rng.standard_normal((16, 50))], [rng.standard_normal((16, 40))]
        hammer(lambda: kronlin.WoodburyFisher(acts, errs, 0.1), lambda op: op.solve([X])[0])
        hammer(lambda: kronlin.BlockDiagInverse([A], [G], gamma=0.1), lambda op: op.apply([X])[0])
    """,
    # issue 13: every layer in a stack, so the blocks go straight to the compiled loop, which multiplies with
    # the GIL released (and in float32, whose stacks use SciPy's sgemm from C++)
    "stacked_blocks": """
        for dtype in (np.float64, np.float32):
            As = [spd(24).astype(dtype) for _ in range(20)]
            Gs = [spd(16).astype(dtype) for _ in range(20)]
            Vs = [rng.standard_normal((16, 24)).astype(dtype) for _ in range(20)]
            hammer(lambda: kronlin.BlockDiagInverse(As, Gs, gamma=0.1), lambda op: np.stack(op.apply(Vs)), rounds=8)
    """,
}


@pytest.mark.parametrize("name", sorted(SCENARIOS))
def test_shared_operator_under_threads(name, tmp_path):
    script = _PRELUDE + textwrap.dedent(SCENARIOS[name]) + textwrap.dedent(
        """
        print(len(errors), sorted(set(errors))[:3])
        sys.exit(1 if errors else 0)
        """
    )
    env = dict(os.environ, OPENBLAS_NUM_THREADS="1", OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    # run outside the repository root so that the installed kronlin is imported (see conftest.py)
    proc = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, (
        f"{name}: exit status {proc.returncode} (negative: killed by signal {-proc.returncode})\n"
        f"stdout: {proc.stdout[-2000:]}\nstderr: {proc.stderr[-2000:]}"
    )
