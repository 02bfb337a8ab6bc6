"""The main job's K-FAC step against SGD's, paired in one process (issue 13's "K-FAC step ≤ 2× SGD's").

    python bench/main_job_ratio.py             # writes bench/results/main_job_ratio.{json,md}
    python bench/main_job_ratio.py --variants  # also K-FAC §8's subsets τ₁, τ₂: time and training quality

``python -m kronlin.train compare`` trains digits-ae with K-FAC and with SGD
(Nesterov momentum) from the same weights and batches.  Timing the two runs in
separate processes, as the README's first figures did, lets the machine's load
move between them (2.0–2.8× across runs on this shared 2-core machine).  Here
both optimizers train side by side in one process: after ``WARMUP`` iterations
each, every round runs ``BLOCK`` iterations of one then of the other (the order
alternates), each on its own trajectory and batches, and the figure is the
median over rounds of the per-round ratio.  ``BLOCK`` is a multiple of K-FAC's
T₃ = T₂ = 20, so every block holds the same share of refreshes and γ trials.
One BLAS thread.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import time

import scipy.linalg  # noqa: F401  (SciPy's OpenBLAS loaded before threadpool_limits, so the limit covers it)
from threadpoolctl import threadpool_info, threadpool_limits

from kronlin.train.cli import (COMPARE_DEFAULT_STEPS, COMPARE_DEFAULT_TASK, DEFAULT_BATCH, draw_batches, make_config,
                              run_training, setup)

HERE = os.path.dirname(os.path.abspath(__file__))
OUT = os.path.join(HERE, "results", "main_job_ratio")
BLOCK = int(os.environ.get("BLOCK", "40"))
ROUNDS = int(os.environ.get("ROUNDS", "15"))
WARMUP = int(os.environ.get("WARMUP", "40"))


#: K-FAC §8's subsets (the paper's §13 experiments used τ₁ = 1/8, τ₂ = 1/4): the statistics on ⌈τ₁N⌉ examples,
#: the quadratic model's Fisher products on ⌈τ₂N⌉
VARIANTS = {"kfac τ₁=1/8": {"tau1": 0.125}, "kfac τ₂=1/4": {"tau2": 0.25},
            "kfac τ₁=1/8, τ₂=1/4": {"tau1": 0.125, "tau2": 0.25}}
SEEDS = (0, 1, 2)


def trainer(opt: str, hp=None):
    """A function running ``k`` more iterations of ``opt`` on the main job's task; returns seconds per iteration."""
    config = make_config(COMPARE_DEFAULT_TASK, opt, seed=0, batch=DEFAULT_BATCH, steps=10**9, hp=hp)
    task, net, data_rng, optimizer = setup(config)

    def run(k: int) -> float:
        t = time.perf_counter()
        for _ in range(k):
            X, Y = draw_batches(task, config["batch"], data_rng, optimizer.batches_per_step)
            optimizer.step(X, Y)
        return (time.perf_counter() - t) / k

    return run


def work_model(tau1: float = 1.0, tau2: float = 1.0) -> dict:
    """The arithmetic of one step of SGD and of K-FAC's extra parts on the main job's network, in MFLOP,
    counted from the layer shapes (``(d_out, d_in + 1)`` per layer, batch ``N``; a GEMM ``2mnk``, a Gram
    ``?syrk`` ``N·n(n+1)``, a Cholesky inverse ``n³``):

    * both: two forward passes (the gradient's and the loss at the new weights, which decides acceptance),
      the backward pass's ``g Wᵀ`` products and the weight gradients ``gᵀā``;
    * K-FAC (§5, §6.4, §7, §8): the second backward pass at sampled targets and the factor statistics
      ``āᵀā``, ``gᵀg`` (on ``⌈τ₁N⌉`` rows); one ``J v`` (a forward-mode pass: ``ā Vᵀ`` and ``dx Wᵀ`` per
      layer) per candidate proposal and one for the previous update ``δ₀`` (on ``⌈τ₂N⌉`` rows); the
      block-diagonal inverse applied per candidate (``G⁻¹ V A⁻¹``); the inverses rebuilt ``1/T₃ + 2/T₂``
      times a step (a refresh, and the two other γ candidates every ``T₂``).

    Elementwise work (activations, the losses, the checks) and Python are left out: the model is the
    ratio the GEMMs alone would give.
    """
    config = make_config(COMPARE_DEFAULT_TASK, "kfac", seed=0, batch=DEFAULT_BATCH, steps=1)
    _, net, _, opt = setup(config)
    N, hp = config["batch"], opt.hparams
    shapes = [(int(o), int(d1)) for o, d1 in net.shapes]  # (d_out, d_in + 1)
    forward = sum(2 * N * o * d1 for o, d1 in shapes)
    back_dx = sum(2 * N * o * (d1 - 1) for o, d1 in shapes[1:])
    weight_grads = sum(2 * N * o * d1 for o, d1 in shapes)
    n1, n2 = math.ceil(tau1 * N), math.ceil(tau2 * N)
    candidates = 1 + 2 / hp["T2"]
    parts = {
        "sgd step (2 forward, backward, weight gradients)": 2 * forward + back_dx + weight_grads,
        "sampled backward pass": back_dx * n1 / N,
        "factor statistics": sum(n1 * (d1 * (d1 + 1) + o * (o + 1)) for o, d1 in shapes),
        "J v products (quadratic model)": (candidates + 1) * (forward + back_dx) * n2 / N,
        "inverse applied": candidates * sum(2 * (o * o * d1 + o * d1 * d1) for o, d1 in shapes),
        "inverses rebuilt": (1 / hp["T3"] + 2 / hp["T2"]) * sum(d1**3 + o**3 for o, d1 in shapes),
    }
    parts = {k: v / 1e6 for k, v in parts.items()}
    sgd = parts["sgd step (2 forward, backward, weight gradients)"]
    return {"mflop": parts, "ratio": sum(parts.values()) / sgd}


def quality(hp_by_name: dict) -> dict:
    """The main job's 1000-iteration run of K-FAC per setting and seed: final loss, mean of the last 10%, best."""
    out = {}
    with threadpool_limits(1):
        for name, hp in hp_by_name.items():
            for seed in SEEDS:
                rec = run_training(make_config(COMPARE_DEFAULT_TASK, "kfac", seed=seed, batch=DEFAULT_BATCH,
                                               steps=COMPARE_DEFAULT_STEPS, hp=hp))  # fmt: skip
                loss = [float(v) for v in rec["loss"]]
                tail = loss[-max(1, len(loss) // 10):]
                out.setdefault(name, []).append({"seed": seed, "final": loss[-1], "tail_mean": statistics.fmean(tail),
                                                 "best": min(loss)})  # fmt: skip
    return out


def main(variants: bool = False) -> dict:
    load = os.getloadavg()
    with threadpool_limits(1):
        runs = {"kfac": trainer("kfac"), "sgd": trainer("sgd")}
        if variants:
            runs.update({name: trainer("kfac", hp) for name, hp in VARIANTS.items()})
        for run in runs.values():
            run(WARMUP)
        times = {k: [] for k in runs}
        for r in range(ROUNDS):
            names = list(runs)
            for k in names[r % len(names):] + names[:r % len(names)]:  # the order rotates
                times[k].append(runs[k](BLOCK))
        blas = [f"{i.get('internal_api')} {i.get('version')} ({i.get('architecture')})"
                for i in threadpool_info() if i.get("user_api") == "blas"]
    ratios = [a / b for a, b in zip(times["kfac"], times["sgd"])]
    variant_ratios = {k: statistics.median(a / b for a, b in zip(times[k], times["sgd"])) for k in VARIANTS if k in times}
    out = {"task": COMPARE_DEFAULT_TASK, "batch": DEFAULT_BATCH, "block": BLOCK, "rounds": ROUNDS, "warmup": WARMUP,
           "ms_per_iteration": {k: 1e3 * statistics.median(v) for k, v in times.items()},
           "ratio": statistics.median(ratios), "ratio_range": [min(ratios), max(ratios)], "ratios": ratios,
           "times": times, "blas": blas, "load_before": load, "load_after": os.getloadavg(),
           "python": platform.python_version(), "variant_ratios": variant_ratios}
    out["work_model"] = {"kfac": work_model(), **{k: work_model(**hp) for k, hp in VARIANTS.items()}}
    if variants:
        out["quality"] = quality({"kfac (τ₁ = τ₂ = 1)": {}, **VARIANTS})
    with open(OUT + ".json", "w") as fh:
        json.dump(out, fh, indent=1)
    ms = out["ms_per_iteration"]
    md = [
        "# The main job's K-FAC step against SGD's, paired in one process", "",
        f"`python bench/main_job_ratio.py`: {out['task']}, batch {out['batch']}, one BLAS thread ({', '.join(blas)}); "
        f"{WARMUP} warm-up iterations each, then {ROUNDS} rounds of {BLOCK} iterations of each optimizer (order "
        f"{'rotating' if variants else 'alternating'}); load average {load[0]:.2f} before, {out['load_after'][0]:.2f} after.", "",
        "| K-FAC ms/iteration | SGD ms/iteration | K-FAC / SGD (median of per-round ratios) | range | target |",
        "| ---: | ---: | ---: | --- | --- |",
        f"| {ms['kfac']:.2f} | {ms['sgd']:.2f} | **{out['ratio']:.2f}×** | {out['ratio_range'][0]:.2f}–"
        f"{out['ratio_range'][1]:.2f} | ≤ 2 (issue 13) |", "",
    ]
    wm = out["work_model"]
    md += ["## The arithmetic alone", "",
           "`work_model()`: one step's MFLOP counted from the layer shapes (GEMMs, Grams, Cholesky inverses; "
           "elementwise work and Python left out). The K-FAC/SGD ratio of the arithmetic is the ratio a step "
           "free of every overhead would have.", "",
           "| part | MFLOP/step |", "| --- | ---: |"]
    md += [f"| {k} | {v:.1f} |" for k, v in wm["kfac"]["mflop"].items()]
    md += ["", "| K-FAC | arithmetic K-FAC / SGD | measured K-FAC / SGD |", "| --- | ---: | ---: |",
           f"| kfac (τ₁ = τ₂ = 1) | {wm['kfac']['ratio']:.2f}× | {out['ratio']:.2f}× |"]
    md += [f"| {k} | {wm[k]['ratio']:.2f}× | {variant_ratios[k]:.2f}× |" for k in VARIANTS if k in variant_ratios]
    md.append("")
    if variants:
        md += ["## K-FAC §8's subsets", "",
               "Paired in the same rounds as the table above (every optimizer once per round, the order rotating). "
               f"Quality: `python -m kronlin.train compare`'s K-FAC run ({COMPARE_DEFAULT_STEPS} iterations, mini-batch "
               "training loss) for seeds " + ", ".join(map(str, SEEDS)) + ".", "",
               "| K-FAC | ms/iteration | / SGD (median of per-round ratios) | final loss per seed | best loss per seed |",
               "| --- | ---: | ---: | --- | --- |"]
        for name, q in out["quality"].items():
            key = "kfac" if name.startswith("kfac (") else name
            ratio = out["ratio"] if key == "kfac" else variant_ratios[key]
            md.append(f"| {name} | {ms[key]:.2f} | {ratio:.2f}× | " + " / ".join(f"{r['final']:.4g}" for r in q)
                      + " | " + " / ".join(f"{r['best']:.4g}" for r in q) + " |")
        md.append("")
    with open(OUT + ".md", "w") as fh:
        fh.write("\n".join(md))
    print("\n".join(md))
    return out


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--variants", action="store_true", help="also K-FAC §8's subsets: time and training quality")
    main(ap.parse_args().variants)
