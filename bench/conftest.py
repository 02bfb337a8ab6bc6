"""Session set-up of the kronlin benchmark harness (docs/design.md §6).

Run from the repository root (see ``bench/README.md``)::

    python -m pytest bench -p no:cacheprovider --benchmark-enable \
        --benchmark-json=bench/results/all.json && python bench/report.py bench/results/all.json

What this file guarantees for every benchmark in ``bench/``:

* the *installed* kronlin (with its compiled ``kronlin._C``) is benchmarked,
  never the bare source tree ``kronlin/`` next to this directory, which has no
  compiled module: the repository root is removed from ``sys.path`` before
  kronlin is imported, and the session fails loudly when the CPU extension is
  missing (unless ``KRONLIN_DISABLE_EXT=1`` asks for the NumPy reference).  An
  editable install (``pip install -e``: Python files from the source tree,
  ``_C`` from site-packages) is accepted and recorded as such;
* BLAS (every OpenBLAS loaded by NumPy and SciPy) and OpenMP (kronlin's own
  kernels) run on one thread for the whole session, through
  ``threadpoolctl.threadpool_limits(1)``; the session fails if any pool is not
  at one thread afterwards;
* the benchmark JSON's ``machine_info`` carries a ``kronlin_bench`` record:
  the thread pools as threadpoolctl sees them (OpenBLAS ``internal_api``,
  ``architecture`` i.e. the kernel it dispatched to, ``num_threads``),
  ``OPENBLAS_CORETYPE``, ``kronlin.extension_info()``, the CPU model and the
  NumPy/SciPy versions, so ``bench/report.py`` can print them beside the numbers.
"""

from __future__ import annotations

import os
import platform
import sys
from pathlib import Path

import pytest

BENCH_DIR = Path(__file__).resolve().parent
REPO_ROOT = BENCH_DIR.parent
THREADS = 1


# -- 1. make sure the installed kronlin is the one imported -------------------
def _is_repo_root(entry: str) -> bool:
    try:
        return Path(entry or os.getcwd()).resolve() == REPO_ROOT
    except OSError:
        return False


sys.path[:] = [p for p in sys.path if not _is_repo_root(p)]
_pre = sys.modules.get("kronlin")
if _pre is not None and not _pre.extension_info()["cpu_extension"] and Path(
    getattr(_pre, "__file__", "") or "/"
).resolve().is_relative_to(REPO_ROOT / "kronlin"):
    # The source tree (no compiled module) was imported before this conftest ran: forget it.
    for _name in [m for m in sys.modules if m == "kronlin" or m.startswith("kronlin.")]:
        del sys.modules[_name]

import numpy as np  # noqa: E402
import scipy  # noqa: E402
import scipy.linalg  # noqa: E402,F401  (loads SciPy's OpenBLAS before the limits are set)
import threadpoolctl  # noqa: E402

import kronlin  # noqa: E402
from kronlin import kernels  # noqa: E402

KRONLIN_FILE = Path(kronlin.__file__).resolve()
EXT_DISABLED_BY_ENV = kernels.DISABLED_BY_ENV
_LOADED = kernels.load_info()

# An editable install (scikit-build-core's redirecting finder) serves the Python
# files from the source tree and the compiled modules from site-packages: that
# is fine as long as the compiled module is there, which the check below asserts.
KRONLIN_C_FILE = _LOADED["cpu_file"]
KRONLIN_EDITABLE = KRONLIN_FILE.is_relative_to(REPO_ROOT / "kronlin")

if kernels.compiled(np) is None and not EXT_DISABLED_BY_ENV:
    raise RuntimeError(
        f"bench/conftest.py: kronlin's CPU extension kronlin._C is not available "
        f"(import error: {_LOADED['cpu_import_error']!r}; kronlin from {KRONLIN_FILE}). "
        f"Run pytest from the repository root as `python -m pytest bench ...` after "
        f"`pip install --no-build-isolation .`, or set KRONLIN_DISABLE_EXT=1 "
        f"to benchmark the NumPy reference on purpose."
    )


# -- 2. one thread for BLAS and OpenMP, for the whole session ----------------
_state: dict = {}


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _loadavg():
    try:
        return list(os.getloadavg())
    except OSError:
        return None


def pytest_configure(config):
    _state["loadavg_at_start"] = _loadavg()
    limiter = threadpoolctl.threadpool_limits(limits=THREADS)
    _state["limiter"] = limiter
    info = threadpoolctl.threadpool_info()
    _state["threadpool_info"] = info
    _state["openmp_max_threads"] = kernels.openmp_max_threads()
    bad = [(d.get("internal_api"), d.get("filepath"), d.get("num_threads")) for d in info
           if d.get("num_threads") != THREADS]
    if bad:
        raise RuntimeError(f"bench/conftest.py: thread pools not pinned to {THREADS} thread(s): {bad}")
    if not any(d.get("user_api") == "blas" for d in info):
        raise RuntimeError("bench/conftest.py: threadpoolctl found no BLAS library to pin")
    if _state["openmp_max_threads"] not in (None, THREADS):
        raise RuntimeError(
            f"bench/conftest.py: kronlin._C reports omp_get_max_threads() = {_state['openmp_max_threads']} "
            f"after threadpool_limits({THREADS})"
        )


def pytest_unconfigure(config):
    limiter = _state.pop("limiter", None)
    if limiter is not None:
        limiter.restore_original_limits()


def _blas_summary(info) -> list[str]:
    out = []
    for d in info:
        out.append(
            f"{d.get('user_api')}/{d.get('internal_api')} {d.get('version')} "
            f"arch={d.get('architecture', '-')} threads={d.get('num_threads')} "
            f"({Path(d.get('filepath', '?')).name})"
        )
    return out


def pytest_report_header(config):
    lines = [
        f"kronlin bench: BLAS and OpenMP threads pinned to {THREADS} for the whole session "
        f"(threadpoolctl.threadpool_limits({THREADS}))",
        f"kronlin bench: kronlin {kronlin.__version__} from {KRONLIN_FILE.parent}"
        + (" (editable install: Python files from the source tree)" if KRONLIN_EDITABLE else "")
        + f"; kronlin._C from {KRONLIN_C_FILE}",
        f"kronlin bench: extension_info = {kronlin.extension_info()}"
        + (" [KRONLIN_DISABLE_EXT set: NumPy reference kernels]" if EXT_DISABLED_BY_ENV else ""),
        f"kronlin bench: OPENBLAS_CORETYPE = {os.environ.get('OPENBLAS_CORETYPE')!r}; CPU = {_cpu_model()}; "
        f"numpy {np.__version__}, scipy {scipy.__version__}",
    ]
    lines += [f"kronlin bench: pool {s}" for s in _blas_summary(_state.get("threadpool_info", []))]
    if config.getoption("benchmark_disable", False) and not config.getoption("benchmark_enable", False):
        lines.append(
            "kronlin bench: WARNING benchmarks are DISABLED (pyproject addopts has --benchmark-disable); "
            "pass --benchmark-enable to time them"
        )
    return lines


@pytest.hookimpl(optionalhook=True)
def pytest_benchmark_update_machine_info(config, machine_info):
    machine_info["kronlin_bench"] = {
        "threads_pinned": THREADS,
        "pinned_with": f"threadpoolctl.threadpool_limits({THREADS})",
        "threadpool_info": _state.get("threadpool_info", threadpoolctl.threadpool_info()),
        "threadpool_info_at_save": threadpoolctl.threadpool_info(),
        "openmp_max_threads": _state.get("openmp_max_threads"),
        "OPENBLAS_CORETYPE": os.environ.get("OPENBLAS_CORETYPE"),
        "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS"),
        "OPENBLAS_NUM_THREADS": os.environ.get("OPENBLAS_NUM_THREADS"),
        "KRONLIN_DISABLE_EXT": os.environ.get("KRONLIN_DISABLE_EXT"),
        "kronlin_version": kronlin.__version__,
        "kronlin_file": str(KRONLIN_FILE),
        "kronlin_C_file": KRONLIN_C_FILE,
        "kronlin_editable_install": KRONLIN_EDITABLE,
        "extension_info": kronlin.extension_info(),
        "numpy": np.__version__,
        "scipy": scipy.__version__,
        "threadpoolctl": threadpoolctl.__version__,
        "python": sys.version.split()[0],
        "cpu_model": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "nice": os.nice(0),
        # Other work on the machine skews single-thread timings: a 1-minute load
        # average well above 1 (this process) at the end means the run was shared.
        "loadavg_at_start": _state.get("loadavg_at_start"),
        "loadavg_at_save": _loadavg(),
    }
