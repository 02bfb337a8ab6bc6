"""The block-tridiagonal inverse (K-FAC §4.3) with its ``ℓ`` set-ups sharded over the ranks.

:class:`kronlin.BlockTridiagInverse` is ``ℓ`` independent set-ups
(:func:`kronlin.tridiag.tridiag_parts`): for each pair of neighbouring layers
``Ψ^Ā``, ``Ψ^G`` and the Stein set-up of ``Σ_{i|i+1}``, and the last layer's
inverse.  :class:`DistributedTridiag` gives each part to one rank (greedy LPT,
:func:`~kronlin.distributed.assign.assign`, on
:func:`~kronlin.distributed.assign.tridiag_costs`), exchanges the parts in one
``allgather`` (pickled: arrays and kronlin operators) and assembles the
operator on every rank (as :meth:`kronlin.BlockTridiagInverse.from_parts`
does, but validating and damping the factors once per rank, not once for the
parts and again for the assembly), which computes what the single-process
constructor computes from the same (reduced, identical) factors, bit for bit.

Placement: every rank receives every part (KAISA's communication-optimal
extreme).  ``F̂⁻¹ = Ξᵀ Λ Ξ`` couples each layer's step to its neighbours', so
the memory-optimal placement of :class:`~kronlin.distributed.DistributedKFAC`
(one owner per layer's step) does not apply to it.

A failure on any rank (a ``Σ_{i|i+1}`` that is not positive definite, an
overflow) is sent in place of that rank's parts, and every rank raises
:class:`~kronlin.distributed.RankError` after the same collective.
"""

from __future__ import annotations

import pickle
import time

from .. import BlockTridiagInverse
from ._comm import RankError, _describe
from .assign import assign, tridiag_costs

__all__ = ["DistributedTridiag"]


class DistributedTridiag:
    """Builds :class:`kronlin.BlockTridiagInverse` with each of its ``ℓ`` set-ups made on one rank of ``comm``.

    Parameters
    ----------
    comm : mpi4py communicator
    shapes : list of ``(d_out, d_in + 1)``
        The weight shape ``(q, p)`` of every layer (homogeneous coordinate last).
    method : {"eig", "smith"}
        The Stein method of ``Σ_{i|i+1}⁻¹`` (as for ``BlockTridiagInverse``).
    costs : list of float, optional
        Modelled seconds of each part (default :func:`~kronlin.distributed.assign.tridiag_costs`);
        the same on every rank (checked).
    log : CommLog, optional

    Attributes
    ----------
    assignment : Assignment
        ``owners[i]``: the rank that makes part ``i`` (part ``i < ℓ − 1``: layers ``i`` and ``i + 1``).
    refresh_times : dict
        This rank's parts at the last :meth:`build`, each with the rank's set-up seconds spread evenly over
        them (they are made in one call, which factorizes a layer shared by two of them once).
    """

    def __init__(self, comm, shapes, *, method: str = "eig", costs=None, log=None):
        self.comm, self.log, self.method = comm, log, method
        self.shapes = [(int(q), int(p)) for q, p in shapes]
        self.rank, self.world = comm.Get_rank(), comm.Get_size()
        costs = tridiag_costs(self.shapes) if costs is None else [float(c) for c in costs]
        if len(costs) != len(self.shapes):
            raise ValueError(f"costs must have one entry per part ({len(self.shapes)}, one per layer); "
                             f"got {len(costs)}")  # fmt: skip
        self.assignment = assign(costs, self.world, 1.0)
        mine = (tuple(self.shapes), self.assignment.owners, method)
        everyone = comm.allgather(mine)
        if any(x != everyone[0] for x in everyone):
            bad = [r for r, x in enumerate(everyone) if x != everyone[0]]
            raise ValueError(f"ranks {bad} computed a different assignment of the tridiagonal set-ups than rank 0 "
                             f"(different shapes, costs or method); pass the same ones on every rank")  # fmt: skip
        self.my_parts = self.assignment.layers_of(self.rank)
        self.refresh_times = {}

    def build(self, A_diag, G_diag, A_off, G_off, gamma: float = 0.0, pi="trace") -> BlockTridiagInverse:
        """``BlockTridiagInverse(A_diag, G_diag, A_off, G_off, gamma, pi, method)`` on every rank (collective).

        The factors must be the same on every rank (e.g. a
        :class:`~kronlin.distributed.DistributedFactorEstimator`'s averages).
        Raises :class:`~kronlin.distributed.RankError` on every rank when the
        set-up failed on any (``RankError.only("LinAlgError")``: a
        ``Σ_{i|i+1}`` or a damped factor is not positive definite).
        """
        exc, parts = None, []
        self.refresh_times = {}
        t0 = time.perf_counter()
        try:  # validated and damped once: the same operator makes this rank's parts and is completed below
            op = BlockTridiagInverse._prepared(A_diag, G_diag, A_off, G_off, gamma, pi, self.method)
            parts = op._parts(self.my_parts)
        except Exception as e:  # noqa: BLE001 - reported on every rank after the exchange
            exc = e
        seconds = time.perf_counter() - t0
        payload = pickle.dumps(("err", _describe(exc)) if exc is not None else ("ok", parts),
                               protocol=pickle.HIGHEST_PROTOCOL)  # fmt: skip
        gathered = self.comm.allgather(payload)
        if self.log is not None:
            self.log.add("inverse_bcast", sum(len(b) for b in gathered))
        received = [pickle.loads(b) for b in gathered]
        failures = {r: v for r, (kind, v) in enumerate(received) if kind == "err"}
        if failures:
            raise RankError("block-tridiagonal set-up (K-FAC §4.3)", self.world, failures) from exc
        self.refresh_times = {i: seconds / len(self.my_parts) for i in self.my_parts}
        # own parts and unpickled ones belong to this call alone: installed without the snapshot copy
        return op._install([p for _, ps in received for p in ps], copy_parts=False)
