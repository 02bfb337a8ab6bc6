"""The main job, ``python -m kronlin``, passes on small sizes and reports failures through its exit code."""

from __future__ import annotations

import io
import re
import subprocess
import sys

from kronlin import _selfcheck


def test_selfcheck_small_sizes_pass():
    buf = io.StringIO()
    assert _selfcheck.run(sizes=((3, 2), (1, 4)), dtypes=("float64", "float32"), out=buf)
    text = buf.getvalue()
    assert re.search(r"^OK: all \d+ checks passed", text, flags=re.M) and "FAIL" not in text


def test_cli_quick_exit_code(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "kronlin", "--quick"], cwd=tmp_path, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert re.search(r"^OK: all \d+ checks passed", proc.stdout, flags=re.M), proc.stdout


def test_every_check_prints_a_row():
    buf = io.StringIO()
    assert _selfcheck.run(sizes=((2, 3),), dtypes=("float64",), out=buf)
    text = buf.getvalue()
    for label, _ in _selfcheck.CHECKS:
        assert f"{label} " in text, label


def test_a_wrong_result_fails_its_rows(monkeypatch):
    import kronlin

    solve = kronlin.solve_kron_sum
    # a solver that ignores the sign: every sign -1 row must fail, the +1 rows still pass
    def sign_ignored(A, B, C, D, V, sign=1, method="auto"):
        return solve(A, B, C, D, V, 1, method)

    monkeypatch.setattr(kronlin, "solve_kron_sum", sign_ignored)
    buf = io.StringIO()
    assert not _selfcheck.run(sizes=((3, 2),), dtypes=("float64",), out=buf)
    failed = {line.split("  ")[0] for line in buf.getvalue().splitlines() if line.endswith("FAIL")}
    assert failed == {f"solve_kron_sum({m}, -1)" for m in ("eig", "schur", "smith")} | {"solve_kron_sum(schur, gen)"}
