"""Layer-sharded K-FAC inversions and the preconditioned step on every rank (K-FAC §4.2, §6.3, §8).

:class:`DistributedKFAC` gives each layer's refresh to one rank
(:func:`~kronlin.distributed.assign.assign`, LPT on the modelled cost) and
places the results as KAISA does (Pauloski et al., SC'21), with
``g = grad_worker_fraction · world`` gradient workers per layer:

* ``grad_worker_fraction=1`` — **communication-optimal**: every rank receives
  every layer's inverse (one Allgatherv of the owners' payloads at each refresh) and
  preconditions the gradient itself; no communication per step.
* ``grad_worker_fraction=1/world`` — **memory-optimal**: only the owner keeps a
  layer's inverse; it preconditions the (all-reduced) gradient of its layers
  and broadcasts the step, every step.
* in between — the owner's column of ``g`` ranks holds the inverse, and each of
  them broadcasts the step to the ``world/g − 1`` other ranks of its row.

The local computations are the single-process ones, layer by layer: the
factored-damping inverse ``G⁻¹ V Ā⁻ᵀ`` of :class:`kronlin.BlockDiagInverse`
(K-FAC §4.2 with §6.3's factored Tikhonov damping, ``damping="factored"``) or
the exact ``(Ā⊗G + λI)⁻¹`` of :class:`kronlin.KronEigh` (eq. 6, Benzing §3,
``damping="exact"``), so the distributed step equals the single-process step
to rounding of the factors alone; the inverses are exactly symmetric and are
broadcast as upper triangles, the eigenbases whole.

Every collective is reached in the same order on every rank (the order is a
function of the assignment, which is identical everywhere), and local work is
followed by a check-in (:func:`~kronlin.distributed.guard`), so a failure on one
rank raises :class:`~kronlin.distributed.RankError` on all of them.

Like kronlin's operators, :meth:`DistributedKFAC.precondition` (and
:meth:`FrozenInverse.apply`) refuses non-finite input (``ValueError``, as a
``RankError``) and raises ``FloatingPointError`` when the step of finite input
is not finite (it overflowed): on every rank, because every rank checks the
same bytes after the steps are shared (and a worker's own refusal, e.g.
:meth:`kronlin.KronEigh.solve`'s under exact damping, is reported to every
rank by the check-in and raised there as ``FloatingPointError``).
"""

from __future__ import annotations

import time

import numpy as np

from .. import Kron, KronEigh, factored_damping
from .._backend import context, mT
from .._validate import check_finite, check_result
from ._comm import RankError, back, checkin, host, pack_symmetric, tri_size, unpack_symmetric, wait
from .assign import assign, layer_costs

__all__ = ["DistributedKFAC", "FrozenInverse"]


class DistributedKFAC:
    """Block-diagonal K-FAC preconditioner whose inversions are sharded over the ranks of ``comm``.

    Parameters
    ----------
    comm : mpi4py communicator
    shapes : list of ``(d_out, d_in + 1)``
        The weight shape ``(q, p)`` of every layer (homogeneous coordinate last).
    damping : {"factored", "exact"}
        ``"factored"``: ``(Ā + πγI)⁻¹ ⊗ (G + (γ/π)I)⁻¹`` (K-FAC §6.3), as
        :class:`kronlin.BlockDiagInverse` with ``gamma``/``pi`` given to
        :meth:`refresh`; ``"exact"``: eigenbases at :meth:`refresh` and
        ``(Ā⊗G + λI)⁻¹`` with ``λ = damping`` given to :meth:`precondition`.
    grad_worker_fraction : float
        KAISA's knob (see the module docstring); ``world · fraction`` must be an
        integer dividing ``world``.
    costs : list of float, optional
        Per-layer refresh costs for the assignment (default: the cost model
        :func:`~kronlin.distributed.assign.layer_costs`).  Must be the same on
        every rank (checked).
    log : CommLog, optional
    second_factor : bool
        ``False``: every layer's ``G`` is the identity and is neither inverted
        nor sent (FOOF, Benzing 2022 §4.2): :meth:`refresh` takes
        ``G_diag=None`` and the step is ``V (Ā + πγI)⁻¹`` (``damping="factored"`` only).

    Attributes
    ----------
    assignment : Assignment
        Owners, modelled loads and KAISA's grid.
    refresh_times : dict
        Seconds this rank spent on each of its layers at the last refresh.
    """

    def __init__(self, comm, shapes, *, damping: str = "factored", grad_worker_fraction: float = 1.0,
                 costs=None, log=None, second_factor: bool = True):  # fmt: skip
        if damping not in ("factored", "exact"):
            raise ValueError(f"damping must be 'factored' or 'exact'; got {damping!r}")
        if not second_factor and damping != "factored":
            raise ValueError("second_factor=False needs damping='factored'")
        self.comm, self.log, self.damping, self.second_factor = comm, log, damping, bool(second_factor)
        self.shapes = [(int(q), int(p)) for q, p in shapes]
        self.rank, self.world = comm.Get_rank(), comm.Get_size()
        if costs is None:
            costs = layer_costs(self.shapes if second_factor else [(0, p) for _, p in self.shapes], damping)
        costs = [float(c) for c in costs]
        if len(costs) != len(self.shapes):
            raise ValueError(f"costs must have one entry per layer ({len(self.shapes)}); got {len(costs)}")
        self.assignment = assign(costs, self.world, grad_worker_fraction)
        a = self.assignment
        # the assignment must be the same everywhere: check once (also catches different shapes or costs)
        mine = (tuple(self.shapes), a.owners, damping, a.n_grad_workers, self.second_factor)
        everyone = comm.allgather(mine)
        if any(x != everyone[0] for x in everyone):
            bad = [r for r, x in enumerate(everyone) if x != everyone[0]]
            raise ValueError(f"ranks {bad} computed a different layer assignment than rank 0 (different shapes, costs "
                             f"or grad_worker_fraction); pass the same ones on every rank")  # fmt: skip
        # KAISA's grid: the column holds a layer's inverse, the row shares its steps
        self._col = comm.Split(a.column(self.rank), self.rank)
        self._row = comm.Split(a.row(self.rank), self.rank)
        self.my_layers = a.layers_of(self.rank)
        self.worker_layers = a.layers_of_column(a.column(self.rank))  # layers whose inverse this rank holds
        self._held = {}  # layer -> decomposition held by this rank
        self.refresh_times = {}

    # ------------------------------------------------------------ payloads
    def _payload_size(self, k):
        q, p = self.shapes[k]
        if not self.second_factor:
            return tri_size(p)
        if self.damping == "factored":
            return tri_size(q) + tri_size(p)
        return q * q + q + p * p + p

    def _compute(self, xp, k, A, G, gamma, pi):
        try:
            return self._decompose(xp, A, G, gamma, pi)
        except (ValueError, np.linalg.LinAlgError) as exc:  # name the layer; the operators only know "A" and "G"
            raise type(exc)(f"A_diag[{k}] or G_diag[{k}] (layer {k}, named A and G below): {exc}") from None

    def _decompose(self, xp, A, G, gamma, pi):
        if not self.second_factor:  # G = I: only (Ā + πγI)⁻¹ (π = 1 for a fixed damping of Ā alone)
            return (None, factored_damping(A, xp.eye(1, dtype=A.dtype), gamma, pi=pi).inv().A)
        if self.damping == "factored":
            inv = factored_damping(A, G, gamma, pi=pi).inv()  # (A + πγI)⁻¹ ⊗ (G + γ/π I)⁻¹, K-FAC §6.3
            return (inv.G, inv.A)
        return tuple(Kron(A, G).eigh())  # (Qa, la, Qg, lg)

    def _pack(self, xp, dec):
        if self.damping == "factored":
            return [pack_symmetric(xp, M) for M in dec if M is not None]
        return [xp.reshape(M, (-1,)) for M in dec]

    def _unpack(self, xp, k, v):
        q, p = self.shapes[k]
        if not self.second_factor:
            return (None, unpack_symmetric(xp, v, p))
        if self.damping == "factored":
            return (unpack_symmetric(xp, v[:tri_size(q)], q), unpack_symmetric(xp, v[tri_size(q):], p))
        Qa, la = xp.reshape(v[:p * p], (p, p)), v[p * p:p * p + p]
        o = p * p + p
        Qg, lg = xp.reshape(v[o:o + q * q], (q, q)), v[o + q * q:]
        return (Qa, la, Qg, lg)

    # ------------------------------------------------------------- refresh
    def refresh(self, A_diag, G_diag=None, gamma: float = 0.0, pi="trace") -> "DistributedKFAC":
        """Recompute the inverses from the (global, replicated) factors; each rank inverts its own layers.

        ``A_diag``/``G_diag`` must be the same on every rank (e.g. from
        :class:`~kronlin.distributed.DistributedFactorEstimator`).  ``gamma``
        and ``pi`` are the factored damping of K-FAC §6.3 (``damping="factored"``).
        """
        exc, dec, ctx, xp = None, {}, None, None
        self.refresh_times = {}
        try:
            A_diag = list(A_diag)
            G_diag = [None] * len(A_diag) if not self.second_factor else list(G_diag)
            if len(A_diag) != len(self.shapes) or len(G_diag) != len(self.shapes):
                raise ValueError(f"A_diag and G_diag must hold {len(self.shapes)} factors; "
                                 f"got {len(A_diag)} and {len(G_diag)}")  # fmt: skip
            ctx, _ = context(("A_diag[0]", A_diag[0]))
            xp = ctx.xp
            for k in self.my_layers:
                q, p = self.shapes[k]
                if tuple(A_diag[k].shape) != (p, p) or (self.second_factor and tuple(G_diag[k].shape) != (q, q)):
                    raise ValueError(f"layer {k}: A_diag[{k}] must be ({p}, {p}) and G_diag[{k}] ({q}, {q}); "
                                     f"got {tuple(A_diag[k].shape)} and "
                                     f"{None if G_diag[k] is None else tuple(G_diag[k].shape)}")  # fmt: skip
                t0 = time.perf_counter()
                dec[k] = self._compute(xp, k, A_diag[k], G_diag[k], gamma, pi)
                self.refresh_times[k] = time.perf_counter() - t0
        except Exception as e:  # noqa: BLE001 - reported on every rank by the check-in
            exc = e
        checkin(self.comm, exc, "K-FAC refresh (layer inversions)", self.log)
        a = self.assignment
        held = dict(dec)  # an owner keeps what it computed (Factor.inv's SPD inverses are exactly symmetric,
        # so they equal the upper triangles the other ranks unpack, bit for bit)
        members = a.column_ranks(a.column(self.rank))
        if a.n_grad_workers > 1:  # the owners' payloads exchanged in one Allgatherv over the column
            sizes = [sum(self._payload_size(k) for k in a.layers_of(o)) for o in members]
            dtype = np.dtype(str(ctx.dtype))
            packed = [v for k in self.my_layers for v in self._pack(xp, dec[k])]
            send = host(xp.concat(packed)) if packed else np.empty(0, dtype=dtype)
            recv = np.empty(sum(sizes), dtype=dtype)
            wait(self._col.Iallgatherv(send, [recv, sizes]))
            if self.log is not None:
                self.log.add("inverse_bcast", recv.nbytes)
            flat, start = back(xp, recv, None), 0
            for owner, size in zip(members, sizes):
                pos = start
                for k in a.layers_of(owner) if owner != self.rank else ():
                    n = self._payload_size(k)
                    held[k] = self._unpack(xp, k, flat[pos:pos + n])
                    pos += n
                start += size
        self._held = held
        if self.damping == "exact":
            self._held = {k: KronEigh(*d) for k, d in held.items()}
        return self

    # ---------------------------------------------------------- precondition
    def _apply(self, held, k, V, damping):
        d = held[k]
        if self.damping == "factored":
            Ginv, Ainv = d
            return V @ mT(Ainv) if Ginv is None else Ginv @ V @ mT(Ainv)
        return d.solve(V, damping=damping)

    def precondition(self, V_list, damping: float = 0.0) -> list:
        """``F̆⁻¹ V`` for every layer, on every rank (``V_list``: the all-reduced gradient, the same everywhere).

        ``damping`` is the λ of ``(Ā⊗G + λI)⁻¹`` for ``damping="exact"`` (ignored
        for ``"factored"``, whose damping was fixed at :meth:`refresh`).
        """
        return self._precondition(self._held, V_list, damping)

    def frozen(self, damping: float = 0.0) -> "FrozenInverse":
        """The preconditioner of the last :meth:`refresh`, kept when ``refresh`` is called again.

        ``apply(V_list)`` is :meth:`precondition` with these inverses (a
        collective under memory-optimal placement, like ``precondition``);
        ``damped(λ)`` the same inverses with another exact-damping λ.
        """
        return FrozenInverse(self, self._held, damping)

    def _precondition(self, held, V_list, damping):
        if not held and self.worker_layers:
            raise RuntimeError("no inverses yet: call refresh(A_diag, G_diag, ...) first")
        a = self.assignment
        exc, steps, xp = None, {}, None
        try:
            V_list = list(V_list)
            if len(V_list) != len(self.shapes):
                raise ValueError(f"V_list must hold one array per layer ({len(self.shapes)}); got {len(V_list)}")
            ctx, Vs = context(*[(f"V_list[{k}]", V) for k, V in enumerate(V_list)])
            xp = ctx.xp
            for k in self.worker_layers:
                if tuple(Vs[k].shape) != self.shapes[k]:
                    raise ValueError(f"V_list[{k}] must have shape {self.shapes[k]}; got {tuple(Vs[k].shape)}")
                check_finite(xp, Vs[k], f"V_list[{k}]")  # as kronlin's operators: a non-finite result then overflowed
                steps[k] = self._apply(held, k, Vs[k], damping)
        except Exception as e:  # noqa: BLE001 - reported on every rank by the check-in
            exc = e
        try:
            checkin(self.comm, exc, "K-FAC preconditioning", self.log)
        except RankError as err:  # a worker's own refusal (KronEigh.solve's overflow): the same error on every rank
            if err.only("FloatingPointError"):
                raise FloatingPointError(str(err)) from err
            raise
        if a.n_columns > 1:
            # each member of this rank's row is the gradient worker of its column's layers for this row
            row = a.row_ranks(a.row(self.rank))
            for src in row:
                layers = a.layers_of_column(a.column(src))
                if not layers:
                    continue
                if src == self.rank:
                    buf = host(xp.concat([xp.reshape(steps[k], (-1,)) for k in layers]))
                else:
                    buf = np.empty(sum(q * p for q, p in (self.shapes[k] for k in layers)),
                                   dtype=np.dtype(str(ctx.dtype)))  # fmt: skip
                wait(self._row.Ibcast(buf, root=row.index(src)))
                if self.log is not None:
                    self.log.add("step_bcast", buf.nbytes)
                if src != self.rank:
                    flat, pos = back(xp, buf, None), 0
                    for k in layers:
                        q, p = self.shapes[k]
                        steps[k] = xp.reshape(flat[pos:pos + q * p], (q, p))
                        pos += q * p
        # Finite gradients, so a non-finite step overflowed: refuse it as kronlin's operators do (FloatingPointError).
        # Every rank now holds the same bytes of every layer's step (computed from the same inverses and gradient,
        # or received from the layer's gradient worker), so every rank reaches the same verdict with no collective.
        for k in range(len(self.shapes)):
            check_result(xp, steps[k], f"the preconditioned gradient of layer {k} (DistributedKFAC)",
                         "its magnitude exceeds the dtype's range: rescale the gradient or add damping")  # fmt: skip
        return [ctx.out(steps[k]) for k in range(len(self.shapes))]

    def free(self) -> None:
        """Release the sub-communicators (collective over ``comm``)."""
        for c in (self._col, self._row):
            c.Free()


class FrozenInverse:
    """One refresh's inverses on a :class:`DistributedKFAC` (:meth:`DistributedKFAC.frozen`).

    An optimizer that tries several damping values builds one per candidate
    and keeps the one it chooses; each holds its own decompositions.
    """

    def __init__(self, kfac: DistributedKFAC, held: dict, damping: float = 0.0):
        self.kfac, self._held, self.damping = kfac, held, float(damping)

    def damped(self, damping: float) -> "FrozenInverse":
        """The same decompositions with exact damping ``λ = damping`` (``damping="exact"``)."""
        return FrozenInverse(self.kfac, self._held, damping)

    def apply(self, V_list) -> list:
        """``F̆⁻¹ V`` for every layer, on every rank (see :meth:`DistributedKFAC.precondition`)."""
        return self.kfac._precondition(self._held, V_list, self.damping)
