"""FOOF: gradient descent on neurons (Benzing 2022, §4 and algorithm 1).

Registry name ``"foof"``.  Per layer, with ``ā`` the layer input including the
homogeneous 1 (:class:`kronlin.train.net.Trace`), FOOF keeps an exponential
moving average ``Σ`` of ``A Aᵀ = E_n[ā āᵀ]`` (for a convolution the patches
summed over the ``T`` positions, ``E_n[Σ_t ā_t ā_tᵀ]``, like K-FAC's ``Ā``) and
preconditions the weight gradient ``∇W`` (shape ``(d_out, d_in+1)``) by the
damped inverse ``P = (Σ + λI)⁻¹`` of eq. (6):

    Δ = ∇W P,     i.e. vec(Δ) = ((λI + Σ)⁻¹ ⊗ I) vec(∇W)      (column-stacking vec)

One iteration ``t = k − 1`` (``k = 1, 2, …``) follows algorithm 1 literally:

1. forward/backward pass on the mini-batch: loss and ``∇W`` of every layer;
2. ``v ← μ v + ∇W P`` and ``W ← W − η (v + wd·W)`` (heavy-ball momentum, §4.1
   "FOOF can be combined with momentum and decoupled weight decay"; μ = 0.9 as
   in appendix D.5; ``weight_decay`` is the decoupled decay, default 0);
3. if ``t mod T = 0``: ``P ← (Σ + λI)⁻¹`` (line 8; the explicit inverse from
   the Cholesky factor of ``Σ + λI``, :meth:`kronlin.Kron.inv`, so each step
   is one GEMM ``∇W P``; the same call as the sharded refresh of ``--distributed``);
4. if ``(t + S) mod T ∈ {0, …, S−1}``: fold this batch's ``E_n[ā āᵀ]`` into
   ``Σ`` (line 11): the ``S`` steps just before an inversion.

``Σ`` is a :class:`kronlin.FactorEstimator` with ``max_decay = m``: its decay
``min(1 − 1/j, m)`` at its ``j``-th update is the "normalised" moving average of
appendix K.  Scaling (``stats``): by default ``Σ`` is a mean over the batch, so λ does not
depend on the batch size; with the inputs of the kronlin.train tasks (O(1)
activations) ``λ`` of about 1 plays the role of the paper's λ = 100.
``stats="sum"`` is the paper's convention, eq. (6)'s ``A Aᵀ`` summed over the
batch: the activations are folded in scaled by ``√N`` (``N`` the batch size),
so ``Σ`` is exactly ``N·E[ā āᵀ]`` for every batch, fixed or growing, and the
paper's λ values apply.  With a fixed batch size the two conventions are one
method: ``(λ, η)`` with sums is ``(λ/N, η/N)`` with means.

Start (``init_batches``): with the default 1, the first mini-batch's
statistics are folded in and inverted before the first update (that fold
counts as step 0's line 11); ``init_batches=50`` is appendix K's start: line 11
on 50 mini-batches drawn from the training set before training (at the
initial weights, by the optimizer's generator; :meth:`Optimizer.prepare`),
then line 8 once.

Rejection: a step whose update or new loss is not finite never reaches the
weights (:meth:`Optimizer.apply_update`); momentum, ``Σ`` and ``P`` stay as
they were (that step's fold and refresh are skipped) and the step size is
multiplied by ``reject_factor`` for all later iterations (``lr_scale``).
"""

from __future__ import annotations

import copy
import math

import numpy as np

from ... import FactorEstimator, factored_damping
from . import register
from .base import Optimizer, all_finite, merge_layer_states
from .hparams import HALF_OPEN_UNIT, NONNEGATIVE, OPEN_UNIT, POSITIVE, choice, integer

__all__ = ["FOOF"]


class FOOF(Optimizer):
    """Gradient descent on neurons (Benzing 2022, algorithm 1).

    Hyper-parameters (``defaults``):

    ``lr=0.1``          step size η (``W ← W − η v``)
    ``damping=1.0``     λ in ``(Σ + λI)⁻¹`` (Σ a batch mean, see the module docstring)
    ``momentum=0.9``    heavy-ball μ on the preconditioned gradient (0 disables)
    ``decay=0.95``      the moving-average factor m of ``Σ`` (appendix K, after K-FAC)
    ``T=1``             inversion period (line 7); 1 as for the paper's MLPs
    ``S=None``          steps folded into Σ before each inversion (line 10); ``None`` → ``S = T``
    ``weight_decay=0``  decoupled weight decay
    ``reject_factor=0.5``  step-size factor after a rejected step
    ``stats="mean"``    ``Σ`` of batch means, or ``"sum"``: the paper's batch sums (module docstring)
    ``init_batches=1``  mini-batches folded into ``Σ`` before the first update (appendix K: 50)

    The defaults train digits-clf, digits-ae, digits-conv and curves-ae at
    batch 128–256 without a rejected step.
    """

    name = "foof"
    supports_distributed = True
    defaults = {
        "lr": 0.1,
        "damping": 1.0,
        "momentum": 0.9,
        "decay": 0.95,
        "T": 1,
        "S": None,
        "weight_decay": 0.0,
        "reject_factor": 0.5,
        "stats": "mean",
        "init_batches": 1,
    }
    spec = {
        "lr": POSITIVE,
        "damping": POSITIVE,
        "momentum": HALF_OPEN_UNIT,
        "decay": HALF_OPEN_UNIT,
        "T": integer(1),
        "S": integer(1, optional=True),
        "weight_decay": NONNEGATIVE,
        "reject_factor": OPEN_UNIT,
        "stats": choice("mean", "sum"),
        "init_batches": integer(1),
    }

    def __init__(self, net, loss, *, seed: int = 0, **hparams):
        super().__init__(net, loss, seed=seed, **hparams)
        self._validate()
        self.velocity = [np.zeros_like(W) for W in net.params]
        self.lr_scale = 1.0
        self._new_estimators()
        self._sigma = None  # the Σ each layer's P was built from (frozen at the last inversion)
        self._inverse = None  # per layer P = (Σ + λI)⁻¹ (under --distributed: a DistributedKFAC.frozen())

    # ----------------------------------------------------------- configuration
    def _validate(self):
        """What ties hyper-parameters together (each one's type and range is in ``spec``)."""
        h = self.hparams
        if h["S"] is not None and h["S"] > h["T"]:
            raise ValueError(f"{self.name}: S must be an integer with 1 <= S <= T (or None); got {h['S']!r}")

    @property
    def S(self) -> int:
        return int(self.hparams["T"] if self.hparams["S"] is None else self.hparams["S"])

    def _new_estimators(self):
        # one estimator for every layer (one update call a batch; the G statistics are unused placeholders)
        self._est = FactorEstimator(max_decay=self.hparams["decay"], tridiagonal=False, append_one=False)

    # ---------------------------------------------------------------- pieces
    def _fold(self, trace, local: bool = False) -> None:
        """Line 11 for this batch (``local``: this process's rows only, also under ``--distributed``)."""
        acts = list(trace.a)
        if self.hparams["stats"] == "sum":  # E[(√N ā)(√N ā)ᵀ] = N·E[ā āᵀ]: the batch sum of eq. (6)
            root = math.sqrt(trace.N if local else self._batch_size(trace))
            acts = [a * root for a in acts]
        zeros = [np.zeros(a.shape[:-1] + (1,)) for a in acts]  # G is not used: a 1-column placeholder
        if self.dp is not None and not local:  # the global batch's Σ (one packed all-reduce), folded into each
            self.dp.fold_factors(self._est, acts, zeros, tridiagonal=False)
            return
        self._est.update(acts, zeros)  # conv patches (N, T, d): the estimator sums over positions

    def prepare(self, X_train, batch: int) -> bool:
        """Appendix K's start when ``init_batches`` > 1: line 11 on that many mini-batches of ``batch``
        examples drawn from ``X_train`` by the optimizer's generator, at the initial weights, then line 8.

        Every rank of a ``--distributed`` run draws the same batches and folds them locally (identical
        results, no communication).
        """
        k = int(self.hparams["init_batches"])
        if k == 1 or self._inverse is not None:
            return False
        X_train = np.asarray(X_train, dtype=np.float64)
        n = X_train.shape[0]
        for _ in range(k):
            rows = X_train if batch >= n else X_train[self.rng.choice(n, size=batch, replace=False)]
            trace = self.net.forward(rows)
            if not all_finite(trace.a):
                raise FloatingPointError("init_batches: the activations are not finite at the initial weights")
            self._fold(trace, local=True)
        self._invert()
        return True

    def _invert(self) -> None:
        """Line 8: ``P ← (Σ + λI)⁻¹`` (from the Cholesky factor of ``Σ + λI``)."""
        self._sigma = self._est.A_diag  # copies of the averages
        self._build()

    def _build(self) -> None:
        lam = float(self.hparams["damping"])
        if self.dp is not None:  # --distributed: each layer's (Σ + λI)⁻¹ on one rank, shared per the placement
            kf = self.dp.kfac([W.shape for W in self.net.params], second_factor=False)
            self._inverse = kf.refresh(self._sigma, None, gamma=lam, pi=1.0).frozen()  # Σ + 1·λ·I, G = I
            return
        # (Σ + 1·λ·I)⁻¹ ⊗ 1 (factored_damping with π = 1 is Σ + λI): the call DistributedKFAC makes for G = I
        self._inverse = [factored_damping(S, np.eye(1), lam, pi=1.0).inv().A for S in self._sigma]

    def precondition(self, grads) -> list:
        """``∇W P = ∇W (Σ + λI)⁻¹`` per layer with the current ``P``."""
        if self._inverse is None:
            raise RuntimeError("no statistics yet: call step() first")
        if self.dp is not None:
            return self._inverse.apply(grads)
        return [G @ P.T for P, G in zip(self._inverse, grads)]

    @property
    def sigma(self) -> list | None:
        """The (undamped) ``Σ`` the current ``P`` was built from, per layer, or ``None``."""
        return None if self._sigma is None else [S.copy() for S in self._sigma]

    # ------------------------------------------------------------------ step
    def step(self, X, Y) -> dict:
        h = self.hparams
        t = self.iteration
        self.iteration += 1
        mu, wd = float(h["momentum"]), float(h["weight_decay"])
        lr = float(h["lr"]) * self.lr_scale
        with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
            loss0, grads, trace = self._loss_and_grads(X, Y)
        acts_ok = self._all(all_finite(trace.a))  # every rank's activations (one process: these)
        if not (math.isfinite(loss0) and all_finite(grads) and acts_ok):
            self.n_rejected += 1
            self.lr_scale *= float(h["reject_factor"])
            return {"loss": float(loss0), "loss_before": float(loss0), "accepted": False, "lr": lr,
                    "reason": "non-finite loss, gradient or activations at the current weights"}  # fmt: skip
        initial = self._inverse is None
        if initial:  # appendix K: Σ and P from the first batch before the first update
            before = copy.copy(self._est)  # a snapshot without array copies (FactorEstimator.__copy__)
            self._fold(trace)
            self._invert()
        try:  # finite gradients: kronlin returns a finite ∇W P or refuses an overflowing one (FloatingPointError)
            pre = self.precondition(grads)
        except FloatingPointError:
            pre = None
        if pre is None:  # rejected like any non-finite update: nothing changes but the step size
            self.n_rejected += 1
            accepted, new_loss, v_new = False, float("nan"), None
        else:
            with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
                v_new = [mu * v + D for v, D in zip(self.velocity, pre)]
                deltas = [-lr * (v + wd * W) if wd else -lr * v for v, W in zip(v_new, self.net.params)]
            accepted, new_loss = self.apply_update(deltas, X, Y)
        refreshed = False
        if accepted:
            self.velocity = v_new
            T, S = int(h["T"]), self.S
            if t % T == 0 and not initial:
                self._invert()
                refreshed = True
            if (t + S) % T < S and not initial:
                self._fold(trace)
        else:
            self.lr_scale *= float(h["reject_factor"])
            if initial:  # leave no trace of the rejected first step
                self._est = before
                self._sigma = self._inverse = None
        return {"loss": float(new_loss if accepted else loss0), "loss_before": float(loss0),
                "accepted": accepted, "lr": lr, "refreshed": refreshed or initial}  # fmt: skip

    # ------------------------------------------------------------------ state
    def extra_state(self) -> dict:
        return {
            "velocity": [v.copy() for v in self.velocity],
            "lr_scale": float(self.lr_scale),
            "sigma": None if self._sigma is None else [S.copy() for S in self._sigma],
            "estimators": [self._est.state_dict()],  # a list: the format of one estimator per layer, kept
        }

    def load_extra_state(self, state: dict) -> None:
        self._validate()
        self.velocity = [np.array(v, dtype=np.float64) for v in state["velocity"]]
        self.lr_scale = float(state["lr_scale"])
        self._new_estimators()
        self._est.load_state_dict(merge_layer_states(state["estimators"]))
        sig = state["sigma"]
        if sig is None:
            self._sigma = self._inverse = None
        else:
            self._sigma = [np.array(S, dtype=np.float64) for S in sig]
            self._build()  # deterministic: the same Cholesky factors


register(FOOF.name, FOOF)
