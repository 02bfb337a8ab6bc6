"""Test configuration: test the *installed* kronlin, on NumPy and on array-api-strict.

``python -m pytest`` from the repository root puts the root on ``sys.path``,
where the source tree's ``kronlin/`` has no compiled extension.  The root is
removed here, before anything imports kronlin, so the suite exercises the
installed package (a regular or an editable install).  The suite then refuses
to run without ``kronlin._C`` unless ``KRONLIN_DISABLE_EXT=1`` says that the
NumPy fallback is what is meant to be tested.
"""

from __future__ import annotations

import os
import sys

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != _ROOT]

import numpy as np  # noqa: E402
import pytest  # noqa: E402

import kronlin  # noqa: E402
from kronlin import _ext  # noqa: E402

if not _ext.ext_disabled_by_env and _ext.cpu() is None:
    raise pytest.UsageError(
        "kronlin._C cannot be imported (kronlin was imported from "
        f"{os.path.dirname(kronlin.__file__)}: {_ext.cpu_import_error}). Install the package first "
        "(pip install '.[test]' or an editable install), or set KRONLIN_DISABLE_EXT=1 to test the fallback."
    )


def _namespaces():
    out = [pytest.param(np, id="numpy")]
    try:
        import array_api_strict
    except ImportError:  # pragma: no cover - it is in the [test] extra
        out.append(pytest.param(None, id="array_api_strict", marks=pytest.mark.skip("array-api-strict missing")))
    else:
        out.append(pytest.param(array_api_strict, id="array_api_strict"))
    try:
        import cupy

        if cupy.cuda.runtime.getDeviceCount() > 0:
            out.append(pytest.param(cupy, id="cupy", marks=pytest.mark.cuda))
    except Exception:  # noqa: BLE001 - no CuPy or no device: the CuPy leg is simply absent
        pass
    return out


@pytest.fixture(params=_namespaces())
def xp(request):
    """The array namespace the core suite runs on."""
    return request.param


@pytest.fixture
def cpu_ext():
    """The compiled CPU extension; skips the test when it is disabled (KRONLIN_DISABLE_EXT=1)."""
    mod = _ext.cpu()
    if mod is None:
        pytest.skip("compiled CPU extension disabled (KRONLIN_DISABLE_EXT=1)")
    return mod


def pytest_report_header(config):
    return f"kronlin {kronlin.__version__} from {os.path.dirname(kronlin.__file__)}; {kronlin.extension_info()}"
