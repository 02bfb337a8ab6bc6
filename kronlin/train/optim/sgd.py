"""Stochastic gradient descent with Nesterov momentum (the first-order baseline).

With the mini-batch gradient ``g`` (plus ``weight_decay · W``), momentum ``μ``
and learning rate ``α``:

    v ← μ v + g,      W ← W − α (g + μ v)          (Nesterov, Sutskever et al. 2013)

or ``W ← W − α v`` with ``nesterov=False`` (heavy ball; the form of K-BFGS
appendix D's SGD-m).  Defaults: ``lr=0.02``, ``momentum=0.9``,
``nesterov=True``, ``weight_decay=0``, ``polyak=None`` (or ξ ∈ [0, 1): the
Polyak average of the iterates, :attr:`averaged_params`, as K-FAC §13 used for
its SGD baseline too; it never feeds back into training).  ``lr=0.02`` trains every task of
:mod:`kronlin.train.data` at batch 256; ``lr=0.05`` already oscillates on
``digits-ae``.

A step whose update or new loss is not finite is rejected
(:meth:`Optimizer.apply_update`): the weights and the velocity stay as they
were and the step size is multiplied by ``reject_factor`` (default ½) for
all later iterations (``lr_scale`` in the state).
"""

from __future__ import annotations

import numpy as np

from .base import Optimizer
from .hparams import HALF_OPEN_UNIT, NONNEGATIVE, OPEN_UNIT, POSITIVE, boolean, real

__all__ = ["SGD"]


class SGD(Optimizer):
    """SGD with (Nesterov) momentum; see the module docstring."""

    name = "sgd"
    defaults = {"lr": 0.02, "momentum": 0.9, "nesterov": True, "weight_decay": 0.0, "reject_factor": 0.5,
                "polyak": None}  # fmt: skip
    spec = {"lr": POSITIVE, "momentum": HALF_OPEN_UNIT, "nesterov": boolean(), "weight_decay": NONNEGATIVE,
            "reject_factor": OPEN_UNIT, "polyak": real(0, 1, high_open=True, optional=True)}  # fmt: skip

    def __init__(self, net, loss, *, seed: int = 0, **hparams):
        super().__init__(net, loss, seed=seed, **hparams)
        self.velocity = [np.zeros_like(W) for W in net.params]
        self.lr_scale = 1.0

    def step(self, X, Y) -> dict:
        hp = self.hparams
        mu, wd = float(hp["momentum"]), float(hp["weight_decay"])
        lr = float(hp["lr"]) * self.lr_scale
        with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
            loss0, grads, _ = self.net.loss_and_grads(X, Y, self.loss)
            if wd:
                grads = [G + wd * W for G, W in zip(grads, self.net.params)]
            v_new = [mu * v + G for v, G in zip(self.velocity, grads)]
            direction = [G + mu * v for G, v in zip(grads, v_new)] if hp["nesterov"] else v_new
            deltas = [-lr * D for D in direction]
        accepted, new_loss = self.apply_update(deltas, X, Y)
        if accepted:
            self.velocity = v_new
            self._average_iterates(hp["polyak"])
        else:
            self.lr_scale *= float(hp["reject_factor"])
        self.iteration += 1
        return {"loss": new_loss if accepted else loss0, "loss_before": loss0, "accepted": accepted, "lr": lr}

    def extra_state(self) -> dict:
        return {"velocity": [v.copy() for v in self.velocity], "lr_scale": float(self.lr_scale)}

    def load_extra_state(self, state: dict) -> None:
        self.velocity = [np.array(v, dtype=np.float64) for v in state["velocity"]]
        self.lr_scale = float(state["lr_scale"])
