"""Data-parallel training over MPI: each global batch split over the ranks, the single-process steps on every rank.

``mpiexec -n R python -m kronlin.train --task ... --opt kfac --distributed ...``
(see :mod:`kronlin.train.cli`).  Every rank builds the same network, optimizer
and batch sampler from the same seeds and draws the same *global* batch
indices; :meth:`DataParallel.shard` gives rank ``r`` the contiguous rows
``[lo_r, hi_r)`` (``np.array_split`` sizes: uneven splits allowed, each rank at
least one example).  Each rank then computes only its shard's per-example
quantities, and every batch reduction of the optimizer — the mean loss, the
mean gradient, the factor statistics, the Fisher/Gauss-Newton products of the
quadratic model, the finiteness checks — is a sum over the local shard
followed by one packed ``Allreduce`` and the division by the *global* batch
size.  All optimizer state (λ, γ, factors, inverses, momentum, generator) is
therefore identical on every rank and equals the single-process state up to
the order of the additions (a few ulps per step).

Randomness: targets sampled from the model (K-FAC §5) are drawn for the whole
global batch from the optimizer's generator (same on every rank) and each
rank keeps its rows, so the draws are those of the single-process run.

Inversions (K-FAC §8's refresh, KFRA/KFLR's, FOOF's ``(Σ + λI)⁻¹``) are not
repeated on every rank: :meth:`DataParallel.kfac` gives the optimizers a
:class:`kronlin.distributed.DistributedKFAC`, which assigns each layer's
inversion (or eigendecomposition, for exact damping) to one rank by the cost
model and shares the results per the placement ``grad_worker_fraction``
(KAISA's: 1 = communication-optimal, every rank receives every layer's
inverse; ``1/R`` = memory-optimal, the owner preconditions its layers and
broadcasts the step; between: ``R·fraction`` ranks per layer).  The
block-tridiagonal inverse of ``kfac-tridiag`` is sharded the same way by
:meth:`DataParallel.tridiag`: each of its set-ups (a pair of layers' ``Ψ`` and
``Σ_{i|i+1}``, the last layer's inverse) is made on one rank chosen by the
cost model, and every rank receives all of them (the operator couples
neighbouring layers, so it is always placed communication-optimally).

NGD's Woodbury Gram couples every pair of examples of the batch; each rank
all-gathers the per-example activations and errors (``(N, d)`` per layer) and
builds the same global :class:`kronlin.WoodburyFisher` (the gradient is still
computed on the shards and all-reduced).

The optimizers call these reductions through the hooks of
:class:`kronlin.train.optim.base.Optimizer` (``_loss_and_grads``, ``_value``,
``_sample``, ``_sums``, ``_all``); with ``opt.dp = None`` (one process) those
hooks run the original single-process code, unchanged.
"""

from __future__ import annotations

import os

import numpy as np

from ..distributed._comm import wait

__all__ = ["DataParallel", "launched_by_mpiexec"]

#: environment variables set by MPI launchers (MPICH/Hydra, Open MPI, PMIx, Slurm)
_LAUNCHER_VARS = ("PMI_RANK", "PMI_SIZE", "PMIX_RANK", "OMPI_COMM_WORLD_SIZE", "MPI_LOCALNRANKS", "SLURM_PROCID")


def launched_by_mpiexec() -> bool:
    """Whether this process was started by an MPI launcher (``mpiexec``/``srun``)."""
    return any(v in os.environ for v in _LAUNCHER_VARS)


def split_bounds(N: int, size: int, rank: int) -> tuple[int, int]:
    """Rows ``[lo, hi)`` of rank ``rank`` when ``N`` examples are split over ``size`` ranks (``np.array_split`` sizes)."""
    base, extra = divmod(int(N), int(size))
    lo = rank * base + min(rank, extra)
    return lo, lo + base + (1 if rank < extra else 0)


class DataParallel:
    """This rank's view of a data-parallel batch, and the reductions the optimizers need.

    Parameters
    ----------
    comm : mpi4py communicator (``MPI.COMM_WORLD``)
    grad_worker_fraction : float
        KAISA's placement of the sharded inversions (see the module docstring):
        1 (communication-optimal), ``1/size`` (memory-optimal) or ``k/size``
        with ``k`` dividing ``size``.
    """

    def __init__(self, comm, grad_worker_fraction: float = 1.0):
        from ..distributed._comm import mpi

        self.MPI = mpi()
        self.comm = comm
        self.rank, self.size = comm.Get_rank(), comm.Get_size()
        self.n = None  # the global batch size of the current step
        self.lo = self.hi = None
        self._reducers = {}
        self._kfacs = {}  # the sharded preconditioners, by layer shapes and configuration (kfac())
        self.set_placement(grad_worker_fraction)

    def set_placement(self, grad_worker_fraction: float) -> None:
        """Set the placement of the sharded inversions (before the first step; ``ValueError`` if invalid)."""
        from ..distributed import grad_workers

        if self._kfacs:
            raise RuntimeError("set_placement must be called before the first refresh")
        grad_workers(self.size, grad_worker_fraction)  # a usage error now, not at the first refresh
        self.grad_worker_fraction = float(grad_worker_fraction)

    # ------------------------------------------------------------ batch split
    def shard(self, X, Y):
        """This rank's rows of the global batch ``(X, Y)`` (the same on every rank)."""
        N = len(X)
        if N < self.size:
            raise ValueError(f"--distributed: the batch ({N} examples) must have at least one example per rank "
                             f"({self.size} ranks)")  # fmt: skip
        self.n = N
        self.lo, self.hi = split_bounds(N, self.size, self.rank)
        return X[self.lo : self.hi], Y[self.lo : self.hi]

    # ------------------------------------------------------------- reductions
    def sums(self, values) -> list:
        """``Σ_ranks`` of each array/scalar in ``values`` (float64), in one packed ``Allreduce``."""
        arrs = [np.asarray(v, dtype=np.float64) for v in values]
        buf = np.concatenate([a.reshape(-1) for a in arrs]) if arrs else np.zeros(0)
        buf = np.ascontiguousarray(buf)
        wait(self.comm.Iallreduce(self.MPI.IN_PLACE, buf, op=self.MPI.SUM))
        out, pos = [], 0
        for a in arrs:
            out.append(buf[pos : pos + a.size].reshape(a.shape) if a.ndim else buf[pos])
            pos += a.size
        return out

    def all(self, flag: bool) -> bool:
        """Whether ``flag`` holds on every rank (one 8-byte ``Allreduce``)."""
        buf = np.array([1 if flag else 0], dtype=np.int64)
        wait(self.comm.Iallreduce(self.MPI.IN_PLACE, buf, op=self.MPI.MIN))
        return bool(buf[0])

    def _count(self, total):
        """The global batch size from the summed per-rank counts (checked against :meth:`shard`'s)."""
        N = int(round(float(total)))
        if self.n is not None and N != self.n:  # pragma: no cover - a caller bypassed shard()
            raise RuntimeError(f"the ranks hold {N} examples, not the global batch of {self.n}")
        self.n = N
        return N

    def loss_and_grads(self, net, loss, X, Y):
        """:meth:`Net.loss_and_grads` of the global batch, from this rank's shard ``(X, Y)``."""
        trace = net.forward(X)
        per = loss.per_example(trace.out, Y)
        g = net.backward(trace, loss.grad(trace.out, Y))
        trace.g = g
        out = self.sums([float(trace.N), np.sum(per)] + net.weight_grads(trace, g))
        N = self._count(out[0])
        return float(out[1] / N), [G / N for G in out[2:]], trace

    def value(self, loss, out, Y) -> float:
        """``loss.value`` of the global batch from this rank's outputs."""
        s = self.sums([float(len(out)), np.sum(loss.per_example(out, Y))])
        return float(s[1] / self._count(s[0]))

    def sample(self, loss, out, rng):
        """``loss.sample`` for the global batch (the single-process draws), this rank's rows."""
        if self.n is None or self.hi - self.lo != len(out):
            raise RuntimeError("DataParallel.sample needs this rank's shard of the current global batch (shard())")
        full = np.zeros((self.n,) + tuple(out.shape[1:]), dtype=out.dtype)
        full[self.lo : self.hi] = out
        return loss.sample(full, rng)[self.lo : self.hi]

    def factors(self, acts, errs, tridiagonal: bool) -> dict:
        """The batch factors (``kronlin.batch_factors``, ``append_one=False``) of the global batch."""
        from ..distributed import FactorReducer

        key = bool(tridiagonal)
        if key not in self._reducers:
            self._reducers[key] = FactorReducer(self.comm, append_one=False, tridiagonal=key)
        return self._reducers[key].reduce(acts, errs)

    def fold_factors(self, estimator, acts, errs, tridiagonal: bool) -> None:
        """Fold the global batch's factors (:meth:`factors`) into ``estimator``'s running averages, in place
        (the one :class:`kronlin.FactorEstimator` of all the optimizer's layers)."""
        from ..distributed.estimator import fold_batch

        fold_batch(estimator, self.factors(acts, errs, tridiagonal))

    def kfac(self, shapes, damping: str = "factored", second_factor: bool = True):
        """The :class:`kronlin.distributed.DistributedKFAC` for these layer shapes (one per configuration).

        Created at the first call (a collective: every rank calls it at the
        same point of the same step) with this run's ``grad_worker_fraction``.
        """
        from ..distributed import DistributedKFAC

        key = (tuple(tuple(int(n) for n in s) for s in shapes), damping, bool(second_factor))
        if key not in self._kfacs:
            self._kfacs[key] = DistributedKFAC(self.comm, key[0], damping=damping, second_factor=second_factor,
                                               grad_worker_fraction=self.grad_worker_fraction)  # fmt: skip
        return self._kfacs[key]

    def tridiag(self, shapes, method: str = "eig"):
        """The :class:`kronlin.distributed.DistributedTridiag` for these layer shapes (one per configuration).

        Created at the first call (a collective, like :meth:`kfac`); kept with
        the sharded preconditioners under the key ``(shapes, "tridiag", method)``.
        """
        from ..distributed import DistributedTridiag

        key = (tuple(tuple(int(n) for n in s) for s in shapes), "tridiag", method)
        if key not in self._kfacs:
            self._kfacs[key] = DistributedTridiag(self.comm, key[0], method=method)
        return self._kfacs[key]

    def gather_rows(self, arrays, axis: int = 0) -> list:
        """Each array concatenated over the ranks, in rank order, along ``axis`` (the example axis)."""
        parts = self.comm.allgather([np.ascontiguousarray(a) for a in arrays])
        return [np.concatenate([p[k] for p in parts], axis=axis) for k in range(len(arrays))]

    # ---------------------------------------------------------- checkpoints
    def bcast(self, obj, root: int = 0):
        return self.comm.bcast(obj, root=root)

    def abort(self, message: str, code: int = 1):  # pragma: no cover - ends the process
        import sys
        import time

        sys.stderr.write(f"[rank {self.rank} of {self.size}] {message}; aborting all ranks\n")
        sys.stderr.flush()
        # the launcher forwards this rank's stderr through a pipe; Abort kills every rank at once, and on a
        # loaded machine the message was once lost with it (1 run in ~20): give the forwarder a moment
        time.sleep(0.2)
        self.comm.Abort(code)
