"""Distributed K-FAC over MPI (mpi4py): data-parallel statistics, layer-sharded inversions.

``pip install ".[mpi]"`` (in the kronlin source folder) installs mpi4py and an MPI (the ``mpich``
wheel); ``import kronlin`` never imports this package or mpi4py, and this
package imports mpi4py only when a communicator is used.

Pieces, each usable on its own (K-FAC section numbers refer to Martens &
Grosse 2015; the placements follow KAISA, Pauloski et al., SC'21):

* :class:`DistributedFactorEstimator` / :func:`allreduce_factors` — every rank's
  batch statistics (dense and weight-sharing layers, diagonal and cross-layer
  factors, K-FAC §3, §5) reduced into the statistics of the concatenated batch
  in one packed ``Allreduce`` (symmetric factors as upper triangles), weighted
  by each rank's number of examples;
* :func:`allreduce_mean` — the example-weighted gradient all-reduce;
* :class:`DistributedKFAC` — each layer's inversion (§4.2, §6.3; or the
  eigenbasis for exact damping) on one rank chosen by a cost model
  (:func:`assign`, greedy LPT), placed communication-optimally,
  memory-optimally, or between (``grad_worker_fraction``);
* :func:`guard`, :class:`RankError`, :func:`install_abort_hook` — a failure on
  one rank ends every rank with the failing rank's message, never a hang.

* :class:`DistributedTridiag` — the block-tridiagonal inverse (§4.3): each of
  its ``ℓ`` independent set-ups (a pair of layers' ``Ψ`` and Stein set-up of
  ``Σ_{i|i+1}``, the last layer's inverse; :func:`kronlin.tridiag.tridiag_parts`)
  made on one rank chosen by the cost model (:func:`tridiag_costs`, LPT),
  exchanged in one ``allgather`` and assembled on every rank
  (:meth:`kronlin.BlockTridiagInverse.from_parts`, bit-identical to the
  single-process operator); :meth:`DistributedFactorEstimator.block_tridiag_inverse`
  uses it.

``kronlin.train --distributed`` uses :class:`DistributedKFAC` for every
block-diagonal refresh (K-FAC, KFRA, KFLR, and FOOF with ``second_factor=False``)
and :class:`DistributedTridiag` for ``kfac-tridiag``'s.

Example (``mpiexec -n 2 python example.py``)::

    from mpi4py import MPI
    import kronlin.distributed as kd

    comm = MPI.COMM_WORLD
    est = kd.DistributedFactorEstimator(comm)           # K-FAC §5 running averages
    kfac = kd.DistributedKFAC(comm, shapes)             # shapes: [(d_out, d_in + 1), ...]
    for acts, grads, dW, n_local in batches:            # this rank's share of each global batch
        est.update(acts, grads)
        g = kd.allreduce_mean(comm, dW, n_local)        # the global batch's gradient
        if est.step % 20 == 1:
            kfac.refresh(est.A_diag, est.G_diag, gamma=1e-2)
        step = kfac.precondition(g)                     # the same on every rank
"""

from __future__ import annotations

from ._comm import CommLog, RankError, guard, install_abort_hook, pack_symmetric, unpack_symmetric
from .assign import COST_MODELS, Assignment, assign, grad_workers, layer_costs, tridiag_costs
from .estimator import DistributedFactorEstimator, FactorReducer, allreduce_factors, allreduce_mean, fold_batch
from .precond import DistributedKFAC, FrozenInverse
from .tridiag import DistributedTridiag
from .._threads import load_thread_pools

__all__ = [
    "DistributedFactorEstimator",
    "FactorReducer",
    "allreduce_factors",
    "allreduce_mean",
    "fold_batch",
    "DistributedKFAC",
    "FrozenInverse",
    "DistributedTridiag",
    "assign",
    "Assignment",
    "layer_costs",
    "tridiag_costs",
    "grad_workers",
    "COST_MODELS",
    "guard",
    "RankError",
    "install_abort_hook",
    "CommLog",
    "pack_symmetric",
    "unpack_symmetric",
]

# each rank's BLAS must be pinned (2 ranks on 2 cores): load the core's pools now, so that a threadpoolctl limit
# the program sets afterwards covers them
load_thread_pools()
