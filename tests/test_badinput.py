"""The bad-input matrix (issue 17 item 7) over every public entry point: no crash, no unclear error, no wrong answer.

``tests/badinput.py`` draws, with hypothesis (derandomized: the same calls on
every run), well-posed calls of every public name and calls with one or two
arguments replaced by bad values, and classifies each as a clear error naming
the argument, a result agreeing with a dense extended-precision reference, or
anything else.  It runs in a subprocess, so a crash (a signal) fails this test
instead of ending the run; the call being made is written to a trace file
first, so a crash names its input.  ``bench/badinput_matrix.py`` runs the same
matrix with thousands of calls and records the counts.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

import numpy as np
import pytest

import kronlin

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import badinput  # noqa: E402

#: hypothesis examples per entry-point group in CI (8 groups, 1600 calls; about 12 s of CPU)
EXAMPLES = 200


def test_matrix_has_no_other_outcome(tmp_path):
    trace = tmp_path / "trace.txt"
    proc = subprocess.run(
        [sys.executable, os.path.join(HERE, "badinput.py"), "--examples", str(EXAMPLES), "--trace", str(trace)],
        capture_output=True, text=True, timeout=600,
    )
    if proc.returncode != 0:
        last = trace.read_text().splitlines()[-1:] if trace.exists() else []
        pytest.fail(f"the matrix ended with status {proc.returncode} (a negative status is a signal) at {last}:\n"
                    f"{proc.stderr[-3000:]}")
    result = json.loads(proc.stdout.splitlines()[-1])
    assert result["failures"] == []
    counts = result["counts"]
    total = {k: sum(c.get(k, 0) for c in counts.values()) for k in ("error", "correct", "other")}
    assert total["other"] == 0
    assert total["error"] > 500 and total["correct"] > 500, total
    # every public callable is exercised
    labels = " ".join(counts)
    for name in kronlin.__all__:
        if name == "jax_callback" and importlib.util.find_spec("jax") is None:
            continue  # JAX is in the test extra; without it the matrix leaves jax_callback out
        if callable(getattr(kronlin, name)):
            assert name in labels, f"{name} is not in the bad-input matrix"


def _call(fn, ref, bad):
    return badinput.classify(badinput.Call("t", "t", fn, ref, bad, 2.2e-16))


def test_classifier_can_fail():
    """The classifier is what the matrix relies on: it must call wrong results, vague errors and crashes-by-exception 'other'."""
    exact = lambda: (np.ones(3, dtype=np.longdouble), np.zeros(3, dtype=np.longdouble))  # noqa: E731
    assert _call(lambda: np.ones(3), exact, {})[0] == "correct"
    assert _call(lambda: np.ones(3) * (1 + 1e-9), exact, {})[0] == "other"  # wrong beyond the bound
    assert _call(lambda: np.array([1.0, np.nan, 1.0]), exact, {})[0] == "other"  # non-finite
    assert _call(lambda: np.ones(4), exact, {})[0] == "other"  # wrong shape

    def vague():
        raise ValueError("something went wrong")

    def clear():
        raise ValueError("A (shape (3, 3)) contains NaN or infinity")

    def other_type():
        raise AttributeError("'NoneType' object has no attribute 'shape'")

    assert _call(clear, exact, {"A": "nan"})[0] == "error"
    assert _call(vague, exact, {"A": "nan"})[0] == "other"  # does not name A
    assert _call(clear, exact, {})[0] == "other"  # an error on a well-posed input
    assert _call(other_type, exact, {"A": "none"})[0] == "other"
    assert not badinput._names("A_diag[0] must be a matrix", ["A"])  # "A" is not "A_diag"
    assert badinput._names("A_diag[0] must be a matrix", ["A_diag"])


def test_classifier_either_judges_what_it_lets_through():
    """Where the reference cannot answer to working accuracy (badinput.Either), an error naming the arguments
    and a backward-stable result are right; a result that is not backward stable, a vague error and an error
    naming another argument are not.  The problem: ``K = diag(1e-18, 1)`` (cond 1e18), ``K y = (1, 1)``."""
    K = np.diag(np.array([1e-18, 1.0], dtype=np.longdouble))
    x = np.ones((1, 2), dtype=np.longdouble)

    def to_rows(out):  # as the references' rhs(): a result of another shape is not rows of this problem
        if np.shape(out) != (2,):
            raise badinput.IllPosed("out")
        return np.asarray(out, np.longdouble).reshape(1, 2)

    judge = badinput._backward_judge(K, np.abs(K), x, to_rows, 2.2e-16)

    def ref():
        raise badinput.Either("A", judge=judge)

    def named():
        raise np.linalg.LinAlgError("A is singular to working precision")

    def other_name():
        raise ValueError("G is singular")

    assert _call(lambda: np.array([1e18, 1.0]), ref, {})[0] == "correct"
    assert _call(lambda: np.array([1e18 * (1 + 1e-15), 1.0]), ref, {})[0] == "correct"  # rounding of the first
    assert _call(lambda: np.array([1e18, 1.0 + 1e-6]), ref, {})[0] == "other"  # the well-determined part wrong
    assert _call(lambda: np.array([1e18, np.nan]), ref, {})[0] == "other"
    assert _call(lambda: np.ones(3), ref, {})[0] == "other"  # wrong shape
    assert _call(named, ref, {})[0] == "error"
    assert _call(other_name, ref, {})[0] == "other"
    want = (np.ones(2, dtype=np.longdouble), np.zeros(2, dtype=np.longdouble))

    def ref_want():
        raise badinput.Either("A", want=want)

    assert _call(lambda: np.ones(2), ref_want, {})[0] == "correct"
    assert _call(lambda: np.ones(2) * 1.1, ref_want, {})[0] == "other"
