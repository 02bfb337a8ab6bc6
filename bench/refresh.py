"""Warm-started eigenbasis refresh against cold decompositions on recorded K-FAC trajectories (issue 13, items 2, 5).

Trajectories: ``kronlin.train``'s K-FAC with exact damping (``damping="exact"``: every refresh is a
``Kron(A, G).eigh()`` per layer, the work :meth:`kronlin.KronEigh.refresh` replaces) on

* ``curves-ae`` (the 784-200-100-50-25-12-6-…-784 autoencoder, batch 256), and
* a 6 × 1024 tanh MLP autoencoder on the same images (784-1024×6-784, batch 256).

The script drives the optimizer step by step through public names only and reads
``opt.factors`` (the frozen factors of the inverse in use): a new object means a refresh happened.
At each refresh, for every layer, in one paired round (random order):

* ``cold``: ``Kron(A, G).eigh()``;
* ``warm``: ``previous.refresh(A, G, damping=γ², rtol)`` where ``previous`` is the warm chain's last
  eigenbasis (so staleness accumulates until the bound forces a cold decomposition);
* ``shampoo``: a re-implementation of Distributed Shampoo's QR warm start (Meta's
  ``QREigendecompositionConfig``: skip when ``‖B − diag B‖_F ≤ tol‖B‖_F`` with ``B = QᵀAQ``, tolerance
  0.01, else ``max_iterations = 1`` step of ``Q ← qr(A Q)``; eigenvalues ``diag(QᵀAQ)``), its own chain.

and the preconditioned step ``(A⊗G + γ²I)⁻¹ ∇W`` on the layer's current gradient from each, compared to
the cold one (relative 2-norm difference).  Ratios are per layer per refresh ``t_warm / t_cold``
(paired); "run" ratios are ``Σ t_warm / Σ t_cold`` over the whole run (what a training run pays).

Also: a width sweep (refresh cost against width: cold ``?syevd`` via kronlin, numpy/scipy drivers,
torch.linalg.eigh as context, a kept warm refresh, Shampoo's check, and for the factored-damping inverse
``potrf + potri`` against one Newton–Schulz step from the previous inverse), plotted to
``results/refresh_width.png``.

Run from the repository root::

    python bench/refresh.py                        # -> bench/results/refresh.json, refresh.md, refresh_width.png
    python bench/refresh.py --quick                # small smoke run
    python bench/refresh.py --save-test-data tests/data/kfac_trajectory.npz   # the unit test's trajectory
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import scipy
import scipy.linalg
import threadpoolctl
from scipy.linalg import lapack

from _harness import one_thread, shuffled_rounds

import kronlin
from kronlin import Kron, KronEigh
from kronlin.train import Dense, Net, Task, get_loss, get_optimizer, load_task

BENCH = Path(__file__).resolve().parent
RESULTS = BENCH / "results"

try:  # context only
    import torch
except ImportError:  # pragma: no cover
    torch = None


# -- trajectories -----------------------------------------------------------------------------------------
def mlp_task(width=1024, depth=6, n=5000, seed=0) -> Task:
    """A ``depth`` × ``width`` tanh MLP autoencoder on the curves-ae images (sigmoid BCE)."""
    base = load_task("curves-ae", seed, n=n)
    d = base.X_train.shape[1]
    widths = [d] + [width] * depth + [d]

    def factory(rng):
        layers = [Dense(a, b, "tanh") for a, b in zip(widths[:-2], widths[1:-1])] + [Dense(widths[-2], d, "linear")]
        return Net(layers, rng, init="gaussian")

    return Task(f"mlp{depth}x{width}", base.X_train, base.X_train, get_loss("sigmoid_bce"), factory,
                f"{depth} x {width} tanh MLP autoencoder on curves-ae images")  # fmt: skip


def trajectory(task: Task, steps: int, T3: int, batch: int = 256, seed: int = 0):
    """Yield ``(iteration, A_list, G_list, grads, gamma)`` at every refresh of K-FAC (exact damping)."""
    ss = np.random.SeedSequence(seed).spawn(3)
    net = task.net_factory(np.random.default_rng(ss[0]))
    data_rng = np.random.default_rng(ss[1])
    opt = get_optimizer("kfac")(net, task.loss, seed=int(ss[2].generate_state(1)[0]), damping="exact", T3=T3,
                                T2=max(20, T3) // T3 * T3)  # fmt: skip
    prev = None
    for it in range(1, steps + 1):
        X, Y = task.sample_batch(batch, data_rng)
        opt.step(X, Y)
        f = opt.factors
        if f is None or f is prev:
            continue
        prev = f
        tr = net.forward(X)
        g = net.backward(tr, task.loss.grad(tr.out, Y))
        grads = [gi.T @ ai / X.shape[0] for gi, ai in zip(g, tr.a)]  # (d_out, d_in+1) = (q, p)
        yield it, f["A_diag"], f["G_diag"], grads, float(opt.gamma)


# -- Shampoo's QR warm start (algorithmic baseline) -------------------------------------------------------
def shampoo_qr(A, Q, tol=0.01, iters=1):
    """Distributed Shampoo's warm-started eigendecomposition: ``(d, Q)``."""
    B = Q.T @ A @ Q
    d = np.diag(B).copy()
    if np.linalg.norm(B - np.diag(d)) <= tol * np.linalg.norm(B):
        return d, Q
    for _ in range(iters):
        Q, _ = np.linalg.qr(A @ Q)
    return np.einsum("ij,ij->j", Q, A @ Q), Q


def _timed(fn):
    t = time.perf_counter()
    out = fn()
    return time.perf_counter() - t, out


def rel(a, b):
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def run_trajectory(name, task, steps, T3, rtols, seed=0, log=print):
    """Paired cold / warm / Shampoo refreshes along one recorded run; per-refresh rows."""
    rows = []
    warm = {r: None for r in rtols}
    sham = None
    for it, As, Gs, grads, gamma in trajectory(task, steps, T3, seed=seed):
        lam = gamma * gamma
        if sham is None:
            warm = {r: [None] * len(As) for r in rtols}
            sham = [None] * len(As)
        for k, (A, G, V) in enumerate(zip(As, Gs, grads)):
            cases = [("cold", lambda: Kron(A, G).eigh())]
            for r in rtols:
                if warm[r][k] is not None:
                    cases.append((f"warm@{r:g}", lambda r=r: warm[r][k].refresh(A, G, damping=lam, rtol=r)))
            if sham[k] is not None:
                Qa0, Qg0 = sham[k]
                cases.append(("shampoo", lambda: (shampoo_qr(A, Qa0), shampoo_qr(G, Qg0))))
            random.shuffle(cases)
            out = {}
            for label, fn in cases:
                out[label] = _timed(fn)
            t_cold, cold = out["cold"]
            ref = cold.solve(V, damping=lam)
            row = {"run": name, "it": it, "layer": k, "p": int(A.shape[0]), "q": int(G.shape[0]), "lam": lam,
                   "t_cold": t_cold}  # fmt: skip
            prev = warm[rtols[0]][k]
            if prev is not None:  # context: the previous eigenbasis as is (a longer refresh period) and with
                # corrected eigenvalues only (EKFAC/SOAP; rtol=inf), against the cold step
                row["step_stale"] = rel(prev.solve(V, damping=lam), ref)
                row["step_corrected"] = rel(prev.refresh(A, G, damping=lam, rtol=math.inf).solve(V, damping=lam), ref)
            for r in rtols:
                if f"warm@{r:g}" in out:
                    t, E = out[f"warm@{r:g}"]
                    row[f"t_warm@{r:g}"] = t
                    row[f"step@{r:g}"] = rel(E.solve(V, damping=lam), ref)
                    row[f"bound@{r:g}"] = E.refresh_info["bound"]
                    row[f"route@{r:g}"] = E.refresh_info["A"][0] + E.refresh_info["G"][0]  # "kk", "kc", ...
                    warm[r][k] = E
                else:
                    warm[r][k] = cold
            if "shampoo" in out:
                t, ((da, Qa), (dg, Qg)) = out["shampoo"]
                row["t_shampoo"] = t
                row["step_shampoo"] = rel(KronEigh(Qa, np.maximum(da, 0), Qg, np.maximum(dg, 0)).solve(V, damping=lam),
                                          ref)  # fmt: skip
                sham[k] = (Qa, Qg)
            else:
                sham[k] = (cold.Qa, cold.Qg)
            rows.append(row)
        log(f"  {name} it {it}: {len(As)} layers, λ={lam:.3g}, "
            + ", ".join(f"rtol {r:g}: {sum(x.get(f'route@{r:g}', '') == 'kk' for x in rows[-len(As):])} kept"
                        for r in rtols))  # fmt: skip
    return rows


def summarize(rows, rtols):
    """Per (run, layer size): run ratio Σwarm/Σcold, median paired ratio, kept fraction, worst step error."""
    out = []
    keys = sorted({(r["run"], r["p"], r["q"]) for r in rows}, key=lambda k: (k[0], -k[1] * k[2]))
    for run, p, q in keys:
        sel = [r for r in rows if (r["run"], r["p"], r["q"]) == (run, p, q)]
        warm_sel = [r for r in sel if "t_shampoo" in r]  # refreshes after the first (a warm start exists)
        if not warm_sel:
            continue
        ent = {"run": run, "p": p, "q": q, "layers": len({r["layer"] for r in sel}), "refreshes": len(warm_sel),
               "cold_ms": 1e3 * statistics.median(r["t_cold"] for r in warm_sel)}  # fmt: skip
        for r in rtols:
            w = [x for x in warm_sel if f"t_warm@{r:g}" in x]
            ent[f"run_ratio@{r:g}"] = sum(x[f"t_warm@{r:g}"] for x in w) / sum(x["t_cold"] for x in w)
            ent[f"median_ratio@{r:g}"] = statistics.median(x[f"t_warm@{r:g}"] / x["t_cold"] for x in w)
            ent[f"kept@{r:g}"] = sum(x[f"route@{r:g}"] == "kk" for x in w) / len(w)
            ent[f"partial@{r:g}"] = sum(x[f"route@{r:g}"] in ("kc", "ck") for x in w) / len(w)
            ent[f"max_step@{r:g}"] = max(x[f"step@{r:g}"] for x in w)
            ent[f"median_step@{r:g}"] = statistics.median(x[f"step@{r:g}"] for x in w)
        ent["median_step_stale"] = statistics.median(x["step_stale"] for x in warm_sel)
        ent["median_step_corrected"] = statistics.median(x["step_corrected"] for x in warm_sel)
        ent["run_ratio_shampoo"] = sum(x["t_shampoo"] for x in warm_sel) / sum(x["t_cold"] for x in warm_sel)
        ent["max_step_shampoo"] = max(x["step_shampoo"] for x in warm_sel)
        ent["median_step_shampoo"] = statistics.median(x["step_shampoo"] for x in warm_sel)
        out.append(ent)
    return out


# -- width sweep ------------------------------------------------------------------------------------------
def kfac_like(rng, n, dtype=np.float64):
    B = rng.standard_normal((n, 2 * n)) * (1.0 / np.sqrt(1.0 + np.arange(n)))[:, None]
    M = B @ B.T / (2 * n)
    return ((M + M.T) / 2).astype(dtype)


def width_sweep(widths, rounds, dtype=np.float64, seed=0):
    """Median paired ratios to the kronlin cold refresh (``Kron(A, A).eigh()`` of one n × n factor pair)."""
    rng = np.random.default_rng(seed)
    res = []
    for n in widths:
        A0 = kfac_like(rng, n, dtype)
        A1 = (0.95 * A0 + 0.05 * kfac_like(rng, n, dtype)).astype(dtype)  # one K-FAC averaging step later
        E0 = Kron(A0, A0).eigh()
        lam = float(np.trace(A0)) / n * 1e-3
        mu = float(np.trace(A0)) / n * 1e-2
        I = np.eye(n, dtype=dtype)
        potrf, potri = lapack.get_lapack_funcs(("potrf", "potri"), dtype=dtype)
        X0 = np.linalg.inv(A0 + mu * I)

        def bare_inv():
            c, _ = potrf(A1 + mu * I, lower=1)
            return potri(c, lower=1)

        def newton_schulz():  # one step from the previous inverse, with its residual check
            AX = (A1 + mu * I) @ X0
            X = X0 @ (2 * I - AX)
            return X, np.linalg.norm(I - (A1 + mu * I) @ X)

        routes = {
            "kronlin cold (Kron.eigh, 2 factors)": lambda: Kron(A1, A1).eigh(),
            "numpy.linalg.eigh x2": lambda: (np.linalg.eigh(A1), np.linalg.eigh(A1)),
            "scipy evd x2": lambda: (scipy.linalg.eigh(A1, driver="evd"), scipy.linalg.eigh(A1, driver="evd")),
            "scipy evr x2": lambda: (scipy.linalg.eigh(A1, driver="evr"), scipy.linalg.eigh(A1, driver="evr")),
            "kronlin warm (KronEigh.refresh, kept)": lambda: E0.refresh(A1, A1, damping=lam, rtol=math.inf),
            "shampoo QR check x2 (kept)": lambda: (shampoo_qr(A1, E0.Qa, tol=1.0), shampoo_qr(A1, E0.Qg, tol=1.0)),
            "shampoo QR step x2": lambda: (shampoo_qr(A1, E0.Qa, tol=0.0), shampoo_qr(A1, E0.Qg, tol=0.0)),
            "potrf+potri x2": lambda: (bare_inv(), bare_inv()),
            "newton-schulz 1 step x2": lambda: (newton_schulz(), newton_schulz()),
        }
        if torch is not None:
            T1 = torch.from_numpy(A1)
            routes["torch.linalg.eigh x2 (MKL, context)"] = lambda: (torch.linalg.eigh(T1), torch.linalg.eigh(T1))
        times = shuffled_rounds(routes, rounds)
        base = times["kronlin cold (Kron.eigh, 2 factors)"]
        ns_res = newton_schulz()[1] / np.linalg.norm(I)
        ent = {"n": n, "dtype": np.dtype(dtype).name, "cold_ms": 1e3 * statistics.median(base),
               "ns_rel_residual_after_1_step": float(ns_res),
               "ms": {k: 1e3 * statistics.median(v) for k, v in times.items()},
               "ratio_to_cold": {k: statistics.median(a / b for a, b in zip(v, base)) for k, v in times.items()}}  # fmt: skip
        ent["inv_ratio_ns_to_potri"] = statistics.median(
            a / b for a, b in zip(times["newton-schulz 1 step x2"], times["potrf+potri x2"]))
        res.append(ent)
        print(f"  width {n}: cold {ent['cold_ms']:.2f} ms; " + ", ".join(
            f"{k.split(' (')[0]} {v:.2f}" for k, v in ent["ratio_to_cold"].items()), flush=True)
    return res


def plot_width(sweep, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    ns = [e["n"] for e in sweep]
    for k in sweep[0]["ms"]:
        ax.loglog(ns, [e["ms"][k] for e in sweep], marker="o", label=k,
                  lw=2.5 if k.startswith("kronlin") else 1.2)  # fmt: skip
    ax.set_xlabel("layer width n (factor n × n, two factors per layer)")
    ax.set_ylabel("refresh time per layer [ms], one thread")
    ax.set_title(f"Refresh cost against width ({sweep[0]['dtype']}, paired medians)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


# -- committed unit-test trajectory ---------------------------------------------------------------------
def save_test_data(path, steps=12, layers=(4, 5, 6, 7)):
    """curves-ae, refresh every step: the small middle layers' factors, gradients and damping (< 100 KB)."""
    data = {}
    n = 0
    for it, As, Gs, grads, gamma in trajectory(load_task("curves-ae", 0, n=2000), steps, T3=1):
        for k in layers:
            data[f"r{n}_l{k}_A"], data[f"r{n}_l{k}_G"] = As[k], Gs[k]
            data[f"r{n}_l{k}_V"] = grads[k]
        data[f"r{n}_lam"] = np.array(gamma * gamma)
        n += 1
    data["n_refresh"], data["layers"] = np.array(n), np.array(layers)
    np.savez_compressed(path, **data)
    print(f"wrote {path} ({os.path.getsize(path) / 1024:.0f} KB, {n} refreshes, layers {layers})")


# -- report ----------------------------------------------------------------------------------------------
def machine():
    try:
        up = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    except OSError:  # pragma: no cover
        up = ""
    return {"threadpool_info": threadpoolctl.threadpool_info(), "loadavg": list(os.getloadavg()), "uptime": up,
            "numpy": np.__version__, "scipy": scipy.__version__, "kronlin": kronlin.__file__,
            "torch": getattr(torch, "__version__", None), "OPENBLAS_CORETYPE": os.environ.get("OPENBLAS_CORETYPE")}  # fmt: skip


def kernel_line(threadpool_info) -> str:
    """The BLAS/OpenMP libraries, kernels and thread counts in one line."""
    return "; ".join(f"{i.get('internal_api')} {i.get('version')} {i.get('architecture')} threads={i.get('num_threads')}"
                     for i in threadpool_info)  # fmt: skip


def write_md(res, path, rtols):
    m = res["machine"]
    kern = kernel_line(m["threadpool_info"])
    L = ["# Warm-started eigenbasis refresh vs cold (issue 13 items 2, 5)", "",
         f"`python bench/refresh.py {' '.join(res['argv'])}`; one BLAS thread ({kern}); "
         f"load at start {res['machine_start']['loadavg']}, at end {m['loadavg']}; numpy {m['numpy']}, scipy {m['scipy']}, "
         f"torch {m['torch']}.", "",
         "## Along recorded K-FAC runs (exact damping λ = γ², float64 factors from kronlin.train)", "",
         "run ratio = Σ t_warm / Σ t_cold over every refresh after the first (paired, same round); "
         "kept = both bases kept (eigenvalue correction only); partial = one factor cold; "
         "step = ‖warm step − cold step‖ / ‖cold step‖ on the layer's gradient.", ""]  # fmt: skip
    for run in res["runs"]:
        L.append(f"- **{run['name']}**: {run['desc']}; {run['steps']} steps, refresh period T3 = {run['T3']}, "
                 f"{run['seconds']:.0f} s")  # fmt: skip
    L.append("")
    hdr = "| run | p × q | layers | refreshes | cold ms |"
    sep = "| --- | --- | ---: | ---: | ---: |"
    for r in rtols:
        hdr += f" warm/cold @rtol {r:g} (run, median) | kept / partial | step max (median) |"
        sep += " ---: | ---: | ---: |"
    hdr += " Shampoo QR / cold | Shampoo step max (median) | previous basis: stale / corrected step (median) |"
    sep += " ---: | ---: | ---: |"
    L += [hdr, sep]
    for e in res["summary"]:
        line = f"| {e['run']} | {e['p']} × {e['q']} | {e['layers']} | {e['refreshes']} | {e['cold_ms']:.2f} |"
        for r in rtols:
            line += (f" {e[f'run_ratio@{r:g}']:.2f} ({e[f'median_ratio@{r:g}']:.2f}) |"
                     f" {e[f'kept@{r:g}']:.0%} / {e[f'partial@{r:g}']:.0%} |"
                     f" {e[f'max_step@{r:g}']:.1e} ({e[f'median_step@{r:g}']:.1e}) |")  # fmt: skip
        line += (f" {e['run_ratio_shampoo']:.2f} | {e['max_step_shampoo']:.1e} ({e['median_step_shampoo']:.1e}) |"
                 f" {e['median_step_stale']:.1e} / {e['median_step_corrected']:.1e} |")  # fmt: skip
        L.append(line)
    L += ["", "Whole runs (all layers, Σ t_warm / Σ t_cold):", ""]
    for run in res["runs"]:
        rows = [r for r in res["rows"] if r["run"] == run["name"] and "t_shampoo" in r]
        if rows:
            parts = [f"rtol {r:g}: {sum(x[f't_warm@{r:g}'] for x in rows) / sum(x['t_cold'] for x in rows):.2f}"
                     for r in rtols]  # fmt: skip
            parts.append(f"Shampoo: {sum(x['t_shampoo'] for x in rows) / sum(x['t_cold'] for x in rows):.2f}")
            L.append(f"- {run['name']}: " + "; ".join(parts))
    if res.get("sweep"):
        L += ["", "## Width sweep (synthetic K-FAC-like pair, one averaging step apart; paired median ratio to "
                  "kronlin's cold refresh of the two factors)", ""]  # fmt: skip
        keys = list(res["sweep"][0]["ms"])
        L += ["| n | cold ms | " + " | ".join(keys) + " | NS step / potrf+potri | NS residual after 1 step |",
              "| ---: | ---: | " + " | ".join("---:" for _ in keys) + " | ---: | ---: |"]
        for e in res["sweep"]:
            L.append(f"| {e['n']} | {e['cold_ms']:.2f} | " + " | ".join(f"{e['ratio_to_cold'][k]:.2f}" for k in keys)
                     + f" | {e['inv_ratio_ns_to_potri']:.2f} | {e['ns_rel_residual_after_1_step']:.1e} |")  # fmt: skip
        L += ["", f"![refresh cost against width]({Path(path).stem}_width.png)"]
    Path(path).write_text("\n".join(L) + "\n")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="small sizes and few steps (smoke run)")
    ap.add_argument("--curves-steps", type=int, default=60, help="0: no curves-ae trajectories")
    ap.add_argument("--mlp-steps", type=int, default=16, help="0: no MLP trajectory")
    ap.add_argument("--T3", type=int, nargs="+", default=[1, 5], help="refresh periods to record (curves-ae)")
    ap.add_argument("--mlp-T3", type=int, default=1)
    ap.add_argument("--rtol", type=float, nargs="+", default=[1e-3, 1e-1])
    ap.add_argument("--widths", type=int, nargs="+", default=[64, 128, 256, 512, 1024])
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--out", default=str(RESULTS / "refresh"))
    ap.add_argument("--save-test-data", metavar="PATH")
    args = ap.parse_args(argv)
    one_thread(torch)
    random.seed(0)
    if args.save_test_data:
        save_test_data(args.save_test_data)
        return 0
    if args.quick:
        args.curves_steps, args.mlp_steps, args.T3, args.widths, args.rounds = 8, 0, [1], [64, 128], 3
    res = {"argv": list(argv if argv is not None else sys.argv[1:]), "machine_start": machine(), "runs": [], "rows": []}
    jobs = [(f"curves-ae T3={t}", load_task("curves-ae", 0), args.curves_steps, t) for t in args.T3 if args.curves_steps]
    if args.mlp_steps:
        jobs.append((f"mlp6x1024 T3={args.mlp_T3}", mlp_task(), args.mlp_steps, args.mlp_T3))
    for name, task, steps, T3 in jobs:
        print(f"{name}: {task.description}", flush=True)
        t0 = time.perf_counter()
        rows = run_trajectory(name, task, steps, T3, args.rtol, log=lambda s: print(s, flush=True))
        res["runs"].append({"name": name, "desc": task.description, "steps": steps, "T3": T3,
                            "seconds": time.perf_counter() - t0})  # fmt: skip
        res["rows"] += rows
        res["summary"] = summarize(res["rows"], args.rtol)
        res["machine"] = machine()
        Path(args.out + ".json").write_text(json.dumps(res, indent=1))
    print("width sweep", flush=True)
    res["sweep"] = width_sweep(args.widths, args.rounds)
    res["summary"] = summarize(res["rows"], args.rtol)  # empty with --curves-steps 0 --mlp-steps 0 (sweep only)
    res["machine"] = machine()
    Path(args.out + ".json").write_text(json.dumps(res, indent=1))
    write_md(res, args.out + ".md", args.rtol)
    plot_width(res["sweep"], args.out + "_width.png")
    print(Path(args.out + ".md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
