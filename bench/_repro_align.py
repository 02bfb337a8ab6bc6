"""Alignment of approximate Gauss-Newton updates with the exact block-diagonal one (Botev et al. 2017, F.2).

The experiment of Botev, Ritter & Barber 2017 (*Practical Gauss-Newton
Optimisation for Deep Learning*), appendix F.2, figures 5-7 (a): follow ONE
training trajectory (KFRA's own run, registry name ``"kfra"``, with its
default factored damping, i.e. the paper's KFRA*) and, at a few checkpoints,
take a probe mini-batch and compare per layer λ, by cosine similarity, the
update proposed by each approximate curvature model,

    δ̃_λ = −C̃_λ⁻¹ ∇_{W_λ} f,      C̃_λ = Q̃_λ ⊗ G̃_λ + k I        (appendix B.1, eqs. 34-35),

with the exact damped block-diagonal Gauss-Newton update ``−(G_λλ + k I)⁻¹ ∇_{W_λ} f``,
where ``G_λλ = (1/N) Σ_n J_nᵀ H_n J_n`` restricted to layer λ (built densely
here; the paper used conjugate gradients per layer).  The curvature models
are K-FAC (``G̃`` from one backward pass with targets sampled from the model,
K-FAC §5), KFRA (Botev appendix G) and KFLR (Botev §3), each inverted exactly
(eq. 35) and with the approximate factored inversion of eq. (36),
``(Q̃ + ω√k I) ⊗ (G̃ + ω⁻¹√k I)`` with ω from the trace norm (eq. 38), marked
``*``.  Every method uses the same damping ``k = γ + η`` (the KFRA
optimizer's current one), the same gradient of ``f = ℓ + (η/2)‖θ‖²`` and the
same probe batch, so the curvature models are compared like with like.  The
plain negative gradient (``"sgd"``) is a baseline row: how much any curvature
model helps.

Only dense layers are supported.  Run from the repository root, e.g.::

    python bench/_repro_align.py --task digits-ae --steps 200 --at 0 50 200 --out align.json
"""

from __future__ import annotations

import argparse
import math
import time

import numpy as np
import scipy.linalg

from kronlin import BlockDiagInverse, FactorEstimator, Kron
from kronlin.train import Dense
from kronlin.train.optim.kfra import input_factors, kflr_factors, kfra_factors

__all__ = ["CHUNK_ENTRIES", "METHODS", "alignment", "dense_gn_block", "probe_factors", "run_alignment"]

METHODS = ("kfac", "kfra", "kflr")

#: Budget (float64 entries) of the per-chunk temporaries of :func:`dense_gn_block`.
CHUNK_ENTRIES = 1 << 24


def dense_gn_block(net, trace, loss, layer: int) -> np.ndarray:
    """The exact Gauss-Newton block ``(1/N) Σ_n J_nᵀ H_n J_n`` of one dense layer, ``(d, d)``.

    ``d = d_out·(d_in+1)``, flattened row-major like ``net.params[layer].ravel()``.
    With ``B_n = ∂out_n/∂s_layer`` (``k × d_out``; column ``i`` is ``net.jvp``
    of the direction that is zero except the bias entry ``[i, -1]``, whose
    pre-activation tangent is ``e_i`` for every example) and ``M_n = B_nᵀ H_n B_n``,

        G[(i, a), (j, b)] = (1/N) Σ_n M_n[i, j] ā_n[a] ā_n[b],

    one GEMM ``(d_out², N) @ (N, (d_in+1)²)`` accumulated over chunks of
    examples (no per-chunk temporary above :data:`CHUNK_ENTRIES` entries),
    then the axes are permuted ``(i, j, a, b) → (i, a, j, b)``.  Costs
    ``d_out`` forward-mode passes and ``O(N d²)`` flops instead of ``d`` full
    ``gn_vp`` passes.
    """
    L = net.layers[layer]
    if not isinstance(L, Dense):
        raise ValueError(f"dense_gn_block: layer {layer} is {type(L).__name__}; only Dense layers are supported")
    (N, k), (m, p) = trace.out.shape, net.params[layer].shape
    V = [np.zeros(shp) for shp in net.shapes]
    step = max(1, CHUNK_ENTRIES // max(k * m, m * m, p * p))
    acc = np.zeros((m * m, p * p))
    for n0 in range(0, N, step):
        sl = slice(n0, min(n0 + step, N))
        sub = trace.rows(sl)  # the examples sl (copied once per chunk)
        B = np.empty((m,) + sub.out.shape)  # B[i, n] = B_n e_i
        HB = np.empty_like(B)
        for i in range(m):
            V[layer][i, -1] = 1.0
            B[i] = net.jvp(sub, V)
            V[layer][i, -1] = 0.0
            HB[i] = loss.hvp(sub.out, B[i])
        M = np.matmul(B.transpose(1, 0, 2), HB.transpose(1, 2, 0))  # (n, m, m)
        a = sub.a[layer]
        acc += M.reshape(len(a), m * m).T @ (a[:, :, None] * a[:, None, :]).reshape(len(a), p * p)
    acc /= N
    G = acc.reshape(m, m, p, p).transpose(0, 2, 1, 3).reshape(m * p, m * p)
    del acc
    G += G.T
    G *= 0.5
    return G


def _kfac_factors(net, loss, trace, rng) -> list:
    """K-FAC's batch statistics: ``(Ā, G)`` per layer from one sampled backward pass (K-FAC §5).

    Exactly what ``KFAC._observe`` feeds a fresh :class:`kronlin.FactorEstimator`
    for a dense layer; its first update is the pure batch statistic.
    """
    g = net.backward(trace, loss.grad(trace.out, loss.sample(trace.out, rng)))
    out = []
    for i, L in enumerate(net.layers):
        if not isinstance(L, Dense):
            raise ValueError(f"probe_factors: layer {i} is {type(L).__name__}; only Dense layers are supported")
        est = FactorEstimator(max_decay=0.95, tridiagonal=False, append_one=False).update([trace.a[i]], [g[i]])
        out.append((est.A_diag[0], est.G_diag[0]))
    return out


def probe_factors(net, loss, trace, rng, methods=METHODS) -> dict:
    """``{method: [(Q̃_λ, G̃_λ) per layer]}`` on one batch for ``"kfac"``, ``"kfra"``, ``"kflr"``.

    ``Q̃ = (1/N) Σ_n ā āᵀ`` (:func:`input_factors`) for KFRA and KFLR; K-FAC's
    pair comes from its own estimator (whose ``Ā`` is the same matrix), with
    ``G`` from targets sampled by ``rng``.
    """
    bad = [m for m in methods if m not in METHODS]
    if bad:
        raise ValueError(f"unknown methods {bad}; choose from {METHODS}")
    Q = input_factors(trace)
    make = {"kfra": lambda: kfra_factors(net, loss, trace), "kflr": lambda: kflr_factors(net, loss, trace)}
    return {m: _kfac_factors(net, loss, trace, rng) if m == "kfac" else list(zip(Q, make[m]())) for m in methods}


def _cosine(u, v) -> float:
    u, v = u.ravel(), v.ravel()
    return float(u @ v / (np.linalg.norm(u) * np.linalg.norm(v)))


def alignment(net, loss, X, Y, *, k: float, eta: float, layers, rng, methods=METHODS, return_updates=False) -> dict:
    """Cosines of the approximate updates with the exact damped block-diagonal GN update, per layer.

    On the probe batch ``(X, Y)``: ``∇ = ∇ℓ + ηθ``; per layer λ in ``layers``
    the reference ``−(G_λλ + kI)⁻¹ vec(∇_λ)`` (Cholesky of the dense
    :func:`dense_gn_block`) and, per method ``m``, ``−(Q̃⊗G̃ + kI)⁻¹ ∇_λ`` (key
    ``m``, eq. 35, :meth:`kronlin.KronEigh.solve`) and the factored
    ``−((Q̃ + ω√k I) ⊗ (G̃ + ω⁻¹√k I))⁻¹ ∇_λ`` (key ``m + "*"``, eq. 36, trace-norm
    ω, :class:`kronlin.BlockDiagInverse`), plus ``"sgd"`` (``−∇_λ``).

    Returns ``{"cosine": {variant: [cos per layer]}, "grad_norm": [‖∇_λ‖],
    "seconds": {"factors", "block", "solves"}}`` and, with ``return_updates``,
    ``"updates": {variant or "exact": [weight-shaped arrays]}``.
    """
    t0 = time.perf_counter()
    _, grads, trace = net.loss_and_grads(X, Y, loss)
    grads = [G + eta * W for G, W in zip(grads, net.params)]
    facs = probe_factors(net, loss, trace, rng, methods)
    secs = {"factors": time.perf_counter() - t0, "block": 0.0, "solves": 0.0}
    names = ["sgd"] + [v for m in methods for v in (m, m + "*")]
    ups = {v: [] for v in ["exact"] + names}
    for li in layers:
        t0 = time.perf_counter()
        C = dense_gn_block(net, trace, loss, li)
        t1 = time.perf_counter()
        C.flat[:: len(C) + 1] += k
        g = grads[li]
        x = scipy.linalg.cho_solve(scipy.linalg.cho_factor(C, overwrite_a=True, check_finite=False), g.ravel())
        ups["exact"].append(-x.reshape(g.shape))
        del C
        ups["sgd"].append(-g)
        for m in methods:
            Qm, Gm = facs[m][li]
            ups[m].append(-Kron(Qm, Gm).eigh().solve(g, damping=k))
            ups[m + "*"].append(-BlockDiagInverse([Qm], [Gm], gamma=math.sqrt(k), pi="trace").apply([g])[0])
        secs["block"] += t1 - t0
        secs["solves"] += time.perf_counter() - t1
    out = {"cosine": {v: [_cosine(u, e) for u, e in zip(ups[v], ups["exact"])] for v in names},
           "grad_norm": [float(np.linalg.norm(grads[li])) for li in layers], "seconds": secs}  # fmt: skip
    if return_updates:
        out["updates"] = ups
    return out


def run_alignment(task_name: str, seed: int = 0, *, steps: int, batch: int = 256, probe_batch: int = 1000, at=(0,),
                  max_params: int = 5200, methods=METHODS, out_path=None) -> dict:  # fmt: skip
    """Botev F.2 along the KFRA trajectory: :func:`alignment` after ``it`` steps for every ``it`` in ``at``.

    KFRA runs ``steps`` iterations with registry defaults (batch ``batch``,
    seed ``seed``, as ``python -m kronlin.train``); before iteration ``it``
    (``0 ≤ it ≤ steps``) the probe batch ``task.sample_batch(probe_batch,
    default_rng(10_000 + it))`` is measured with ``k = γ + η`` of the optimizer
    then, over the dense layers with at most ``max_params`` weights (bias
    included), K-FAC's targets drawn by ``default_rng(20_000 + it)``.  One
    BLAS thread throughout.  Writes the record to ``out_path`` (if given) and
    returns ``{"task", "seed", "trajectory", "steps", "batch", "probe_batch",
    "methods", "layers", "layer_shapes", "checkpoints": [{"iteration",
    "damping", "gamma", "seconds", "seconds_by_part", "grad_norm", "cosine"}]}``.
    """
    from threadpoolctl import threadpool_limits

    from kronlin.train.cli import setup, make_config, write_json

    at = sorted({int(it) for it in at})
    if at and not 0 <= at[0] <= at[-1] <= steps:
        raise ValueError(f"checkpoints must lie in [0, steps={steps}]; got {at}")
    with threadpool_limits(1):
        task, net, data_rng, opt = setup(make_config(task_name, "kfra", seed=seed, batch=batch, steps=steps))
        dense = [i for i, L in enumerate(net.layers) if isinstance(L, Dense)]
        layers = [i for i in dense if net.params[i].size <= max_params]
        if not layers:
            raise ValueError(f"no dense layer of {task_name} has at most max_params={max_params} weights")
        rec = {"task": task_name, "seed": int(seed), "trajectory": "kfra", "steps": int(steps), "batch": int(batch),
               "probe_batch": int(probe_batch), "methods": list(methods), "layers": layers,
               "layer_shapes": [list(net.params[i].shape) for i in layers], "checkpoints": []}  # fmt: skip
        for it in range(steps + 1):
            if it in at:
                t0 = time.perf_counter()
                X, Y = task.sample_batch(probe_batch, np.random.default_rng(10_000 + it))
                k = float(opt.block_damping)
                res = alignment(net, task.loss, X, Y, k=k, eta=opt.hparams["eta"], layers=layers,
                                rng=np.random.default_rng(20_000 + it), methods=methods)  # fmt: skip
                rec["checkpoints"].append({"iteration": it, "damping": k, "gamma": float(opt.gamma),
                                           "seconds": time.perf_counter() - t0, "seconds_by_part": res["seconds"],
                                           "grad_norm": res["grad_norm"], "cosine": res["cosine"]})  # fmt: skip
            if it < steps:
                opt.step(*task.sample_batch(batch, data_rng))
    if out_path is not None:
        write_json(out_path, rec)
    return rec


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--task", default="digits-ae")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--probe-batch", type=int, default=1000)
    p.add_argument("--at", type=int, nargs="+", default=[0])
    p.add_argument("--max-params", type=int, default=5200)
    p.add_argument("--methods", nargs="+", default=list(METHODS))
    p.add_argument("--out", required=True)
    a = p.parse_args(argv)
    rec = run_alignment(a.task, a.seed, steps=a.steps, batch=a.batch, probe_batch=a.probe_batch, at=a.at,
                        max_params=a.max_params, methods=tuple(a.methods), out_path=a.out)  # fmt: skip
    for c in rec["checkpoints"]:
        print(f"iteration {c['iteration']} ({c['seconds']:.1f} s), layers {rec['layers']}:")
        for v, cos in c["cosine"].items():
            print(f"  {v:6s} " + " ".join(f"{x:6.3f}" for x in cos))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
