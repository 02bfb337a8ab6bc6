"""Progress per update of K-FAC with and without its second factor, along K-FAC's trajectory (Benzing 2022, fig. 4C).

Benzing's protocol (§4.2, figure 4C, appendix D.8): train with K-FAC; at every
iteration, on the current mini-batch, compare the relative improvement of the
batch loss achieved by

* K-FAC's own update ``δ`` (here: kronlin.train's K-FAC step, with its α/μ
  re-scaling and momentum), and
* the update that drops the second Kronecker factor, per layer
  ``D_l = −∇_{W_l} h · (Ā_l + π_l γ I)⁻¹`` with K-FAC's own damping of the
  first factor (``λ_A = π_l γ``, π_l from the trace norm of the *real* ``Ā_l``
  and ``G_l``, D.8), rescaled per layer to the norm of K-FAC's update,
  ``‖D_l‖ = ‖δ_l‖`` ("we scale the FOOF update to have the same norm as the
  KFAC update at each layer").

The relative improvement of an update ``u`` is ``(h_b(θ) − h_b(θ + u)) / h_b(θ)``
on the batch ``b`` the step was computed on.  K-FAC follows its own
trajectory; the second-factor-free update is only evaluated, never taken.

K-FAC's step ``δ = αΔ + μδ₀`` carries momentum, which the second-factor-free
direction does not; so the pair is also compared without it: K-FAC's
re-scaled proposal ``αΔ`` (``Δ = −F̆⁻¹∇h``, :meth:`KFAC.precondition`) against
the second-factor-free direction rescaled to ``αΔ``'s layer norms (columns
``*_no_momentum``).

Only public names of kronlin are used (the factors and γ of the inverse in use
are :attr:`KFAC.factors` and :attr:`KFAC.gamma`).  Run from the repository root::

    python bench/_repro_progress.py --task digits-ae --steps 200 --out progress.json
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np

from kronlin import Kron, pi_factor
from kronlin.train.cli import draw_batches, make_config, setup

__all__ = ["first_factor_update", "relative_improvement", "run_progress"]


def first_factor_update(grads, factors, gamma: float, like) -> list:
    """Per layer ``−∇W (Ā + πγI)⁻¹`` (D.8), rescaled to the norm of ``like`` (K-FAC's update), layer by layer."""
    out = []
    for V, A, G, d in zip(grads, factors["A_diag"], factors["G_diag"], like):
        p = A.shape[0]
        lam_A = float(pi_factor(A, G, norm="trace")) * gamma
        D = -Kron(A + lam_A * np.eye(p), np.eye(V.shape[0])).solve(V)  # ∇W (Ā + λ_A I)⁻¹, Ā symmetric
        nD, nd = np.linalg.norm(D), np.linalg.norm(d)
        out.append(D * (nd / nD) if nD > 0 else D)
    return out


def relative_improvement(opt, X, Y, theta, update) -> float:
    """``(h_b(θ) − h_b(θ + u)) / h_b(θ)`` with ``h = ℓ + (η/2)‖θ‖²`` on the batch ``(X, Y)``."""
    eta = float(opt.hparams.get("eta", 0.0))

    def h(params):
        sq = sum(float(np.vdot(W, W)) for W in params)
        return opt.net.loss(X, Y, opt.loss, params) + 0.5 * eta * sq

    h0 = h(theta)
    return (h0 - h([W + U for W, U in zip(theta, update)])) / h0


def run_progress(task: str, seed: int, *, steps: int, batch: int, hp=None, every: int = 1, out_path=None) -> dict:
    """Follow K-FAC for ``steps`` iterations; every ``every``-th one, both relative improvements."""
    config = make_config(task, "kfac", seed=seed, batch=batch, steps=steps, hp=hp or {})
    task_obj, net, data_rng, opt = setup(config)
    rows = {"step": [], "kfac": [], "no_second_factor": [], "kfac_no_momentum": [],
            "no_second_factor_no_momentum": [], "loss": []}  # fmt: skip
    t0 = time.perf_counter()
    for k in range(1, steps + 1):
        X, Y = draw_batches(task_obj, batch, data_rng)
        theta = net.copy_params()
        info = opt.step(X, Y)
        if k % every or not info.get("accepted", True):
            continue
        delta = [W1 - W0 for W1, W0 in zip(net.params, theta)]
        _, grads, _ = net.loss_and_grads(X, Y, opt.loss, theta)
        eta = float(opt.hparams["eta"])
        grads = [G + eta * W for G, W in zip(grads, theta)]
        # the factors and γ of the inverse the step used (a refresh or a γ change happens inside step())
        D = first_factor_update(grads, opt.factors, opt.gamma, delta)
        proposal = [info["alpha"] * U for U in opt.precondition(grads)]  # αΔ: the step without momentum
        D0 = first_factor_update(grads, opt.factors, opt.gamma, proposal)
        rows["step"].append(k)
        rows["kfac"].append(relative_improvement(opt, X, Y, theta, delta))
        rows["no_second_factor"].append(relative_improvement(opt, X, Y, theta, D))
        rows["kfac_no_momentum"].append(relative_improvement(opt, X, Y, theta, proposal))
        rows["no_second_factor_no_momentum"].append(relative_improvement(opt, X, Y, theta, D0))
        rows["loss"].append(float(info["loss"]))
    rec = {"task": task, "seed": seed, "steps": steps, "batch": batch, "hp": dict(hp or {}), "every": every,
           "seconds": time.perf_counter() - t0, **rows}  # fmt: skip
    if out_path is not None:
        with open(out_path, "w") as f:
            json.dump(rec, f)
    return rec


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--task", default="digits-ae")
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--every", type=int, default=1)
    ap.add_argument("--out", default=None)
    a = ap.parse_args(argv)
    rec = run_progress(a.task, a.seed, steps=a.steps, batch=a.batch, every=a.every, out_path=a.out)
    for suffix in ("", "_no_momentum"):
        k, f = np.array(rec["kfac" + suffix]), np.array(rec["no_second_factor" + suffix])
        print(f"{len(k)} steps{suffix.replace('_', ' ')}: K-FAC median relative improvement {np.median(k):.4g}, "
              f"without the second factor {np.median(f):.4g}; the latter better on {np.mean(f > k):.0%} of the steps")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
