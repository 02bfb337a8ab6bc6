"""Subsampled natural gradient through the Woodbury identity (Benzing 2022, app. I).

Registry name ``"ngd"``.  On a mini-batch of ``N`` inputs the Fisher (= the
Gauss-Newton matrix for the canonical-link losses of :mod:`..losses`) is

    F = scale · Σ_c vec(g_c) vec(g_c)ᵀ,

with per-example gradients ``g_c = J_nᵀ e_c`` of rank ``M = N·S``, and the step

    δ = −η (λI + F)⁻¹ ∇h

is computed exactly by :class:`kronlin.WoodburyFisher` (eq. 20–23) from the
layer inputs ``ā`` (``trace.a``, with the homogeneous 1; ``(N, T, d)`` patches
for convolutions, whose weight sharing WoodburyFisher handles) and the
back-propagated errors — no per-example gradient is ever formed.

The errors (``labels``):

* ``"mc"`` (default) — ``S = samples`` labels drawn from the model's predictive
  distribution per input (K-FAC §5's sampled targets; appendix I.2's MC Fisher),
  ``e = ∂ℓ(out_n, y_s)/∂out_n`` back-propagated in one batched pass;
  ``scale = 1/(N·S)``;
* ``"full"`` — the exact Fisher over all classes/outputs: the ``r`` columns of
  the loss's Hessian factor ``C`` (``C Cᵀ = H_n``, e.g. ``√p_c``-weighted for
  softmax) back-propagated as a stack ``(r, N, k)`` (:meth:`Net.backward`),
  so ``Σ_c e_c e_cᵀ`` is the per-example Gauss-Newton; ``scale = 1/N``.
  The Gram then has order ``N·r`` (``r = k`` outputs): fine for the 10-class
  classifiers, prohibitive for the autoencoders (``k = 64``: a 16384² Cholesky
  per step at batch 256) — use ``"mc"`` there.

Independent batches (Benzing I.5, ``independent_batch=True``): the Fisher is
estimated on one mini-batch and the gradient it preconditions on another,
drawn independently.  The training loop draws two batches of ``--batch``
examples per step (:attr:`batches_per_step` = 2) and passes them concatenated;
``step(X, Y)`` estimates the Fisher on the first ``⌈N/2⌉`` rows and the
gradient on the rest.  The reported losses are on both batches together.

Damping: λ is fixed (``adapt=False``) or follows K-FAC §6.5's
Levenberg–Marquardt rule (:func:`.kfac.levenberg_marquardt`) every ``T1``
iterations with ``ρ = (h(θ+δ) − h(θ)) / (M(δ) − M(0))`` and the model
``M(δ) = h + ∇hᵀδ + ½ δᵀ(F + λI)δ`` of the same subsampled ``F``
(``δᵀFδ`` by :meth:`WoodburyFisher.quad`, K-FAC appendix C).

Rejection: a step whose update or new loss is not finite never reaches the
weights (:meth:`Optimizer.apply_update`); λ is raised (``λ ← λ/ω₁``).  With
``reject_increase`` (default) the same happens to a finite step that raises
``h`` on its own mini-batch, ``h(θ+δ) > h(θ)`` (reduction ratio ``ρ < 0``): the
acceptance test of a trust-region / Levenberg–Marquardt method, without which λ
adapts only every ``T1`` steps.  Without it, a classifier trained to near-zero
loss has an MC Fisher that nearly vanishes along the directions of the few
examples it still gets wrong; a step ``(λI + F)⁻¹∇h`` with the small λ the rule
has reached by then can multiply the weight norm by 50 in two steps
(digits-clf at the defaults, iterations 183–186: loss 0.01 → 63, never
recovered).  Rejected steps count in ``n_rejected``.
"""

from __future__ import annotations

import math

import numpy as np

from ... import WoodburyFisher
from . import register
from .base import Optimizer, all_finite
from .hparams import NONNEGATIVE, POSITIVE, boolean, choice, integer, real
from .kfac import DAMPING_BOUNDS, _vdot, levenberg_marquardt

__all__ = ["NGD"]


class NGD(Optimizer):
    """Exact subsampled natural gradient ``δ = −η (λI + F)⁻¹ ∇h`` (Benzing 2022, app. I).

    Hyper-parameters (``defaults``):

    ``lr=1.0``              step size η
    ``lam=3.0``             (initial) damping λ; 1 diverges at first on digits-ae at batch 128,
                            10 slows the classifiers (LM lowers it only by ω₁ per T₁)
    ``adapt=True``          Levenberg–Marquardt λ (K-FAC §6.5) every ``T1`` steps
    ``T1=5``, ``omega1=None``  its period and factor (``None`` → ``(19/20)^T1``)
    ``labels="mc"``         ``"mc"`` (sampled labels) or ``"full"`` (all outputs, Hessian factor)
    ``samples=1``           sampled labels S per input (``labels="mc"``)
    ``independent_batch=False``  Benzing I.5: Fisher on the first half of the batch,
                            gradient on the second half
    ``eta=0.0``             ℓ₂ coefficient η (``(η/2)‖θ‖²`` added to the objective)
    ``reject_increase=True``  reject a step that raises the damped objective ``h`` on its own
                            batch (``ρ < 0``) and raise λ at once (see the module docstring)

    The defaults train digits-clf, digits-ae, digits-conv and curves-ae at
    batch 128–256 without divergence.
    """

    name = "ngd"
    defaults = {
        "lr": 1.0,
        "lam": 3.0,
        "adapt": True,
        "T1": 5,
        "omega1": None,
        "labels": "mc",
        "samples": 1,
        "independent_batch": False,
        "eta": 0.0,
        "reject_increase": True,
    }
    spec = {
        "lr": POSITIVE,
        "lam": POSITIVE,
        "adapt": boolean(),
        "T1": integer(1),
        "omega1": real(0, 1, low_open=True, high_open=True, optional=True),
        "labels": choice("mc", "full"),
        "samples": integer(1),
        "independent_batch": boolean(),
        "eta": NONNEGATIVE,
        "reject_increase": boolean(),
    }

    supports_distributed = True

    @property
    def batches_per_step(self) -> int:
        return 2 if self.hparams["independent_batch"] else 1

    def check_distributed(self) -> None:
        if self.hparams["independent_batch"]:
            raise ValueError(f"--distributed is not available for {self.name!r} with independent_batch=True")

    def __init__(self, net, loss, *, seed: int = 0, **hparams):
        super().__init__(net, loss, seed=seed, **hparams)
        self._validate()
        self.lam = float(self.hparams["lam"])
        self.fisher = None  # the WoodburyFisher of the last step

    @property
    def omega1(self) -> float:
        w = self.hparams["omega1"]
        return (19 / 20) ** self.hparams["T1"] if w is None else float(w)

    # ---------------------------------------------------------------- pieces
    def errors(self, trace) -> tuple[list, float]:
        """Per-layer errors ``(N, S, d_out)`` / ``(N, S, T, d_out)`` of the Fisher's columns, and its ``scale``."""
        out, N = trace.out, self._batch_size(trace)
        if self.hparams["labels"] == "full":
            dout = np.moveaxis(self.loss.hessian_factor(out), 2, 0)  # (r, N, k)
            scale = 1.0 / N
        else:
            S = int(self.hparams["samples"])
            dout = np.stack([self.loss.grad(out, self._sample(out)) for _ in range(S)])
            scale = 1.0 / (N * S)
        g = self.net.backward(trace, dout)
        return [np.moveaxis(gi, 0, 1) for gi in g], scale

    def _split(self, X, Y):
        n1 = (len(X) + 1) // 2
        return (X[:n1], Y[:n1]), (X[n1:], Y[n1:])

    def _reject(self, value, reason: str) -> dict:
        self.n_rejected += 1
        self.lam = min(self.lam / self.omega1, DAMPING_BOUNDS[1])
        return {"loss": float(value), "loss_before": float(value), "accepted": False,
                "reason": reason, "lambda": self.lam}  # fmt: skip

    # ------------------------------------------------------------------ step
    def step(self, X, Y) -> dict:
        h = self.hparams
        self.iteration += 1
        k, eta, lam, lr = self.iteration, float(h["eta"]), self.lam, float(h["lr"])
        X = np.asarray(X)
        Y = np.asarray(Y)
        with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
            if h["independent_batch"]:
                if len(X) < 2:
                    raise ValueError(f"{self.name}: independent_batch=True needs a batch of at least 2 examples")
                (Xf, Yf), (Xg, Yg) = self._split(X, Y)
                trace = self.net.forward(Xf)
                value_f = self.loss.value(trace.out, Yf)
                value_g, grads, _ = self.net.loss_and_grads(Xg, Yg, self.loss)
                value = (len(Xf) * value_f + len(Xg) * value_g) / len(X)
            else:
                value, grads, trace = self._loss_and_grads(X, Y)
        params = self.net.params
        h0 = value + 0.5 * eta * _vdot(params, params)
        if eta:
            grads = [G + eta * W for G, W in zip(grads, params)]
        acts_ok = self._all(all_finite(trace.a))  # every rank's activations (one process: these)
        if not (math.isfinite(h0) and all_finite(grads) and acts_ok):
            return self._reject(value, "non-finite loss or gradient at the current weights")
        with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
            errs, scale = self.errors(trace)
        if not self._all(all_finite(errs)):
            return self._reject(value, "non-finite curvature statistics")
        acts = list(trace.a)
        if self.dp is not None:  # the Gram couples all examples: every rank gathers the global batch's rows
            n = len(acts)
            rows = self.dp.gather_rows(acts + list(errs))
            acts, errs = rows[:n], rows[n:]
        F = WoodburyFisher(acts, errs, damping=lam, scale=scale)
        with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
            try:
                nat = F.solve(grads)
            except np.linalg.LinAlgError:
                return self._reject(value, "the damped Gram is not positive definite")
            except FloatingPointError:  # kronlin refuses a Gram that overflows instead of returning inf
                return self._reject(value, "non-finite curvature statistics")
            delta = [-lr * U for U in nat]
        if not all_finite(delta):
            return self._reject(value, "non-finite update")
        self.fisher = F
        with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
            try:
                quad = float(F.quad(delta))
            except FloatingPointError:  # uᵀFu overflows: kronlin refuses it instead of returning inf
                return self._reject(value, "non-finite update")
            dM = _vdot(grads, delta) + 0.5 * (quad + (lam + eta) * _vdot(delta, delta))
        def objective(loss_value):  # h at the weights now in the network
            return loss_value + 0.5 * eta * _vdot(self.net.params, self.net.params)

        accept = (lambda loss_value: objective(loss_value) <= h0) if h["reject_increase"] else None
        accepted, new_loss = self.apply_update(delta, X, Y, accept=accept)  # trust-region acceptance
        if not accepted:
            self.n_rejected -= 1  # counted once, by _reject
            why = "the update increased the batch objective" if np.isfinite(new_loss) else "non-finite loss after the update"
            out = self._reject(value, why)
            out["rejected_loss"] = float(new_loss)
            return out
        h1 = objective(new_loss)
        rho = (h1 - h0) / dM if dM < 0 else float("nan")
        if h["adapt"] and k % int(h["T1"]) == 0:
            lo, hi = DAMPING_BOUNDS
            self.lam = min(max(levenberg_marquardt(self.lam, rho, self.omega1), lo), hi)
        return {"loss": float(new_loss), "loss_before": float(value), "accepted": True,
                "damping": lam, "lambda": self.lam, "rho": float(rho), "model_decrease": float(dM)}  # fmt: skip

    # ------------------------------------------------------------------ state
    def extra_state(self) -> dict:
        return {"lam": float(self.lam)}

    def load_extra_state(self, state: dict) -> None:
        self._validate()
        self.lam = float(state["lam"])
        self.fisher = None


register(NGD.name, NGD)
