"""Timing of the self-check's rows: the median of repeated calls after a warm-up."""

from __future__ import annotations

import time
from typing import Callable, Optional

import numpy as np

__all__ = ["median_time", "fmt_time"]


def median_time(fn: Callable[[], object], repeats: int = 5, min_repeats: int = 3, budget: float = 0.1) -> float:
    """Median wall time of ``fn()`` in seconds (``time.perf_counter``), after a warm-up.

    ``fn`` has already been called once (the checked call, which also warms
    caches and lazy imports); one more call, timed only to size the loop, is
    a second warm-up.  Calls shorter than a millisecond are then looped so
    that each measurement spans about 1 ms, and at least ``min_repeats`` and
    at most ``repeats`` measurements are taken, stopping early once
    ``budget`` seconds are spent; the median is returned, so one measurement
    disturbed by other work on the machine does not decide the row.  A call
    longer than ``budget`` is measured once (after the checked call as its
    warm-up).  Every timed kronlin call starts from the raw factors
    (``Kron(A, G)...``), so construction and any factorization are included:
    kronlin caches factorizations on an operator, and the dense solve
    refactors every time.  :func:`run` pins BLAS/OpenMP threads while timing.
    """
    t0 = time.perf_counter()
    fn()
    first = time.perf_counter() - t0
    if first > budget:
        return first
    number = 1 if first >= 1e-3 else min(1000, max(1, int(1e-3 / max(first, 1e-7))))
    times: list[float] = []
    spent = first
    while len(times) < repeats and (len(times) < min_repeats or spent < budget):
        t0 = time.perf_counter()
        for _ in range(number):
            fn()
        dt = time.perf_counter() - t0
        times.append(dt / number)
        spent += dt
    return float(np.median(times))


def fmt_time(t: Optional[float]) -> str:
    if t is None:
        return "-"
    if t < 1e-3:
        return f"{t * 1e6:.1f} us"
    if t < 1.0:
        return f"{t * 1e3:.2f} ms"
    return f"{t:.2f} s"
