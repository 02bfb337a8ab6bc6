"""The optimizer interface shared by the baselines and the Kronecker-factored methods.

Every optimizer is constructed as ``Opt(net, loss, seed=0, **hparams)`` and
offers

* ``step(X, Y) -> dict`` — one iteration on the mini-batch ``(X, Y)``.  The
  dict holds at least ``"loss"``: the mean training loss **on this batch at the
  new parameters** (one extra forward pass after the update; when the step was
  rejected, the loss at the unchanged parameters), ``"loss_before"`` (at the
  old parameters) and ``"accepted"`` (bool).  The command-line record's
  ``"loss"`` list is ``step(...)["loss"]`` of every iteration.
* ``state_dict()`` / ``load_state_dict(state)`` — everything needed to resume
  bit for bit: hyper-parameters, counters, the optimizer's own
  ``numpy.random.Generator`` state (``rng.bit_generator.state``) and the
  subclass's buffers.  Values are NumPy arrays, Python scalars, strings,
  ``None`` and nested dicts / lists / tuples of them (what
  :mod:`kronlin.train.checkpoint` stores).  The network's weights are *not*
  part of it (the caller saves ``net.params``).
* ``hparams`` (the defaults merged with the overrides) and the class
  attributes ``name``, ``defaults`` and ``spec``.

Subclasses set ``name``, ``defaults`` and ``spec`` (what each
hyper-parameter accepts, :mod:`~kronlin.train.optim.hparams`: unknown,
ill-typed and out-of-range values raise ``ValueError`` naming the key, both
at construction and in :meth:`Optimizer.check_hparams`; conditions tying
several together go in ``_validate``), implement ``step``, and keep their buffers in
``extra_state()`` / ``load_extra_state(state)`` (or override ``state_dict``
and ``load_state_dict``, calling ``super()``).

Non-finite steps
----------------
A step whose update or resulting loss is not finite must never reach the
weights.  The helpers here implement that rule:

* :meth:`Optimizer.apply_update` writes ``params + deltas`` into the network,
  evaluates the batch loss there and calls :meth:`accept_or_reject`;
* :meth:`Optimizer.accept_or_reject` keeps the new weights when the loss is
  finite and otherwise restores the weights saved before the step, counts the
  rejection (``n_rejected``) and returns ``False``.

On ``False`` the subclass makes its next step more conservative: K-FAC-type
methods raise their damping (e.g. ``λ ← λ / ω``), SGD and Adam halve their
step size (``lr_scale``); buffers (momentum, averages) are left as they were
before the rejected step.
"""

from __future__ import annotations

import copy

import numpy as np

from ..._validate import all_finite as _finite
from ..._validate import check_seed

from .hparams import check_hparams

__all__ = ["Optimizer", "all_finite"]


def all_finite(arrays) -> bool:
    """Whether every array in the list (or the scalar) is finite (the core's one finiteness test per array)."""
    if np.isscalar(arrays) or isinstance(arrays, np.ndarray):
        return _finite(np, arrays)
    return all(_finite(np, a) for a in arrays)


class Optimizer:
    """Base class; see the module docstring for the contract."""

    name = "base"
    defaults: dict = {}
    #: ``{name: hparams.Param}`` for every key of ``defaults``
    spec: dict = {}
    #: whether ``step`` goes through the data-parallel hooks below (``--distributed``)
    supports_distributed = False
    #: ``None`` (one process) or a :class:`kronlin.train.distributed.DataParallel`:
    #: ``step`` then receives this rank's shard of the global batch
    dp = None

    def __init__(self, net, loss, *, seed: int = 0, **hparams):
        self.check_hparams(hparams)
        self.net = net
        self.loss = loss
        self.hparams = {**self.defaults, **hparams}
        self.seed = check_seed(seed)  # None would seed from the OS: a run that cannot be repeated
        self.rng = np.random.default_rng(self.seed)
        self.iteration = 0
        self.n_rejected = 0
        self._avg = None  # Polyak average of the iterates (K-FAC §13), for optimizers with ``polyak``

    @classmethod
    def check_hparams(cls, hparams: dict) -> None:
        """Raise ``ValueError`` naming the key unless every override is known, well-typed and in range."""
        check_hparams(cls.name, cls.spec, hparams)

    # ------------------------------------------------------------- interface
    def step(self, X, Y) -> dict:  # pragma: no cover - abstract
        raise NotImplementedError

    def _validate(self) -> None:
        """Check conditions that tie several hyper-parameters together (override; ``spec`` checks each one)."""

    @property
    def batches_per_step(self) -> int:
        """How many independent mini-batches the training loop draws per step (concatenated into one
        ``step(X, Y)`` call); 1 for every optimizer except NGD with ``independent_batch=True`` (2)."""
        return 1

    def prepare(self, X_train, batch: int) -> bool:
        """Called once with the whole training inputs and the mini-batch size before the first step of a
        fresh run (not on resume).

        Returns whether it did any work.  A no-op by default; an optimizer whose paper initialises its
        curvature from the whole data set (K-BFGS's warm start) overrides it.  Its time is recorded apart
        from the step times (``prepare_seconds``), as in the papers' figures.
        """
        return False

    # ------------------------------------------------------- iterate averaging
    def _average_iterates(self, xi) -> None:
        """Fold the current weights into the Polyak average ``θ̂ ← ξ θ̂ + (1 − ξ) θ`` (K-FAC §13; the first
        call starts it at θ); a no-op when ``xi`` is ``None``.  The average never feeds back into training."""
        if xi is None:
            return
        if self._avg is None:
            self._avg = [W.copy() for W in self.net.params]
        else:
            self._avg = [xi * A + (1.0 - xi) * W for A, W in zip(self._avg, self.net.params)]

    @property
    def averaged_params(self) -> list | None:
        """The Polyak average ``θ̂`` of the iterates (``None`` unless ``polyak`` is set and a step was taken)."""
        return None if self._avg is None else [A.copy() for A in self._avg]

    def extra_state(self) -> dict:
        """The subclass's buffers for :meth:`state_dict` (override)."""
        return {}

    def load_extra_state(self, state: dict) -> None:
        """Restore what :meth:`extra_state` returned (override)."""

    def state_dict(self) -> dict:
        return {
            "name": self.name,
            "hparams": dict(self.hparams),
            "iteration": int(self.iteration),
            "n_rejected": int(self.n_rejected),
            "rng": copy.deepcopy(self.rng.bit_generator.state),
            "extra": self.extra_state(),
            "averaged": None if self._avg is None else [np.array(A) for A in self._avg],
        }

    def load_state_dict(self, state: dict) -> None:
        if not isinstance(state, dict):
            raise ValueError(f"the state must be a dict (from state_dict()); got {type(state).__name__}")
        if state.get("name") != self.name:
            raise ValueError(f"state is for optimizer {state.get('name')!r}, not {self.name!r}")
        self.check_hparams(state["hparams"])
        self.hparams = dict(state["hparams"])
        self.iteration = int(state["iteration"])
        self.n_rejected = int(state["n_rejected"])
        self.rng.bit_generator.state = copy.deepcopy(state["rng"])
        avg = state.get("averaged")  # absent from checkpoints written before SGD had ``polyak``
        self._avg = None if avg is None else [np.array(A, dtype=np.float64) for A in avg]
        self.load_extra_state(state["extra"])

    def check_distributed(self) -> None:
        """Raise ``ValueError`` unless this optimizer, so configured, can run data-parallel (``--distributed``)."""
        if not self.supports_distributed:
            from . import OPTIMIZERS

            ok = sorted(n for n, c in OPTIMIZERS.items() if c.supports_distributed)
            raise ValueError(f"--distributed is not available for {self.name!r}; it is for {ok}")

    # ------------------------------------------------- data-parallel hooks
    # With ``dp is None`` each runs the single-process code unchanged; with a
    # DataParallel it reduces over the ranks (see kronlin.train.distributed).
    def _loss_and_grads(self, X, Y):
        """``net.loss_and_grads`` of the (global) batch."""
        if self.dp is None:
            return self.net.loss_and_grads(X, Y, self.loss)
        return self.dp.loss_and_grads(self.net, self.loss, X, Y)

    def _value(self, out, Y) -> float:
        """``loss.value`` of the (global) batch."""
        if self.dp is None:
            return self.loss.value(out, Y)
        return self.dp.value(self.loss, out, Y)

    def _sample(self, out):
        """``loss.sample(out, self.rng)``: targets from the model (the global batch's draws)."""
        if self.dp is None:
            return self.loss.sample(out, self.rng)
        return self.dp.sample(self.loss, out, self.rng)

    def _sums(self, values) -> list:
        """Each value summed over the ranks (one collective); one process: the values themselves."""
        if self.dp is None:
            return list(values)
        return self.dp.sums(values)

    def _all(self, flag: bool) -> bool:
        """``flag`` on every rank (one process: ``flag``)."""
        return bool(flag) if self.dp is None else self.dp.all(flag)

    def _batch_size(self, trace) -> int:
        """The (global) number of examples of the batch ``trace`` came from."""
        return trace.N if self.dp is None else self.dp.n

    # --------------------------------------------------------------- helpers
    def batch_loss(self, X, Y, params=None) -> float:
        """Mean loss on the batch at ``params`` (default: the current weights)."""
        if self.dp is None:
            return self.net.loss(X, Y, self.loss, params)
        return self._value(self.net.forward(X, params).out, Y)

    def accept_or_reject(self, new_loss: float, backup: list, accept=None) -> bool:
        """Keep a step already written into ``net.params`` if ``new_loss`` is finite (and ``accept(new_loss)``).

        Otherwise put ``backup`` (the weights before the step, as returned by
        ``net.copy_params()``) back into ``net.params``, add one to
        ``n_rejected`` and return ``False``; the caller then raises its damping
        or shrinks its step.  ``accept`` is an optional further test, called
        while the new weights are in place (e.g. NGD's "the objective did not
        go up").
        """
        if np.isfinite(new_loss) and (accept is None or accept(new_loss)):
            return True
        self.net.params = [W.copy() for W in backup]
        self.n_rejected += 1
        return False

    def apply_update(self, deltas, X, Y, *, return_trace: bool = False, accept=None):
        """``params ← params + deltas`` if the loss there is finite; ``(accepted, loss_at_new_params)``.

        Non-finite ``deltas`` are rejected without a forward pass (the loss is
        reported as ``nan``).  On rejection the weights are unchanged.  With
        ``return_trace`` the result is ``(accepted, loss, trace)``: the forward
        pass at the new weights that gave the loss (``None`` when there was
        none or the step was rejected), for a caller that needs the new
        gradient on the same batch (one backward pass instead of a new
        forward and backward).  ``accept``: see :meth:`accept_or_reject`.
        """
        if not all_finite(deltas):
            self.n_rejected += 1
            return (False, float("nan"), None) if return_trace else (False, float("nan"))
        backup = self.net.copy_params()
        with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
            self.net.params = [W + D for W, D in zip(backup, deltas)]
            trace = self.net.forward(X)
            new_loss = self._value(trace.out, Y)
        accepted = self.accept_or_reject(new_loss, backup, accept)
        return (accepted, new_loss, trace if accepted else None) if return_trace else (accepted, new_loss)

    def __repr__(self) -> str:
        hp = ", ".join(f"{k}={v!r}" for k, v in self.hparams.items())
        return f"{type(self).__name__}({hp})"


def merge_layer_states(states: list) -> dict:
    """The one :meth:`FactorEstimator.state_dict` of a checkpoint's list of them: a list of one (written now),
    or one per layer (written before the estimator was shared by all layers; every layer was updated at
    every step, so the steps agree) merged into one."""
    if len(states) == 1:
        return states[0]
    steps = {st.get("step") for st in states if isinstance(st, dict)}
    if len(steps) != 1 or not all(isinstance(st, dict) for st in states):
        raise ValueError("the per-layer factor statistics of this checkpoint disagree on their step")
    merged = dict(states[0])
    if any(st.get("stats") is None for st in states):
        merged["stats"] = None
    else:
        merged["stats"] = {k: [M for st in states for M in st["stats"][k]] for k in states[0]["stats"]}
    return merged
