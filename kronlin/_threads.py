"""The BLAS/OpenMP thread count of kronlin's command-line tools (``--threads``).

``python -m kronlin`` and ``python -m kronlin.train`` work on small matrices
(at most a few hundred rows): there a second BLAS thread gains little on an
idle machine and, on a machine whose cores are busy, costs a lot — on a
2-core machine shared with other work, ``python -m kronlin --quick`` took
15–21 s with the BLAS default and 2 s with one thread, 100 K-FAC iterations
31–54 s against 2 s.  So both tools pin BLAS and OpenMP to
:data:`DEFAULT_THREADS` (one) unless ``--threads N`` says otherwise
(``--threads 0``: leave the libraries' own default).  Pinning goes through
threadpoolctl (in the ``train``, ``test`` and ``bench`` extras); without it
the tools say so and run unpinned.
"""

from __future__ import annotations

import contextlib

__all__ = ["DEFAULT_THREADS", "thread_limit", "load_thread_pools"]

#: Threads used when ``--threads`` is not given.
DEFAULT_THREADS = 1


def load_thread_pools() -> None:
    """Load the thread pools kronlin computes in: SciPy's own OpenBLAS (the decompositions) and kronlin's
    OpenMP runtime (the compiled kernels).

    threadpoolctl limits only the pools loaded when a limit is set, and these load lazily on first use; the
    entry points whose users pin threads themselves (:mod:`kronlin.torch`, :mod:`kronlin.distributed`) call this
    at import, so ``threadpool_limits(1)`` set afterwards covers them.  An unpinned second OpenBLAS pool on a
    busy 2-core machine made refreshes up to 10x slower (4.7 ms against 0.45 ms per 256² float32 ``potrf``).
    """
    import scipy.linalg  # noqa: F401  (loads SciPy's BLAS)

    from . import _ext

    _ext.cpu()  # loads kronlin._C and its OpenMP runtime


def thread_limit(n: int, *, required: bool):
    """``(context manager, description)`` limiting BLAS and OpenMP to ``n`` threads (``0``: no limit).

    Libraries load lazily; the ones that matter (NumPy's and SciPy's BLAS,
    kronlin's OpenMP runtime) are loaded here first, so that the limit covers
    them.  Without threadpoolctl, ``required=True`` (an explicit ``--threads``)
    raises ``RuntimeError``; otherwise the context does nothing and the
    description says why.
    """
    n = int(n)
    if n < 0:
        raise ValueError(f"--threads must be >= 0 (0: the BLAS default); got {n}")
    if n == 0:
        return contextlib.nullcontext(), "threads: BLAS/OpenMP default (not pinned)"
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        if required:
            raise RuntimeError("--threads needs threadpoolctl: pip install threadpoolctl") from None
        return contextlib.nullcontext(), "threads: not pinned (pip install threadpoolctl to pin BLAS to 1 thread)"
    load_thread_pools()
    return threadpool_limits(limits=n), f"threads: BLAS/OpenMP pinned to {n}"
