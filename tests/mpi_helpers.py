"""Launching MPI runs from the tests: find mpiexec, a clean environment, and runs that can never hang."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

# launcher variables of an enclosing MPI job must not leak into the ones the tests start
from kronlin.train.distributed import _LAUNCHER_VARS

__all__ = ["MPIEXEC", "needs_mpi", "mpi_env", "run_killable"]


def _mpiexec():
    try:
        from mpi4py import MPI  # noqa: F401
    except ImportError as exc:  # pragma: no cover - the [test] extra installs it
        return None, f"mpi4py not importable ({exc}); pip install '.[mpi]'"
    here = Path(sys.executable).parent / "mpiexec"  # the mpich wheel's launcher, matching mpi4py's MPI
    exe = str(here) if here.exists() else shutil.which("mpiexec")
    if exe is None:  # pragma: no cover
        return None, "no mpiexec on PATH; pip install '.[mpi]' (the mpich wheel provides it)"
    return exe, None


MPIEXEC, _WHY = _mpiexec()
needs_mpi = pytest.mark.skipif(MPIEXEC is None, reason=_WHY or "")


def mpi_env(**extra) -> dict:
    """The environment for an MPI run: one BLAS thread per rank, no enclosing job's launcher variables."""
    env = {k: v for k, v in os.environ.items() if k not in _LAUNCHER_VARS}
    env.update(OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1", MKL_NUM_THREADS="1", **extra)
    return env


def run_killable(cmd, timeout: float, cwd=None, env=None) -> tuple[int, str]:
    """Run ``cmd`` in its own process group; on timeout kill the whole group and fail. ``(returncode, output)``."""
    proc = subprocess.Popen([str(c) for c in cmd], cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, env=env or mpi_env(), start_new_session=True)  # fmt: skip
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        pytest.fail(f"{' '.join(map(str, cmd))} did not finish within {timeout} s (a hang); output:\n{out[-3000:]}")
    return proc.returncode, out
