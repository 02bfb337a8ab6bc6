"""The main job, ``python -m kronlin``, passes on small sizes and reports failures through its exit code."""

from __future__ import annotations

import io
import subprocess
import sys

from kronlin import _selfcheck


def test_selfcheck_small_sizes_pass():
    buf = io.StringIO()
    assert _selfcheck.run(sizes=((3, 2), (1, 4)), dtypes=("float64", "float32"), out=buf)
    text = buf.getvalue()
    assert "all" in text and "FAIL" not in text


def test_cli_quick_exit_code(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "kronlin", "--quick"], cwd=tmp_path, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "ok" in proc.stdout
