"""The training tests run small matrices: one BLAS thread is much faster than threads fighting for cores."""

from __future__ import annotations

import pytest
from threadpoolctl import threadpool_limits


@pytest.fixture(autouse=True, scope="session")
def _one_blas_thread():
    with threadpool_limits(1):
        yield


@pytest.fixture(scope="session")
def tasks():
    """The digits tasks the optimizer tests train on (loaded once per session)."""
    from kronlin.train import load_task

    return {name: load_task(name) for name in ("digits-clf", "digits-ae", "digits-conv")}
