"""kronlin.torch.KFAC against curvlinops' KFACLinearOperator / KFACInverseLinearOperator (not a unit test).

Same model, batch and damping; checks first (factors and preconditioned
gradients agree to 1e-10 in float64), then times, one thread, paired in one run.

Recipe (curvlinops' torchvision requirement would pull a second torch, so no
dependencies are resolved by pip)::

    pip install torch==2.13.0 && pip install -e '.[test]'
    pip install --no-deps curvlinops-for-pytorch backpack-for-pytorch einops opt-einsum tqdm \\
        linear-operator einconv
    python bench/torch_vs_curvlinops.py [--out bench/results/torch_vs_curvlinops.md]

Correspondences (curvlinops 3.0.1):

* ``fisher="empirical"`` ↔ ``fisher_type="empirical"``; ``fisher="mc"`` ↔ the
  empirical type fed with kronlin's sampled labels (``pre.sampled_targets``),
  so both use the *same* labels (curvlinops' own "mc" draws its own);
* ``damping_mode="exact"`` ↔ ``use_exact_damping=True``;
  ``damping_mode="factored"`` ↔ ``use_heuristic_damping=True`` (π from the
  trace norm, γ = √λ);
* ``separate_weight_and_bias=False``, ``kfac_approx="expand"``.

Timed, per step of a training loop (median of ``--repeat``): the plain
forward + backward (the SGD step's work); kronlin.torch: forward + backward +
``pre.step()`` (factors from the hooks, inversion, application); curvlinops:
forward + backward for the gradient, then ``KFACLinearOperator`` (its own
forward + backward and factors), ``KFACInverseLinearOperator`` and ``inv @ grad``.
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import time

import numpy as np
import torch
from torch import nn
import torch.nn.functional as F
from threadpoolctl import threadpool_limits

import kronlin.torch as kt


def models(dtype):
    torch.manual_seed(0)
    mlp = nn.Sequential(nn.Linear(256, 256), nn.Tanh(), nn.Linear(256, 256), nn.Tanh(), nn.Linear(256, 10))
    cnn = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 32, 3, stride=2, padding=1), nn.ReLU(),
                        nn.Flatten(), nn.Linear(32 * 8 * 8, 10))
    wide = nn.Sequential(nn.Linear(784, 512), nn.ReLU(), nn.Linear(512, 512), nn.ReLU(), nn.Linear(512, 10))
    return {"MLP 256-256-256-10": (mlp.to(dtype), (256,)), "CNN 3x16x16": (cnn.to(dtype), (3, 16, 16)),
            "MLP 784-512-512-10": (wide.to(dtype), (784,))}


def fwd_bwd(model, x, y):
    model.zero_grad(set_to_none=True)
    F.cross_entropy(model(x), y).backward()
    return [p.grad.detach().clone() for p in model.parameters()]


def kronlin_step(model, x, y, fisher, mode, lam):
    pre = kt.KFAC(model, damping=lam, damping_mode=mode, fisher=fisher, loss="cross_entropy", seed=1)
    grads = fwd_bwd(model, x, y)
    pre.step()
    out = [p.grad.detach().clone() for p in model.parameters()]
    labels = pre.sampled_targets if fisher == "mc" else y
    factors = [pre.factors(m) for m in model if isinstance(m, (nn.Linear, nn.Conv2d))]
    pre.remove_hooks()
    return grads, out, labels, factors, pre


def curvlinops_step(model, x, labels, grads, mode, lam):
    from curvlinops import KFACInverseLinearOperator, KFACLinearOperator

    params = [p for p in model.parameters()]
    K = KFACLinearOperator(model, nn.CrossEntropyLoss(), params, [(x, labels)], fisher_type="empirical",
                           separate_weight_and_bias=False, check_deterministic=False, num_data=x.shape[0],
                           num_per_example_loss_terms=1)
    K.compute_kronecker_factors()
    kw = {"use_exact_damping": True} if mode == "exact" else {"use_heuristic_damping": True}
    inv = KFACInverseLinearOperator(K, damping=lam, **kw)
    out = inv @ [g.clone() for g in grads]
    return K, out


def rel(a, b):
    a, b = a.double(), b.double()
    return float((a - b).abs().max() / b.abs().max())


def agreement(dtype=torch.float64, N=64, lam=1e-2):
    rows = []
    for name, (model, shape) in models(dtype).items():
        g = torch.Generator().manual_seed(2)
        x = torch.randn((N,) + shape, generator=g, dtype=dtype)
        y = torch.randint(0, 10, (N,), generator=g)
        for fisher in ("empirical", "mc"):
            for mode in ("exact", "factored"):
                state = {k: v.clone() for k, v in model.state_dict().items()}
                grads, ours, labels, factors, _ = kronlin_step(model, x, y, fisher, mode, lam)
                model.load_state_dict(state)
                K, theirs = curvlinops_step(model, x, labels, grads, mode, lam)
                mods = [n for n, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
                fa = max(rel(A, K._input_covariances[n]) for (A, _), n in zip(factors, mods))
                fg = max(rel(G, K._gradient_covariances[n]) for (_, G), n in zip(factors, mods))
                sol = max(rel(a, b) for a, b in zip(ours, theirs))
                rows.append((name, fisher, mode, fa, fg, sol))
    return rows


def _blas() -> str:
    from threadpoolctl import threadpool_info

    return ", ".join(f"{i.get('internal_api')} {i.get('version')} ({i.get('architecture')})"
                     for i in threadpool_info() if i.get("user_api") == "blas") or "unknown"


def median_time(fn, repeat):
    fn()  # warm-up
    ts = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    return statistics.median(ts)


def timing(dtype, N, lam, repeat):
    """Per model and damping mode, paired rounds (each runs every route once, in a shuffled order): the plain
    forward + backward, kronlin.torch with its running average (``max_decay=0.95``, the default), kronlin.torch
    with one batch's factors (``max_decay=0``: what curvlinops computes) and curvlinops.  Returns medians and
    the median over rounds of each K-FAC part's ratio to curvlinops'."""
    from _harness import shuffled_rounds

    rows = []
    for name, (model, shape) in models(dtype).items():
        g = torch.Generator().manual_seed(3)
        x = torch.randn((N,) + shape, generator=g, dtype=dtype)
        y = torch.randint(0, 10, (N,), generator=g)
        for mode in ("exact", "factored"):
            copies = {k: copy.deepcopy(model) for k in ("avg", "one")}  # one preconditioner's hooks per model
            pres = {k: kt.KFAC(copies[k], damping=lam, damping_mode=mode, max_decay=d)
                    for k, d in (("avg", 0.95), ("one", 0.0))}

            def ours(k):
                def run():
                    fwd_bwd(copies[k], x, y)
                    pres[k].step()
                return run

            def theirs():
                grads = fwd_bwd(model, x, y)
                curvlinops_step(model, x, y, grads, mode, lam)

            t = shuffled_rounds({"sgd": lambda: fwd_bwd(model, x, y), "avg": ours("avg"), "one": ours("one"),
                                 "theirs": theirs}, repeat, warmup=1)
            part = {k: [a - s for a, s in zip(t[k], t["sgd"])] for k in ("avg", "one", "theirs")}
            speed = {k: statistics.median(c / o for c, o in zip(part["theirs"], part[k])) for k in ("avg", "one")}
            rows.append((name, mode, *(statistics.median(t[k]) for k in ("sgd", "avg", "one", "theirs")),
                         speed["avg"], speed["one"]))
            for pre in pres.values():
                pre.remove_hooks()
    return rows


def overhead(repeat, refresh=10, N=256, sizes=(784, 512, 512, 10), lam=1e-2):
    """KFAC's amortised step (factored damping, refresh every ``refresh``) against SGD and its GEMM floor.

    The floor is the SGD step plus, layer by layer, the bare calls K-FAC cannot avoid, timed in
    the same run (NumPy/SciPy, the libraries kronlin computes with): the statistics ``āᵀā`` and
    ``ĝᵀĝ`` (two GEMMs), the preconditioner product ``G⁻¹ V A⁻¹`` (two GEMMs) and 1/refresh of
    the refresh (LAPACK ``potrf`` + ``potri`` of both damped factors).  float32, batch N, one thread.

    Two K-FAC figures, each paired with the floor round by round:

    * ``steady``: one preconditioner trained past its first refreshes, timed over blocks of ``refresh``
      steps that each hold exactly one refresh (the amortised step of a training run);
    * ``fresh``: a new preconditioner's first ``refresh`` steps (its first update is one batch's
      statistics, inverted from the rows where a layer is wider than the batch, and that inverse is
      applied for the whole block).
    """
    import copy as _copy

    import scipy.linalg as sl

    from _harness import torch_mlp_task, torch_trainer

    model_sgd, batches = torch_mlp_task(sizes, N, batch_seed=4)

    def trainer(model, pre):
        return torch_trainer(model, pre, batches)

    def kfac(model):
        return kt.KFAC(model, damping=lam, damping_mode="factored", refresh_period=refresh)

    load = os.getloadavg()
    sgd = trainer(model_sgd, None)
    model_steady = _copy.deepcopy(model_sgd)
    steady = trainer(model_steady, kfac(model_steady))
    steady(3 * refresh)  # past the first refreshes: the averages are full-rank, the inverses potrf + potri
    model_fresh = _copy.deepcopy(model_sgd)
    sgd(5)
    rng = np.random.default_rng(0)
    potrf, potri = sl.lapack.get_lapack_funcs(("potrf", "potri"), (np.ones((2, 2), np.float32),))
    work = []
    for d_in, d_out in zip(sizes, sizes[1:]):
        p, q = d_in + 1, d_out
        a = rng.standard_normal((N, p), dtype=np.float32)
        e = rng.standard_normal((N, q), dtype=np.float32)
        A, G = a.T @ a / N + np.eye(p, dtype=np.float32), e.T @ e / N + np.eye(q, dtype=np.float32)
        Ai, Gi = np.linalg.inv(A), np.linalg.inv(G)
        V = rng.standard_normal((q, p), dtype=np.float32)
        work.append((lambda a=a, e=e: (a.T @ a, e.T @ e), lambda Gi=Gi, V=V, Ai=Ai: Gi @ V @ Ai,
                     lambda A=A, G=G: (potri(potrf(A, lower=1)[0], lower=1), potri(potrf(G, lower=1)[0], lower=1))))

    def fresh():
        pre = kfac(model_fresh)
        try:
            return trainer(model_fresh, pre)(refresh)
        finally:
            pre.remove_hooks()

    # paired: every round times SGD and the floor's parts, the steady K-FAC block and a fresh K-FAC block, in an
    # order that rotates; the figures are medians over rounds of K-FAC / floor (the machine's load moves)
    rounds = {k: [] for k in ("sgd", "stats", "apply", "refresh_amortised", "steady", "fresh")}
    for r in range(repeat):
        order = ("floor", "steady", "fresh")
        for what in order[r % 3:] + order[:r % 3]:
            if what == "floor":
                rounds["sgd"].append(sgd(refresh))
                rounds["stats"].append(sum(median_time(w[0], 5) for w in work))
                rounds["apply"].append(sum(median_time(w[1], 5) for w in work))
                rounds["refresh_amortised"].append(sum(median_time(w[2], 3) for w in work) / refresh)
            else:
                rounds[what].append(steady(refresh) if what == "steady" else fresh())
    floors = [sum(rounds[k][r] for k in ("sgd", "stats", "apply", "refresh_amortised")) for r in range(repeat)]
    med = {k: statistics.median(v) for k, v in rounds.items()}
    out = {"sizes": sizes, "N": N, "refresh": refresh, "load": load[0], "floor": statistics.median(floors), **med}
    for k in ("steady", "fresh"):
        ratios = [t / f for t, f in zip(rounds[k], floors)]
        out[k + "_ratio"], out[k + "_range"] = statistics.median(ratios), (min(ratios), max(ratios))
        out[k + "_sgd"] = statistics.median(t / s for t, s in zip(rounds[k], rounds["sgd"]))
    return out


def mse_ratio(C=5, N=32):
    """curvlinops' empirical G over kronlin.torch's for a mean-reduced MSE (C outputs): C (see the README)."""
    from curvlinops import KFACLinearOperator

    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, C)).double()
    x, y = torch.randn(N, 8, dtype=torch.float64), torch.randn(N, C, dtype=torch.float64)
    pre = kt.KFAC(m, damping=1e-2)
    F.mse_loss(m(x), y).backward()
    pre.step()
    K = KFACLinearOperator(m, nn.MSELoss(), list(m.parameters()), [(x, y)], fisher_type="empirical",
                           separate_weight_and_bias=False, check_deterministic=False, num_data=N,
                           num_per_example_loss_terms=1)
    K.compute_kronecker_factors()
    ratios = torch.cat([(K._gradient_covariances[n] / pre.factors(mod)[1]).flatten() for n, mod in (("0", m[0]), ("2", m[2]))])
    dA = max(rel(pre.factors(mod)[0], K._input_covariances[n]) for n, mod in (("0", m[0]), ("2", m[2])))
    return C, float(ratios.min()), float(ratios.max()), dA


def agreement_lines(lam):
    agree = agreement(lam=lam)
    lines = ["## Agreement (float64, batch 64): max relative error", "",
             "| model | fisher | damping | A | G | preconditioned gradient |", "| --- | --- | --- | --- | --- | --- |"]
    lines += [f"| {m} | {f} | {d} | {a:.1e} | {g:.1e} | {s:.1e} |" for m, f, d, a, g, s in agree]
    worst = max(max(r[3:]) for r in agree)
    lines += ["", f"worst: {worst:.1e} ({'within' if worst <= 1e-10 else 'ABOVE'} 1e-10)", ""]
    C, lo, hi, dA = mse_ratio()
    lines += [f"MSE (mean-reduced, C = {C} outputs), empirical: A agrees to {dA:.1e}; curvlinops' G / kronlin.torch's G "
              f"= {lo:.12g} … {hi:.12g} (curvlinops scales the loss by √C; kronlin.torch uses ℓ_n = (1/C)‖f_n − y_n‖²)", ""]
    return lines


def timing_lines(dtype, batch, lam, repeat):
    rows = timing(dtype, batch, lam, repeat)
    lines = [f"## Time per step, {str(dtype).replace('torch.', '')}, batch {batch} (ms, medians of {repeat} paired rounds)",
             "", "| model | damping | fwd+bwd (SGD) | kronlin.torch, running average | kronlin.torch, one batch "
             "(max_decay=0) | curvlinops | kronlin speed-up, running average | kronlin speed-up, one batch |",
             "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for m, d, s, avg, one, t, sp_avg, sp_one in rows:
        lines.append(f"| {m} | {d} | {s * 1e3:.2f} | {avg * 1e3:.2f} | {one * 1e3:.2f} | {t * 1e3:.2f} | "
                     f"{sp_avg:.1f}x | {sp_one:.1f}x |")
    lines += ["", "Speed-up: curvlinops' K-FAC part over kronlin.torch's (>1: kronlin faster), the median over rounds of "
              "the per-round ratio; K-FAC part = step time − the same round's fwd+bwd: factors + inversion + "
              "application, refreshed every step (for curvlinops also its own forward+backward, which its API cannot "
              "share with the training step's). \"One batch\" computes exactly curvlinops' factors (the batch's "
              "statistics, no average), so one-batch layers with fewer rows than 0.8× a factor's order (0.4× with factored damping) are inverted "
              "from the rows (KronEigh.from_rows); \"running average\" is K-FAC §5's estimate, which curvlinops does "
              f"not keep. BLAS: {_blas()}; load average before: {os.getloadavg()[0]:.2f}.", ""]
    return lines


def overhead_lines(repeat):
    o = overhead(repeat)
    lines = [f"## Amortised K-FAC step vs SGD and its GEMM floor (MLP {'-'.join(map(str, o['sizes']))}, batch {o['N']}, "
             f"float32, factored damping, refresh every {o['refresh']})", "",
             f"Floor: SGD step {o['sgd'] * 1e3:.2f} ms + statistics {o['stats'] * 1e3:.2f} ms + preconditioner products "
             f"{o['apply'] * 1e3:.2f} ms + refresh/T {o['refresh_amortised'] * 1e3:.2f} ms = {o['floor'] * 1e3:.2f} ms "
             "(medians).", "",
             "| K-FAC | step | K-FAC / SGD | K-FAC / floor (median of paired rounds, range) |",
             "| --- | --- | --- | --- |"]
    for k, what in (("steady", f"steady state (one preconditioner, blocks of {o['refresh']} steps, one refresh each)"),
                    ("fresh", f"a fresh preconditioner's first {o['refresh']} steps")):
        lines.append(f"| {what} | {o[k] * 1e3:.2f} ms | {o[k + '_sgd']:.2f}x | **{o[k + '_ratio']:.2f}x** "
                     f"({o[k + '_range'][0]:.2f}–{o[k + '_range'][1]:.2f}) |")
    lines += ["", f"Paired: {repeat} rounds, each timing SGD with the floor's parts, the steady block and the fresh block "
              f"back to back (the order rotates); times are medians over the rounds. BLAS: {_blas()}; load average "
              f"before: {o['load']:.2f}.", ""]
    return lines


def main(argv=None):
    ap = argparse.ArgumentParser(description="kronlin.torch vs curvlinops: agreement and time")
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--repeat", type=int, default=7)
    ap.add_argument("--damping", type=float, default=1e-2)
    ap.add_argument("--quick", action="store_true", help="float32 timings only")
    ap.add_argument("--overhead-only", action="store_true", help="only the amortised-step section")
    ap.add_argument("--out", default=None, help="also write the report (markdown) here")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    lines = ["# kronlin.torch vs curvlinops", "",
             f"torch {torch.__version__}, one thread (torch.set_num_threads(1), threadpoolctl), damping λ = {args.damping}", ""]
    with threadpool_limits(1):
        if not args.overhead_only:
            import curvlinops  # noqa: F401 - fail early with the recipe's ImportError

            lines += agreement_lines(args.damping)
            for dtype in (torch.float32, torch.float64)[: 1 if args.quick else 2]:
                lines += timing_lines(dtype, args.batch, args.damping, args.repeat)
        lines += overhead_lines(args.repeat)
    report = "\n".join(lines)
    print(report)
    if args.out:
        with open(args.out, "w") as fh:
            fh.write(report + "\n")


if __name__ == "__main__":
    main()
