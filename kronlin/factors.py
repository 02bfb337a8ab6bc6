"""Estimating K-FAC's factors from activations and back-propagated vectors (K-FAC §3, §5).

For a network with layers ``k = 0 … ℓ-1`` (the paper's ``i = k + 1``), the
inputs are, per mini-batch of ``N`` examples,

* ``acts[k]``: the layer's input activations ``a_k`` of shape ``(N, d_k)``
  (``ā_k = [a_k; 1]`` is formed when ``append_one=True``, K-FAC §2.1), and
* ``grads[k]``: the back-propagated vectors ``g_{k+1} = ∂L/∂s_{k+1}`` of shape
  ``(N, d_{k+1})`` (with targets sampled from the model's predictive
  distribution for the Fisher, K-FAC §5).

The batch estimates are ``Ā_{k,j} = ā_kᵀ ā_j / N`` and ``G_{k+1,j+1} = g_{k+1}ᵀ g_{j+1} / N``
for ``j ∈ {k, k+1}``; :class:`FactorEstimator` keeps the exponentially decaying
average of §5 with ``ε = min(1 − 1/k, 0.95)`` at iteration ``k``.

Weight-sharing layers (convolutions after patch extraction, docs/design.md §1) pass
``acts[k]`` of shape ``(N, T, d_k)`` and ``grads[k]`` of shape ``(N, T, d_{k+1})``
with the same ``T``: the per-example gradient is ``Σ_t g_t ā_tᵀ`` and the factors
are those of KFC (Grosse & Martens 2016; K-BFGS §2.2)::

    Ā = (1/N) Σ_n Σ_t ā_{n,t} ā_{n,t}ᵀ,     G = (1/(N·T)) Σ_n Σ_t g_{n,t} g_{n,t}ᵀ,

so that ``Ā ⊗ G`` has the scale of the layer's Fisher block (the sum over
positions is on the activation side).  Cross-layer factors are not defined for
such layers: use ``tridiagonal=False``.
"""

from __future__ import annotations

import numpy as np

from ._backend import context, diagonal, is_numpy, mT, native_float
from ._kernels.symmetric import mirror_lower
from ._linalg import second_moment
from ._validate import (
    check_finite,
    first_nonfinite,
    check_flag,
    check_nonneg_scalar,
    nonfinite_result,
    quiet_overflow,
    shape_str,
)
from .tridiag import BlockDiagInverse, BlockTridiagInverse

__all__ = ["batch_factors", "FactorEstimator"]

_KEYS = ("A_diag", "G_diag", "A_off", "G_off")


def _prepare(acts, grads, append_one, tridiagonal=False):
    append_one, tridiagonal = check_flag(append_one, "append_one"), check_flag(tridiagonal, "tridiagonal")
    for name, x in (("acts", acts), ("grads", grads)):
        if not isinstance(x, (list, tuple)):
            raise TypeError(
                f"{name} must be a list with one array per layer (a single layer is [array]); got {type(x).__name__}"
            )
    acts, grads = list(acts), list(grads)
    if not acts or len(acts) != len(grads):
        raise ValueError(f"acts and grads must be non-empty lists of equal length; got {len(acts)} and {len(grads)}")
    named = [(f"acts[{k}]", a) for k, a in enumerate(acts)] + [(f"grads[{k}]", g) for k, g in enumerate(grads)]
    ctx, arrays = context(*named)
    xp, n = ctx.xp, len(acts)
    N = None
    for (name, _), M in zip(named, arrays):
        if M.ndim not in (2, 3):
            raise ValueError(f"{name} must have shape (N, d) or, for a weight-sharing layer, (N, T, d); got {shape_str(M)}")
        if N is None:
            N = M.shape[0]
        elif M.shape[0] != N:
            raise ValueError(f"{name} has {M.shape[0]} examples but acts[0] has {N}; all layers need the same batch")
    if N == 0:
        raise ValueError("acts and grads hold no examples (N = 0)")
    A, G = arrays[:n], arrays[n:]
    for k, (a, g) in enumerate(zip(A, G)):
        if a.ndim != g.ndim or (a.ndim == 3 and a.shape[1] != g.shape[1]):
            raise ValueError(
                f"acts[{k}] {shape_str(a)} and grads[{k}] {shape_str(g)} must both be (N, d) or both (N, T, d) "
                "with the same number of positions T"
            )
        if a.ndim == 3 and tridiagonal:
            raise ValueError(
                f"acts[{k}] {shape_str(a)} is a weight-sharing layer: cross-layer factors are not defined for it; "
                "use tridiagonal=False"
            )
    if append_one:
        A = [xp.concat([a, xp.ones(a.shape[:-1] + (1,), dtype=ctx.dtype)], axis=-1) for a in A]
    return ctx, A, G, N, named, arrays


def _rows(xp, M):
    """``(N·T, d)`` rows of an ``(N, d)`` or ``(N, T, d)`` array, and ``T`` (1 for a dense layer)."""
    if M.ndim == 2:
        return M, 1
    return xp.reshape(M, (M.shape[0] * M.shape[1], M.shape[2])), M.shape[1]


def batch_factors(acts, grads, append_one: bool = True, tridiagonal: bool = True) -> dict:
    """Single-batch factor estimates as a dict with keys ``A_diag``, ``G_diag``, ``A_off``, ``G_off``.

    ``A_off``/``G_off`` are the cross-layer factors of the block-tridiagonal
    approximation (empty lists when ``tridiagonal=False``).
    """
    ctx, A, G, N, named, arrays = _prepare(acts, grads, append_one, tridiagonal)
    out = _estimates(ctx.xp, A, G, N, tridiagonal)
    _check_estimates(ctx.xp, out, named, arrays)
    return {k: [ctx.out(M) for M in v] for k, v in out.items()}


def _estimates(xp, A, G, N, tridiagonal, weight=1.0, lower_only=False):
    """``weight ×`` the batch estimates (``weight = 1 − ε`` folds the average's weight into the scaling pass).
    ``lower_only``: ``A_diag``/``G_diag`` need only their lower triangle right (see ``FactorEstimator._get``)."""
    n = len(A)
    A = [_rows(xp, a)[0] for a in A]  # Σ_t on the activation side
    G = [(g2, T) for g2, T in (_rows(xp, g) for g in G)]  # (1/T) Σ_t on the gradient side
    with quiet_overflow():  # a non-finite estimate is found and named by _check_estimates
        return {
            "A_diag": [second_moment(xp, a, weight / N, lower_only) for a in A],
            "G_diag": [second_moment(xp, g, weight / (N * T), lower_only) for g, T in G],
            "A_off": [_scaled(mT(A[k]) @ A[k + 1], weight / N) for k in range(n - 1)] if tridiagonal else [],
            "G_off": [_scaled(mT(G[k][0]) @ G[k + 1][0], weight / N) for k in range(n - 1)] if tridiagonal else [],
        }


def _scaled(M, c):
    M *= c
    return M


def _first_nonfinite(xp, stats) -> int | None:
    """Index into ``stats["A_diag"] + stats["G_diag"]`` of the first factor with a non-finite diagonal, else None.

    The diagonal suffices for every estimate: a second moment is PSD, so
    ``|M_ij| ≤ √(M_ii M_jj)`` (Cauchy–Schwarz, also for every partial sum of the
    products and for the cross-layer ``āₖᵀāₖ₊₁``, bounded by the two layers'
    diagonals); a NaN or infinity in an input column makes that column's
    diagonal entry non-finite too.  So one ``O(d)`` pass per factor replaces
    the ``O(N·d)`` input and ``O(d²)`` result passes.
    """
    return first_nonfinite(xp, [diagonal(xp, M) for M in stats["A_diag"] + stats["G_diag"]])


def _check_estimates(xp, stats, named, arrays):
    """Raise naming the layer when a factor is not finite: ``ValueError`` for a non-finite input
    (``acts[k]``/``grads[k]``), else ``FloatingPointError`` for an overflow of the statistics."""
    i = _first_nonfinite(xp, stats)
    if i is None:
        return
    n = len(stats["A_diag"])
    for (name, _), M in zip(named, arrays):
        check_finite(xp, M, name)
    key, k = ("A_diag", i) if i < n else ("G_diag", i - n)
    src = f"{'acts' if key == 'A_diag' else 'grads'}[{k}]"
    M = stats[key][k]
    raise nonfinite_result(M, f"{key}[{k}] (the second moment of {src})",
                           f"the statistics exceed the dtype's range: rescale {src} (the factor scales with its square)")


def _blend(old, scaled_new, eps):
    """``ε·old + scaled_new``, written into ``scaled_new`` (a fresh array, ``(1 − ε)·batch`` from
    :func:`_estimates`' ``weight``); ``old`` is left alone, so an earlier snapshot of the averages stays
    valid (see ``FactorEstimator.__copy__``).

    NumPy: one BLAS ``axpy`` pass, no temporary (measured on the 784-512-512-10 MLP's six float32
    factors, one thread: 1.3 ms against 4.7-6.7 ms for ``old * ε`` into a new array plus the sum).
    """
    if (isinstance(scaled_new, np.ndarray) and scaled_new.dtype == old.dtype and native_float(scaled_new)
            and scaled_new.flags.c_contiguous and old.flags.c_contiguous):
        import scipy.linalg.blas as blas

        blas.get_blas_funcs("axpy", (old,))(old.reshape(-1), scaled_new.reshape(-1), a=eps)
        return scaled_new
    scaled_new += old * eps  # JAX arrays are immutable: += makes a new one
    return scaled_new


def _checked_stats(stats, tridiagonal: bool, bad, what: str, snapshot: bool):
    """``(ctx, {key: [matrix, ...]})`` from a dict of factor lists, or ``bad(message)`` raised naming the entry:
    the four keys of :func:`batch_factors`, ``A_diag``/``G_diag`` one square matrix per layer,
    ``A_off``/``G_off`` one per neighbouring pair when ``tridiagonal`` (else none), all finite.
    ``snapshot``: the matrices are copied (the estimator will own them)."""
    if not isinstance(stats, dict):
        raise bad(f"{what} must be a dict of factor lists; got {type(stats).__name__}")
    missing = [k for k in _KEYS if k not in stats]
    if missing:
        raise bad(f"{what} is missing {', '.join(repr(k) for k in missing)}")
    lists = {k: stats[k] for k in _KEYS}
    for k, v in lists.items():
        if not isinstance(v, (list, tuple)):
            raise bad(f"{what}[{k!r}] must be a list of matrices; got {type(v).__name__}")
    n = len(lists["A_diag"])
    if n < 1 or len(lists["G_diag"]) != n:
        raise bad(f"{what}['A_diag'] and {what}['G_diag'] must hold one matrix per layer each; "
                  f"got {n} and {len(lists['G_diag'])}")  # fmt: skip
    n_off = n - 1 if tridiagonal else 0
    for k in ("A_off", "G_off"):
        if len(lists[k]) != n_off:
            raise bad(f"{what}[{k!r}] must hold {n_off} matrices ({n} layers, tridiagonal={tridiagonal}); "
                      f"got {len(lists[k])}")  # fmt: skip
    named = [(f"{what}[{k!r}][{i}] ({k}[{i}])", M) for k in _KEYS for i, M in enumerate(lists[k])]
    try:
        ctx, arrays = context(*named, snapshot=snapshot)
    except (TypeError, ValueError) as exc:
        raise bad(str(exc)) from None
    it = iter(arrays)
    loaded = {k: [next(it) for _ in lists[k]] for k in _KEYS}
    for k in _KEYS:
        for i, M in enumerate(loaded[k]):
            name = f"{what}[{k!r}][{i}] ({k}[{i}])"
            if M.ndim != 2:
                raise bad(f"{name} must be a matrix; got shape {shape_str(M)}")
            if k in ("A_diag", "G_diag"):
                want = (M.shape[0], M.shape[0])
            else:
                diag = loaded["A_diag" if k == "A_off" else "G_diag"]
                want = (diag[i].shape[0], diag[i + 1].shape[0])
            if tuple(M.shape) != want:
                raise bad(f"{name} has shape {shape_str(M)}; expected {want}")
            try:
                check_finite(ctx.xp, M, name)
            except ValueError as exc:
                raise bad(str(exc)) from None
    return ctx, loaded


class FactorEstimator:
    """Running averages of the K-FAC factors shared by optimizers and users (K-FAC §5).

    Parameters
    ----------
    max_decay : float
        Cap of the decay ``ε = min(1 − 1/k, max_decay)`` (0.95 in K-FAC).
    tridiagonal : bool
        Also track the cross-layer factors ``Ā_{i-1,i}`` and ``G_{i,i+1}``.
    append_one : bool
        Append the homogeneous coordinate to the activations.

    ``update(acts, grads)`` takes per-layer ``(N, d)`` arrays, or ``(N, T, d)``
    for weight-sharing layers (KFC factors, see the module docstring; only with
    ``tridiagonal=False``).

    Examples
    --------
    >>> est = FactorEstimator()
    >>> est.update(acts, grads)                     # doctest: +SKIP
    >>> inv = est.block_tridiag_inverse(gamma=0.1)  # doctest: +SKIP
    """

    def __init__(self, max_decay: float = 0.95, tridiagonal: bool = True, append_one: bool = True):
        if not check_nonneg_scalar(max_decay, "max_decay") < 1.0:
            raise ValueError(f"max_decay must be in [0, 1); got {max_decay!r}")
        self.max_decay = float(max_decay)
        self.tridiagonal, self.append_one = check_flag(tridiagonal, "tridiagonal"), check_flag(append_one, "append_one")
        self.step = 0
        self._stats = None
        self._ctx = None

    def decay(self) -> float:
        """The ε the next update uses."""
        return min(1.0 - 1.0 / (self.step + 1), self.max_decay)

    def update(self, acts, grads) -> "FactorEstimator":
        """Fold in one mini-batch: ``new = ε·old + (1 − ε)·batch``.

        A batch with a non-finite input raises ``ValueError``, one whose
        statistics overflow ``FloatingPointError``, naming the layer; either
        leaves the averages as they were.
        """
        ctx, A, G, N, named, arrays = _prepare(acts, grads, self.append_one, self.tridiagonal)
        eps = self.decay()  # 0 at the first update
        batch = _estimates(ctx.xp, A, G, N, self.tridiagonal, weight=1.0 - eps, lower_only=True)
        _check_estimates(ctx.xp, batch, named, arrays)
        self._check_shapes(batch, lambda key, new, old: ValueError(
            f"acts and grads give {key} of shapes {new} but the running averages have {old}: the layer shapes "
            f"changed since the last update; pass the same layers, or start a new FactorEstimator"))
        return self._fold_in(batch, eps, ctx)

    def _check_shapes(self, batch, error) -> None:
        """Raise ``error(key, new shapes, averages' shapes)`` where ``batch`` does not match the averages."""
        if self._stats is None:
            return
        for key in _KEYS:
            new, old = ([tuple(M.shape) for M in s[key]] for s in (batch, self._stats))
            if new != old:
                raise error(key, new, old)

    def _fold_in(self, scaled, eps, ctx) -> "FactorEstimator":
        """Commit ``ε·old + scaled`` (``scaled``: fresh arrays of ``(1 − ε)·batch``, checked finite and shaped
        like the averages) as the new averages; a convex combination of finite factors needs no check."""
        if self._stats is not None:
            scaled = {k: [_blend(old, M, eps) for old, M in zip(self._stats[k], scaled[k])] for k in _KEYS}
        self._stats, self._ctx = scaled, ctx
        self.step += 1
        return self

    def __copy__(self) -> "FactorEstimator":
        """A snapshot that costs no array copies: :meth:`update` and :meth:`load_state_dict` replace the
        averages by new arrays and never write into them, so the copy keeps the averages it was taken
        with (for undoing an update, e.g. when a step that used it is refused)."""
        twin = object.__new__(FactorEstimator)
        twin.__dict__.update(self.__dict__)
        return twin

    def fold(self, batch: dict) -> "FactorEstimator":
        """Fold batch factors computed elsewhere into the averages, ``ε·old + (1 − ε)·batch`` as :meth:`update`.

        For statistics reduced across processes (``kronlin.distributed``: the
        global batch's factors, the same on every rank).  ``batch`` is a dict
        like :func:`batch_factors` returns (``A_off``/``G_off`` empty unless
        ``tridiagonal``), of finite matrices with the averages' shapes after
        the first update; anything else raises ``ValueError`` naming the entry
        and changes nothing.  The averages equal what :meth:`update` on the
        concatenated batch gives, to round-off.
        """
        def bad(what):
            return ValueError(f"FactorEstimator.fold: {what}")

        ctx, new = _checked_stats(batch, self.tridiagonal, bad, "batch", snapshot=False)
        self._check_shapes(new, lambda key, got, have: bad(
            f"batch[{key!r}] has shapes {got} but the running averages have {have}"))
        eps = self.decay()  # 0 at the first fold: the scaled copies below are the averages
        return self._fold_in({k: [M * (1.0 - eps) for M in new[k]] for k in _KEYS}, eps, ctx)  # fresh arrays

    def _get(self, key):
        if self._stats is None:
            raise RuntimeError("no statistics yet: call update(acts, grads) first")
        if key in ("A_off", "G_off") or not is_numpy(self._ctx.xp):
            return [self._ctx.out_copy(M) for M in self._stats[key]]  # copies: never live views of the averages
        # NumPy keeps the diagonal factors right in their lower triangle only (update() skips the mirror of each
        # ?syrk: one O(d²) pass per factor and step, 3.5% of a 784-512-512-10 K-FAC step); the copy is mirrored
        return [self._ctx.out(mirror_lower(np, np.array(M, order="C", copy=True))) for M in self._stats[key]]

    A_diag = property(lambda self: self._get("A_diag"), doc="[Ā_{0,0}, …, Ā_{ℓ-1,ℓ-1}]")
    G_diag = property(lambda self: self._get("G_diag"), doc="[G_{1,1}, …, G_{ℓ,ℓ}]")
    A_off = property(lambda self: self._get("A_off"), doc="[Ā_{0,1}, …, Ā_{ℓ-2,ℓ-1}]")
    G_off = property(lambda self: self._get("G_off"), doc="[G_{1,2}, …, G_{ℓ-1,ℓ}]")

    def block_diag_inverse(self, gamma: float = 0.0, pi="trace") -> BlockDiagInverse:
        """:class:`BlockDiagInverse` of the current estimates."""
        return BlockDiagInverse(self.A_diag, self.G_diag, gamma=gamma, pi=pi)

    def block_tridiag_inverse(self, gamma: float = 0.0, pi="trace", method: str = "eig") -> BlockTridiagInverse:
        """:class:`BlockTridiagInverse` of the current estimates (needs ``tridiagonal=True``)."""
        if not self.tridiagonal:
            raise ValueError("this estimator does not track cross-layer factors; build it with tridiagonal=True")
        return BlockTridiagInverse(self.A_diag, self.G_diag, self.A_off, self.G_off, gamma=gamma, pi=pi, method=method)

    def state_dict(self) -> dict:
        """Everything needed to resume (arrays in the caller's library)."""
        stats = None if self._stats is None else {k: self._get(k) for k in _KEYS}
        return {"step": self.step, "max_decay": self.max_decay, "tridiagonal": self.tridiagonal,
                "append_one": self.append_one, "stats": stats}

    def load_state_dict(self, state: dict) -> "FactorEstimator":
        """Restore what :meth:`state_dict` returned; a malformed state raises ``ValueError`` naming the entry.

        Nothing is changed unless the whole state is well-formed: the five
        entries present, ``step`` an integer ``>= 0`` (``stats`` is ``None``
        exactly when it is 0), ``max_decay`` in ``[0, 1)``, the switches
        bools, and ``stats`` finite matrices of consistent shapes
        (``A_diag``/``G_diag`` square, one per layer; ``A_off``/``G_off`` one
        per neighbouring pair when ``tridiagonal``, else none).
        """

        def bad(what):
            return ValueError(f"FactorEstimator.load_state_dict: {what}")

        if not isinstance(state, dict):
            raise bad(f"the state must be a dict (from state_dict()); got {type(state).__name__}")
        missing = [k for k in ("step", "max_decay", "tridiagonal", "append_one", "stats") if k not in state]
        if missing:
            raise bad(f"the state is missing {', '.join(repr(k) for k in missing)}")
        step, decay, stats = state["step"], state["max_decay"], state["stats"]
        if isinstance(step, bool) or not isinstance(step, int) or step < 0:
            raise bad(f"state['step'] must be an integer >= 0; got {step!r}")
        if isinstance(decay, bool) or not isinstance(decay, (int, float)) or not 0.0 <= decay < 1.0:
            raise bad(f"state['max_decay'] must be a number in [0, 1); got {decay!r}")
        for key in ("tridiagonal", "append_one"):
            if not isinstance(state[key], bool):
                raise bad(f"state[{key!r}] must be true or false; got {state[key]!r}")
        if stats is not None and not isinstance(stats, dict):
            raise bad(f"state['stats'] must be None or a dict of factor lists; got {type(stats).__name__}")
        if (stats is None) != (step == 0):
            raise bad(f"state['step'] = {step} with {'no' if stats is None else ''} state['stats']: the stats are None "
                      "exactly before the first update")
        ctx = loaded = None
        if stats is not None:
            ctx, loaded = _checked_stats(stats, state["tridiagonal"], bad, "state['stats']", snapshot=True)
        self.__init__(decay, state["tridiagonal"], state["append_one"])
        self.step = step
        if stats is not None:
            self._stats, self._ctx = loaded, ctx
        return self
