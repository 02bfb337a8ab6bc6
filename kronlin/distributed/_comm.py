"""MPI plumbing: the lazy mpi4py import, buffers, symmetric packing, check-ins and the byte log.

Nothing here imports mpi4py at module import time, so ``kronlin.distributed``'s
pure parts (packing, the cost model, the assignment) work without MPI; the
first call that needs a communicator imports it and says how to install it.
"""

from __future__ import annotations

import functools
import os
import sys
import traceback
from contextlib import contextmanager

import numpy as np

from .._backend import is_numpy, to_numpy

__all__ = ["RankError", "CommLog", "pack_symmetric", "unpack_symmetric", "guard", "install_abort_hook"]


def mpi():
    """The ``mpi4py.MPI`` module, or an ImportError naming the extra that installs it."""
    try:
        from mpi4py import MPI
    except ImportError as exc:  # pragma: no cover - the [mpi] / [test] extras install it
        raise ImportError(
            "kronlin.distributed needs mpi4py and an MPI library: pip install \".[mpi]\" in the kronlin "
            f"source folder (mpi4py + the mpich wheel); import failed with: {exc}"
        ) from None
    return MPI


class RankError(RuntimeError):
    """Raised on *every* rank when local work failed on one or more ranks.

    ``failures`` maps each failing rank to its ``"ExceptionType: message"``.
    Every rank raises it after the same collective, so no rank is left waiting
    in a collective that the failing rank will never reach.
    """

    def __init__(self, where: str, size: int, failures: dict):
        self.where, self.failures = where, dict(failures)
        lines = "; ".join(f"rank {r}: {m}" for r, m in sorted(self.failures.items()))
        super().__init__(
            f"{where} failed on {len(self.failures)} of {size} ranks ({lines}); "
            f"every rank raises this error instead of waiting in a collective"
        )

    def only(self, *names) -> bool:
        """Whether every failing rank raised an exception whose type is named in ``names`` (e.g. ``"LinAlgError"``)."""
        return all(m.split(":", 1)[0] in names for m in self.failures.values())


def _describe(exc) -> str:
    return f"{type(exc).__name__}: {exc}"


def checkin(comm, exc, where: str, log=None) -> None:
    """One small collective after local work: raise :class:`RankError` everywhere if any rank failed.

    The common path is an 8-byte ``Allreduce(MAX)`` of an error flag; only
    when some rank failed is a second collective (an ``allgather`` of the
    messages) run, by every rank, so the collective order stays the same on
    all ranks.
    """
    MPI = mpi()
    flag = np.array([0 if exc is None else 1], dtype=np.int64)
    wait(comm.Iallreduce(MPI.IN_PLACE, flag, op=MPI.MAX))
    if log is not None:
        log.add("checkin", flag.nbytes)
    if flag[0]:
        raise_failures(comm, exc, where)


def wait(request) -> None:
    """Complete a non-blocking collective, yielding the core while waiting.

    MPICH's blocking collectives busy-poll: a rank that arrives early spins at
    full speed, which on a machine with fewer free cores than ranks takes
    the core from the rank it is waiting for.  Polling ``Test`` with
    ``sched_yield`` in between lets the late rank run; on an idle machine the
    yield returns at once.
    """
    while not request.Test():
        os.sched_yield()


def raise_failures(comm, exc, where: str):
    """Every rank learns every failing rank's message, then raises :class:`RankError` (chained locally)."""
    msgs = comm.allgather(None if exc is None else _describe(exc))
    failures = {r: m for r, m in enumerate(msgs) if m is not None}
    raise RankError(where, comm.Get_size(), failures) from exc


@contextmanager
def guard(comm, where: str = "local work", log=None):
    """Run local work; afterwards every rank checks in, and all raise :class:`RankError` if any failed.

    Use it around rank-local code that precedes a collective (K-FAC's
    inversions before their broadcast, a user's forward/backward pass before
    the statistics' all-reduce)::

        with kronlin.distributed.guard(comm, "forward/backward"):
            acts, grads = net.forward_backward(x_local)
        est.update(acts, grads)          # every rank gets here, or every rank has raised
    """
    exc = None
    try:
        yield
    except Exception as e:  # noqa: BLE001 - re-raised below, on every rank
        exc = e
    checkin(comm, exc, where, log)


def install_abort_hook(comm=None):
    """Make an uncaught exception on any rank print its traceback and ``Abort`` the communicator.

    For failures outside :func:`guard`-ed code: without it, the other ranks
    would wait forever in their next collective.  Equivalent to running the
    script with ``python -m mpi4py script.py``.
    """
    MPI = mpi()
    comm = MPI.COMM_WORLD if comm is None else comm

    def hook(tp, value, tb):
        sys.stderr.write(f"[rank {comm.Get_rank()} of {comm.Get_size()}] uncaught exception, aborting all ranks:\n")
        traceback.print_exception(tp, value, tb, file=sys.stderr)
        sys.stderr.flush()
        comm.Abort(1)

    sys.excepthook = hook
    return hook


class CommLog:
    """Payload bytes this rank passed to each kind of collective (one entry per call).

    The kinds are ``"factor_allreduce"``, ``"grad_allreduce"``,
    ``"inverse_bcast"``, ``"step_bcast"``, ``"checkin"`` and ``"meta"``.  A
    broadcast's payload is counted by every rank that takes part (root and
    receivers) with the same size; :meth:`per_kind` sums them.
    """

    def __init__(self):
        self.entries = []

    def add(self, kind: str, nbytes: int) -> None:
        self.entries.append((kind, int(nbytes)))

    def per_kind(self) -> dict:
        out = {}
        for kind, n in self.entries:
            out[kind] = out.get(kind, 0) + n
        return out

    def clear(self) -> None:
        self.entries.clear()


# ------------------------------------------------------------------ buffers
def host(buf):
    """A buffer MPI can read: NumPy arrays as they are, anything else staged through host memory."""
    if isinstance(buf, np.ndarray):
        return np.ascontiguousarray(buf)
    return np.ascontiguousarray(to_numpy(buf))


def back(xp, arr, like):
    """``arr`` (NumPy) in the namespace of ``like`` (a no-op for NumPy)."""
    if is_numpy(xp):
        return arr
    dev = None if like is None else getattr(like, "device", None)
    return xp.asarray(arr, device=dev) if dev is not None else xp.asarray(arr)


# --------------------------------------------------------- symmetric packing
@functools.lru_cache(maxsize=256)
def _tri(n: int):
    """Row-major positions of the upper triangle of an n×n matrix, and the triangle slot of every entry."""
    i, j = np.triu_indices(n)
    flat = (i * n + j).astype(np.int64)
    full = np.empty((n, n), dtype=np.int64)
    slots = np.arange(i.size, dtype=np.int64)
    full[i, j] = slots
    full[j, i] = slots
    return flat, full.reshape(-1)


def tri_size(n: int) -> int:
    return n * (n + 1) // 2


def pack_symmetric(xp, M):
    """The upper triangle of a symmetric ``(n, n)`` matrix as a flat ``(n(n+1)/2,)`` array (rows first)."""
    n = int(M.shape[-1])
    flat, _ = _tri(n)
    return xp.take(xp.reshape(M, (n * n,)), xp.asarray(flat) if not is_numpy(xp) else flat)


def unpack_symmetric(xp, v, n: int):
    """The exactly symmetric ``(n, n)`` matrix whose upper triangle is ``v`` (inverse of :func:`pack_symmetric`)."""
    _, full = _tri(int(n))
    return xp.reshape(xp.take(v, xp.asarray(full) if not is_numpy(xp) else full), (n, n))
