"""Data-parallel factor statistics: every rank's batch reduced into the global factors (K-FAC §3, §5).

Rank ``r`` holds ``N_r`` of the ``N = Σ_r N_r`` examples of a global batch.
Its batch estimates (:func:`kronlin.batch_factors`) are ``F_r = S_r / N_r``
(``S_r / (N_r·T)`` for a weight-sharing layer's ``G``), so the global factor
of the concatenated batch is the example-weighted mean

    F = Σ_r N_r F_r / N,

which is what is reduced: each rank contributes ``N_r·F_r`` and ``N_r`` in one
packed buffer and divides the sum by the summed ``N``.  Ranks may hold
different numbers of examples, including none.  The diagonal factors
``Ā_{i,i}``, ``G_{i,i}`` are symmetric, so only their upper triangles are sent;
the cross-layer ``Ā_{i,i+1}``, ``G_{i,i+1}`` (K-FAC §4.3) are sent whole.

The packed buffer also carries an error flag: a rank whose local work failed
sends its flag (and zeros), and every rank then raises
:class:`~kronlin.distributed.RankError` after the same collective.  The first
reduction of a reducer also checks, with one small ``allgather``, that every
rank has the same layers, positions ``T`` and dtype (a mismatched buffer size
would be undefined behaviour in MPI); later ones are a single ``Allreduce``.
"""

from __future__ import annotations

import numpy as np

from .. import FactorEstimator, batch_factors
from .._backend import context
from ._comm import back, host, mpi, pack_symmetric, raise_failures, tri_size, unpack_symmetric, wait

__all__ = ["FactorReducer", "allreduce_factors", "allreduce_mean", "fold_batch", "DistributedFactorEstimator"]

_KEYS = ("A_diag", "G_diag", "A_off", "G_off")


def _signature(acts, grads, append_one, tridiagonal):
    """Per-layer ``(p, q, T)`` and the dtype of a batch (also for a rank that holds no examples)."""
    acts, grads = list(acts), list(grads)
    if not acts or len(acts) != len(grads):
        raise ValueError(f"acts and grads must be non-empty lists of equal length; got {len(acts)} and {len(grads)}")
    ctx, arrays = context(*[(f"acts[{k}]", a) for k, a in enumerate(acts)],
                          *[(f"grads[{k}]", g) for k, g in enumerate(grads)])  # fmt: skip
    n = len(acts)
    layers = []
    for k in range(n):
        a, g = arrays[k], arrays[n + k]
        T = int(a.shape[1]) if a.ndim == 3 else 0
        layers.append((int(a.shape[-1]) + int(bool(append_one)), int(g.shape[-1]), T))
    N = int(arrays[0].shape[0]) if arrays[0].ndim in (2, 3) else -1
    return ctx, tuple(layers), N, (bool(append_one), bool(tridiagonal), str(ctx.dtype))


def _layout(layers, tridiagonal):
    """``[(key, k, kind, shape)]`` of the packed buffer, in order; kind ``"sym"`` (triangle) or ``"full"``."""
    out = [("A_diag", k, "sym", (p, p)) for k, (p, q, T) in enumerate(layers)]
    out += [("G_diag", k, "sym", (q, q)) for k, (p, q, T) in enumerate(layers)]
    if tridiagonal:
        out += [("A_off", k, "full", (layers[k][0], layers[k + 1][0])) for k in range(len(layers) - 1)]
        out += [("G_off", k, "full", (layers[k][1], layers[k + 1][1])) for k in range(len(layers) - 1)]
    return out


def _size(kind, shape):
    return tri_size(shape[0]) if kind == "sym" else shape[0] * shape[1]


class FactorReducer:
    """Reduces per-rank batch statistics into the global ones, one packed ``Allreduce`` per call.

    Parameters
    ----------
    comm : mpi4py communicator
    append_one, tridiagonal : as in :func:`kronlin.batch_factors`
    log : CommLog, optional
        Records the payload bytes of every collective.
    """

    def __init__(self, comm, append_one: bool = True, tridiagonal: bool = True, log=None):
        self.comm, self.append_one, self.tridiagonal, self.log = comm, bool(append_one), bool(tridiagonal), log
        self._sig = None  # (layers, options) agreed by every rank at the first call
        self.n_examples = None  # N of the last reduction

    def _agree(self, exc, sig):
        """First call: one allgather of (error, layout); every rank raises if any failed or they disagree."""
        infos = self.comm.allgather(None if exc is not None else sig)
        if self.log is not None:
            self.log.add("meta", 0)
        if exc is not None or any(s is None for s in infos):
            raise_failures(self.comm, exc, "factor reduction (first update)")
        if any(s != infos[0] for s in infos):
            diff = [r for r, s in enumerate(infos) if s != infos[0]]
            raise ValueError(
                f"ranks disagree on the layers: rank 0 has (p, q, T) per layer and options {infos[0]}, ranks {diff} have "
                f"{[infos[r] for r in diff]}; every rank must pass the same layers, positions T and dtype"
            )
        self._sig = infos[0]

    def reduce(self, acts, grads) -> dict:
        """The factors of the concatenation of every rank's batch (a dict like :func:`kronlin.batch_factors`)."""
        MPI = mpi()
        exc, local, sig, ctx, N_r = None, None, None, None, 0
        try:
            ctx, layers, N_r, opts = _signature(acts, grads, self.append_one, self.tridiagonal)
            sig = (layers, opts)
            if self._sig is not None and sig != self._sig:
                raise ValueError(f"the layers changed since the first update: {sig} instead of {self._sig}")
            if N_r > 0:
                local = batch_factors(acts, grads, append_one=self.append_one, tridiagonal=self.tridiagonal)
        except Exception as e:  # noqa: BLE001 - reported on every rank below
            exc = e
        if self._sig is None:
            self._agree(exc, sig)
        layers, (_, _, dtype) = self._sig
        layout = _layout(layers, self.tridiagonal)
        if exc is None and local is not None:
            xp = ctx.xp
            parts = [xp.reshape(xp.asarray([0.0, float(N_r)], dtype=ctx.dtype), (2,))]
            for key, k, kind, shape in layout:
                M = xp.asarray(local[key][k])
                v = pack_symmetric(xp, M) if kind == "sym" else xp.reshape(M, (-1,))
                parts.append(v * float(N_r))
            buf = host(xp.concat(parts))
        else:
            buf = np.zeros(2 + sum(_size(kind, shape) for _, _, kind, shape in layout), dtype=np.dtype(dtype))
            buf[0] = 1.0 if exc is not None else 0.0
        wait(self.comm.Iallreduce(MPI.IN_PLACE, buf, op=MPI.SUM))
        if self.log is not None:
            self.log.add("factor_allreduce", buf.nbytes)
        if buf[0] != 0:
            raise_failures(self.comm, exc, "factor reduction")
        N = float(buf[1])
        if N <= 0:
            raise ValueError("no rank holds any example (N = 0 over all ranks)")
        self.n_examples = int(round(N))
        xp = ctx.xp  # every rank that gets here built its context (a failed one raised above)
        flat = back(xp, buf, None)
        out = {key: [] for key in _KEYS}
        pos = 2
        for key, k, kind, shape in layout:
            n = _size(kind, shape)
            v = flat[pos:pos + n] / N
            pos += n
            out[key].append(unpack_symmetric(xp, v, shape[0]) if kind == "sym" else xp.reshape(v, shape))
        return {k: [ctx.out(M) for M in v] for k, v in out.items()}


def allreduce_factors(comm, acts, grads, append_one: bool = True, tridiagonal: bool = True, log=None) -> dict:
    """:func:`kronlin.batch_factors` of the concatenation of every rank's ``(acts, grads)``.

    Stateless (checks the layout with one small ``allgather`` each call); keep
    a :class:`FactorReducer` or a :class:`DistributedFactorEstimator` to pay
    for that check only once.
    """
    return FactorReducer(comm, append_one, tridiagonal, log).reduce(acts, grads)


def allreduce_mean(comm, arrays, n_local: int, log=None, kind: str = "grad_allreduce"):
    """The example-weighted mean ``Σ_r N_r X_r / Σ_r N_r`` of per-rank arrays, in one packed ``Allreduce``.

    For data-parallel gradients: ``X_r`` is the mean-loss gradient over rank
    ``r``'s ``N_r = n_local`` examples (weight-shaped per layer), and the result
    is the gradient of the mean loss over the global batch on every rank.  A
    rank with ``n_local = 0`` contributes nothing (its arrays only give shapes).
    """
    MPI = mpi()
    exc = sig = None
    try:
        arrays = list(arrays)
        ctx, xs = context(*[(f"arrays[{k}]", X) for k, X in enumerate(arrays)])
        xp, n_local = ctx.xp, int(n_local)
        if n_local < 0:
            raise ValueError(f"n_local must be >= 0; got {n_local}")
        sig = (tuple(tuple(int(s) for s in X.shape) for X in xs), str(ctx.dtype))
    except Exception as e:  # noqa: BLE001 - reported on every rank below
        exc = e
    infos = comm.allgather(sig)
    if any(s is None for s in infos):
        raise_failures(comm, exc, "gradient all-reduce")
    if any(s != infos[0] for s in infos):
        raise ValueError(f"ranks disagree on the arrays' shapes/dtype: {infos}")
    head = xp.asarray([0.0, float(n_local)], dtype=ctx.dtype)
    buf = host(xp.concat([head] + [xp.reshape(X, (-1,)) * float(n_local) for X in xs]))
    wait(comm.Iallreduce(MPI.IN_PLACE, buf, op=MPI.SUM))
    if log is not None:
        log.add(kind, buf.nbytes)
    N = float(buf[1])
    if N <= 0:
        raise ValueError("no rank holds any example (N = 0 over all ranks)")
    flat = back(xp, buf, None)
    out, pos = [], 2
    for X in xs:
        n = 1
        for s in X.shape:
            n *= int(s)
        out.append(ctx.out(xp.reshape(flat[pos:pos + n] / N, X.shape)))
        pos += n
    return out


def fold_batch(estimator, batch: dict):
    """Fold already-reduced batch factors into a :class:`kronlin.FactorEstimator`'s average, in place.

    ``batch`` is a dict like :func:`kronlin.batch_factors` returns (for a
    ``tridiagonal=False`` estimator ``A_off``/``G_off`` are empty lists), e.g.
    a :class:`FactorReducer`'s result: :meth:`kronlin.FactorEstimator.fold`,
    which gives what the estimator's own ``update`` on the concatenated global
    batch would, to round-off, and keeps its ``state_dict`` format.
    """
    return estimator.fold(batch)


class DistributedFactorEstimator:
    """:class:`kronlin.FactorEstimator` over a data-parallel batch (K-FAC §5 running averages).

    Each ``update(acts, grads)`` takes this rank's part of the global batch
    (any number of examples, zero included), reduces the statistics of all
    ranks in one packed ``Allreduce`` (:class:`FactorReducer`) and folds the
    global batch estimate into the decaying average ``ε·old + (1 − ε)·batch``
    with ``ε = min(1 − 1/k, max_decay)``, exactly as a single-process
    :class:`~kronlin.FactorEstimator` would on the concatenated batch.  The
    averages are identical on every rank.

    The averages live in a plain :class:`~kronlin.FactorEstimator` (set through
    its public ``load_state_dict``), available as :attr:`estimator`; its
    ``state_dict`` format is shared, so a run can resume on any number of ranks
    or in a single process.
    """

    def __init__(self, comm, max_decay: float = 0.95, tridiagonal: bool = True, append_one: bool = True, log=None):
        self.estimator = FactorEstimator(max_decay=max_decay, tridiagonal=tridiagonal, append_one=append_one)
        self.comm, self.log = comm, log
        self.reducer = FactorReducer(comm, append_one=append_one, tridiagonal=tridiagonal, log=log)
        self._tridiag = None  # (key, DistributedTridiag) of block_tridiag_inverse

    @property
    def step(self) -> int:
        return self.estimator.step

    def decay(self) -> float:
        return self.estimator.decay()

    def update(self, acts, grads) -> "DistributedFactorEstimator":
        """Fold in one global mini-batch, of which this rank holds ``acts``/``grads``."""
        fold_batch(self.estimator, self.reducer.reduce(acts, grads))
        return self

    A_diag = property(lambda self: self.estimator.A_diag, doc="[Ā_{0,0}, …, Ā_{ℓ-1,ℓ-1}] (global averages)")
    G_diag = property(lambda self: self.estimator.G_diag, doc="[G_{1,1}, …, G_{ℓ,ℓ}]")
    A_off = property(lambda self: self.estimator.A_off, doc="[Ā_{0,1}, …, Ā_{ℓ-2,ℓ-1}]")
    G_off = property(lambda self: self.estimator.G_off, doc="[G_{1,2}, …, G_{ℓ-1,ℓ}]")

    def block_diag_inverse(self, gamma: float = 0.0, pi="trace"):
        """The single-process :class:`~kronlin.BlockDiagInverse` (replicated; see :class:`DistributedKFAC` to shard it)."""
        return self.estimator.block_diag_inverse(gamma=gamma, pi=pi)

    def block_tridiag_inverse(self, gamma: float = 0.0, pi="trace", method: str = "eig"):
        """:class:`~kronlin.BlockTridiagInverse` of the averages on every rank, its set-ups sharded (collective).

        Each of the ``ℓ`` set-ups (a pair's ``Ψ`` and ``Σ_{i|i+1}``, the last
        layer's inverse) is made on one rank chosen by the cost model and
        shared with every rank (:class:`~kronlin.distributed.DistributedTridiag`);
        the result equals the single-process operator's bit for bit.
        """
        from .tridiag import DistributedTridiag

        e = self.estimator
        if not e.tridiagonal:
            return e.block_tridiag_inverse(gamma=gamma, pi=pi, method=method)  # raises the estimator's error
        shapes = tuple((int(G.shape[0]), int(A.shape[0])) for A, G in zip(e.A_diag, e.G_diag))
        key = (shapes, method)
        if self._tridiag is None or self._tridiag[0] != key:
            self._tridiag = (key, DistributedTridiag(self.comm, shapes, method=method, log=self.log))
        return self._tridiag[1].build(e.A_diag, e.G_diag, e.A_off, e.G_off, gamma=gamma, pi=pi)

    def state_dict(self) -> dict:
        return self.estimator.state_dict()

    def load_state_dict(self, state: dict) -> "DistributedFactorEstimator":
        self.estimator.load_state_dict(state)
        return self
