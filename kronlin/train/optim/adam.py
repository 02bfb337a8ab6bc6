"""Adam (Kingma & Ba 2015), the adaptive first-order baseline.

With the mini-batch gradient ``g`` (plus ``weight_decay · W``) and ``t`` the
number of accepted steps so far plus one:

    m ← β₁ m + (1 − β₁) g,   v ← β₂ v + (1 − β₂) g²,
    W ← W − α · (m / (1 − β₁ᵗ)) / (√(v / (1 − β₂ᵗ)) + ε).

Defaults: ``lr=3e-3``, ``beta1=0.9``, ``beta2=0.999``, ``eps=1e-8``,
``weight_decay=0`` (Kingma & Ba's, except ``lr``: their 1e-3 is stable here
too but three times slower on the digits tasks at batch 256).  A non-finite step is rejected
(:meth:`Optimizer.apply_update`): weights, moments and ``t`` are left as they
were and the step size is multiplied by ``reject_factor`` (default ½) for all
later iterations (``lr_scale`` in the state).
"""

from __future__ import annotations

import numpy as np

from .base import Optimizer
from .hparams import HALF_OPEN_UNIT, NONNEGATIVE, OPEN_UNIT, POSITIVE

__all__ = ["Adam"]


class Adam(Optimizer):
    """Adam; see the module docstring."""

    name = "adam"
    defaults = {"lr": 3e-3, "beta1": 0.9, "beta2": 0.999, "eps": 1e-8, "weight_decay": 0.0, "reject_factor": 0.5}
    spec = {"lr": POSITIVE, "beta1": HALF_OPEN_UNIT, "beta2": HALF_OPEN_UNIT, "eps": POSITIVE,
            "weight_decay": NONNEGATIVE, "reject_factor": OPEN_UNIT}  # fmt: skip

    def __init__(self, net, loss, *, seed: int = 0, **hparams):
        super().__init__(net, loss, seed=seed, **hparams)
        self.m = [np.zeros_like(W) for W in net.params]
        self.v = [np.zeros_like(W) for W in net.params]
        self.t = 0
        self.lr_scale = 1.0

    def step(self, X, Y) -> dict:
        hp = self.hparams
        b1, b2, eps, wd = float(hp["beta1"]), float(hp["beta2"]), float(hp["eps"]), float(hp["weight_decay"])
        lr = float(hp["lr"]) * self.lr_scale
        t = self.t + 1
        with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
            loss0, grads, _ = self.net.loss_and_grads(X, Y, self.loss)
            if wd:
                grads = [G + wd * W for G, W in zip(grads, self.net.params)]
            m_new = [b1 * m + (1 - b1) * G for m, G in zip(self.m, grads)]
            v_new = [b2 * v + (1 - b2) * G * G for v, G in zip(self.v, grads)]
            c1, c2 = 1 - b1**t, 1 - b2**t
            deltas = [-lr * (m / c1) / (np.sqrt(v / c2) + eps) for m, v in zip(m_new, v_new)]
        accepted, new_loss = self.apply_update(deltas, X, Y)
        if accepted:
            self.m, self.v, self.t = m_new, v_new, t
        else:
            self.lr_scale *= float(hp["reject_factor"])
        self.iteration += 1
        return {"loss": new_loss if accepted else loss0, "loss_before": loss0, "accepted": accepted, "lr": lr}

    def extra_state(self) -> dict:
        return {
            "m": [a.copy() for a in self.m],
            "v": [a.copy() for a in self.v],
            "t": int(self.t),
            "lr_scale": float(self.lr_scale),
        }

    def load_extra_state(self, state: dict) -> None:
        self.m = [np.array(a, dtype=np.float64) for a in state["m"]]
        self.v = [np.array(a, dtype=np.float64) for a in state["v"]]
        self.t = int(state["t"])
        self.lr_scale = float(state["lr_scale"])
