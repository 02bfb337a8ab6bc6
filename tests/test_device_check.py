"""The one-call GPU check (bench/device_check.sh) runs end to end on a machine without a GPU.

There it must skip every GPU step with one line saying so, run what it can, and
exit 0; on a GPU machine this test is skipped (the check itself is run there by
hand, in one device call, and its results are committed under bench/results/).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "bench", "device_check.sh")


def _has_gpu() -> bool:
    try:
        import cupy

        return cupy.cuda.runtime.getDeviceCount() > 0
    except Exception:  # noqa: BLE001 - no CuPy or no driver
        return False


@pytest.mark.skipif(shutil.which("bash") is None or shutil.which("timeout") is None, reason="needs bash and timeout")
@pytest.mark.skipif(_has_gpu(), reason="a GPU is present: run bench/device_check.sh itself")
def test_device_check_skips_gpu_steps_without_a_gpu(tmp_path):
    env = dict(os.environ, KRONLIN_CHECK_INSTALL="0", PYTHON=sys.executable,
               # the suite step runs a small selection: this test is itself part of the suite
               KRONLIN_CHECK_SUITE_ARGS='tests/test_kernels.py -k "dispatch"')
    res = subprocess.run(["bash", SCRIPT, str(tmp_path)], capture_output=True, text=True, env=env, timeout=300,
                         cwd=ROOT)
    out = res.stdout + res.stderr
    assert res.returncode == 0, out
    assert "no CUDA device: skipping the GPU steps" in out
    assert "suite: passed" in out and "suite: ran without a GPU" in out
    assert "sanitizer: skipped (no CUDA device)" in out
    assert "device_check timings: skipped" in out and "timings=skipped (no CUDA device)" in out
    assert (tmp_path / "device-check.log").exists()
    assert not list(tmp_path.glob("gpu-*.json"))  # no GPU, no GPU record
