"""The self-check pins BLAS/OpenMP threads (default one) and reports median times after a warm-up."""

from __future__ import annotations

import io
import os
import subprocess
import sys

import pytest

from kronlin import _selfcheck
from kronlin._selfcheck import timing

threadpoolctl = pytest.importorskip("threadpoolctl")


def _blas_threads() -> set:
    return {d["num_threads"] for d in threadpoolctl.threadpool_info() if d["user_api"] == "blas"}


@pytest.mark.parametrize("threads, expected", [(None, {1}), (1, {1}), (3, {3})])
def test_run_pins_blas_threads_while_checking(monkeypatch, threads, expected):
    seen = []
    label, check = _selfcheck.CHECKS[0]

    def recording(kl, P):
        seen.append(_blas_threads())
        return check(kl, P)

    monkeypatch.setattr(_selfcheck, "CHECKS", [(label, recording)])
    buf = io.StringIO()
    with threadpoolctl.threadpool_limits(2):  # what an unpinned 2-core machine would use
        assert _selfcheck.run(sizes=((3, 2),), dtypes=("float64",), out=buf, threads=threads)
        assert _blas_threads() == {2}  # restored afterwards
    assert seen and all(s == expected for s in seen)
    assert f"threads: BLAS/OpenMP pinned to {min(expected)}" in buf.getvalue()


def test_median_of_repeats_after_a_warm_up(monkeypatch):
    clock = [0.0]
    durations = iter([0.050, 0.002, 0.010, 0.001, 0.002, 0.003])  # warm-up first, then 5 timed runs
    monkeypatch.setattr(timing.time, "perf_counter", lambda: clock[0])

    def fn():
        clock[0] += next(durations)

    # warm-up of 50 ms is neither the answer nor (as with a best-of) the 1 ms outlier: the median of the 5 runs
    assert timing.median_time(fn, repeats=5, min_repeats=3, budget=1.0) == pytest.approx(0.002)


def test_cli_threads_option(tmp_path):
    env = {**os.environ, "OPENBLAS_NUM_THREADS": "2", "OMP_NUM_THREADS": "2"}
    r = subprocess.run([sys.executable, "-m", "kronlin", "--quick", "--threads", "-1"], cwd=tmp_path, env=env,
                       capture_output=True, text=True, timeout=300, check=False)  # fmt: skip
    assert r.returncode == 2 and "--threads must be >= 0" in r.stderr
    r = subprocess.run([sys.executable, "-m", "kronlin", "--help"], cwd=tmp_path, env=env, capture_output=True,
                       text=True, timeout=300, check=False)  # fmt: skip
    assert r.returncode == 0 and "--threads" in r.stdout


def test_without_threadpoolctl_the_default_runs_unpinned_and_says_so(monkeypatch):
    from kronlin._threads import thread_limit

    monkeypatch.setitem(sys.modules, "threadpoolctl", None)  # "import threadpoolctl" now fails
    limit, text = thread_limit(1, required=False)
    with limit:
        pass
    assert "not pinned" in text and "pip install threadpoolctl" in text
    with pytest.raises(RuntimeError, match="--threads needs threadpoolctl"):
        thread_limit(2, required=True)
    assert thread_limit(0, required=True)[1] == "threads: BLAS/OpenMP default (not pinned)"
