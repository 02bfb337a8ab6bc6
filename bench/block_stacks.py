"""Many layers at once (issue 13 item 3): BlockDiagInverse on 200 equal-shaped layers against its LAPACK/GEMM floors.

One run, one BLAS thread (threadpoolctl), kernel and load recorded; every case is paired (each round runs
every route once in a fresh random order on the same input) and reported as the median over rounds of
``t_route / t_floor``:

* decompose: ``BlockDiagInverse(A_list, G_list, gamma)`` (validation, factored damping with π per layer,
  Cholesky, SPD inverse, log-determinant) against the sum of the per-matrix LAPACK times
  (``?potrf`` + ``?potri`` per damped factor, SciPy's wrappers called in a plain loop), and against a
  numba-compiled per-matrix loop (``np.linalg.cholesky`` + ``np.linalg.inv`` in ``@njit``; only if numba
  is installed: it is measured, not a dependency);
* apply: ``op.apply(V_list)`` against the batched GEMMs ``G⁻¹ @ V @ A⁻ᵀ`` on pre-stacked arrays, a plain
  per-layer loop of the same products, and a numba loop.  (Session 13's runs also timed the batched GEMMs
  on the operator's own inverse stacks, a control read from a private attribute; bench/ keeps to public
  names, so it is gone.)

Results are checked first (apply against the per-layer dense inverses).

    python bench/block_stacks.py                   # -> bench/results/block_stacks.json, block_stacks.md
    python bench/block_stacks.py --layers 20       # quicker
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
from pathlib import Path

import numpy as np
from scipy.linalg import lapack

from _harness import evict_caches, one_thread, shuffled_rounds
from kronlin import BlockDiagInverse, pi_factor
from refresh import kernel_line, machine  # bench/refresh.py: the run's conditions

RESULTS = Path(__file__).resolve().parent / "results"

try:
    import numba
except ImportError:  # pragma: no cover - optional, measured only
    numba = None


def kfac_like(rng, n, dtype):
    B = rng.standard_normal((n, 2 * n)) * (1.0 / np.sqrt(1.0 + np.arange(n)))[:, None]
    M = B @ B.T / (2 * n)
    return ((M + M.T) / 2).astype(dtype)


def numba_routes():
    if numba is None:
        return None

    @numba.njit(cache=False)
    def inv_loop(S):
        out = np.empty_like(S)
        for i in range(S.shape[0]):
            L = np.linalg.cholesky(S[i])
            out[i] = np.linalg.inv(S[i])  # numba has no potri: inv (LU) is its SPD inverse
            out[i, 0, 0] += 0.0 * L[0, 0]
        return out

    @numba.njit(cache=False)
    def apply_loop(Gi, V, AiT):
        out = np.empty_like(V)
        for i in range(V.shape[0]):
            out[i] = Gi[i] @ V[i] @ AiT[i]
        return out

    return inv_loop, apply_loop


def run_case(m, n, dtype, gamma, rounds, rng, cold: bool = False):
    As = [kfac_like(rng, n, dtype) for _ in range(m)]
    Gs = [kfac_like(rng, n, dtype) for _ in range(m)]
    Vs = [rng.standard_normal((n, n)).astype(dtype) for _ in range(m)]
    pis = [float(pi_factor(A, G)) for A, G in zip(As, Gs)]
    Ad = [A + np.asarray(p * gamma, dtype) * np.eye(n, dtype=dtype) for A, p in zip(As, pis)]
    Gd = [G + np.asarray(gamma / p, dtype) * np.eye(n, dtype=dtype) for G, p in zip(Gs, pis)]
    potrf, potri = lapack.get_lapack_funcs(("potrf", "potri"), dtype=np.dtype(dtype))

    def lapack_floor():
        for M in Ad + Gd:
            c, _ = potrf(M, lower=1)
            potri(c, lower=1)

    op = BlockDiagInverse(As, Gs, gamma=gamma)
    Ainv = np.stack([np.linalg.inv(a) for a in Ad])
    Ginv = np.stack([np.linalg.inv(g) for g in Gd])
    AinvT = np.ascontiguousarray(np.swapaxes(Ainv, -1, -2))
    Vst = np.stack(Vs)
    Gl, AlT = list(Ginv), list(AinvT)
    # correctness first
    got = op.apply(Vs)
    ref = Ginv @ Vst @ AinvT
    err = max(float(np.abs(g - r).max() / np.abs(r).max()) for g, r in zip(got, ref))
    assert err < (1e-3 if dtype == np.float32 else 1e-9), err

    dec = {"BlockDiagInverse(...)": lambda: BlockDiagInverse(As, Gs, gamma=gamma),
           "potrf+potri per matrix (floor)": lapack_floor,
           "numpy.linalg.inv per matrix": lambda: [np.linalg.inv(M) for M in Ad + Gd]}  # fmt: skip
    app = {"op.apply": lambda: op.apply(Vs),
           "batched GEMMs, pre-stacked (floor)": lambda: Ginv @ Vst @ AinvT,
           "per-layer loop": lambda: [g @ v @ a for g, v, a in zip(Gl, Vs, AlT)]}  # fmt: skip
    nb = numba_routes()
    if nb is not None:
        inv_loop, apply_loop = nb
        SAd = np.stack(Ad + Gd)
        inv_loop(SAd[:2])
        apply_loop(Ginv[:2], Vst[:2], AinvT[:2])  # compile outside the timings
        dec["numba loop (cholesky + inv, pre-stacked)"] = lambda: inv_loop(SAd)
        app["numba loop (pre-stacked)"] = lambda: apply_loop(Ginv, Vst, AinvT)
    out = {}
    for fam, routes, floor in (("decompose", dec, "potrf+potri per matrix (floor)"),
                               ("apply", app, "batched GEMMs, pre-stacked (floor)")):  # fmt: skip
        times = shuffled_rounds(routes, rounds, before=evict_caches if cold else None, repeat=not cold)
        out[fam] = {k: {"ms": 1e3 * statistics.median(v),
                        "ratio": statistics.median(a / b for a, b in zip(v, times[floor]))}
                    for k, v in times.items()}  # fmt: skip
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--layers", type=int, default=200)
    ap.add_argument("--n", type=int, nargs="+", default=[64])
    ap.add_argument("--rounds", type=int, default=21)
    ap.add_argument("--gamma", type=float, default=0.1)
    ap.add_argument("--out", default=str(RESULTS / "block_stacks"))
    args = ap.parse_args(argv)
    one_thread()
    random.seed(0)
    rng = np.random.default_rng(0)
    res = {"argv": list(argv if argv is not None else sys.argv[1:]), "machine_start": machine(),
           "numba": getattr(numba, "__version__", None), "cases": []}  # fmt: skip
    for caches in ("warm", "cold"):
        for n in args.n:
            for dtype in (np.float32, np.float64):
                r = run_case(args.layers, n, dtype, args.gamma, args.rounds, rng, cold=caches == "cold")
                res["cases"].append({"layers": args.layers, "n": n, "dtype": np.dtype(dtype).name, "caches": caches,
                                     **r})  # fmt: skip
                print(f"{args.layers} x {n}² {np.dtype(dtype).name}, {caches}: " + "; ".join(
                    f"{fam}: " + ", ".join(f"{k} {v['ratio']:.2f}" for k, v in r[fam].items()) for fam in r), flush=True)
    res["machine"] = m = machine()
    Path(args.out + ".json").write_text(json.dumps(res, indent=1))
    L = ["# Many layers at once: BlockDiagInverse vs its floors (issue 13 item 3)", "",
         f"`python bench/block_stacks.py {' '.join(res['argv'])}`; one BLAS thread ({kernel_line(m['threadpool_info'])}); "
         f"numpy {m['numpy']}, scipy {m['scipy']}, numba {res['numba']}; load {res['machine_start']['loadavg']} → "
         f"{m['loadavg']} ({m['uptime']}); paired medians over {args.rounds} rounds, ratio to the floor of each family. "
         "Caches *warm*: every timed call follows an untimed call of the same route, so each route finds its own "
         "inputs in cache (until session 12 the calls followed each other as they came, and the floor and the "
         "per-layer loop, which read the same inverse arrays, found them in cache after each other while "
         "`op.apply` read its own); *cold*: a 32 MiB write before every timed call (`_harness.evict_caches`, "
         "untimed), as an optimizer's apply after a training step's passes.", "",
         "| case | caches | family | route | ms | ratio to floor |", "| --- | --- | --- | --- | ---: | ---: |"]  # fmt: skip
    for c in res["cases"]:
        for fam in ("decompose", "apply"):
            for k, v in c[fam].items():
                L.append(f"| {c['layers']} × {c['n']}² {c['dtype']} | {c.get('caches', 'warm')} | {fam} | {k} | "
                         f"{v['ms']:.2f} | {v['ratio']:.2f} |")
    Path(args.out + ".md").write_text("\n".join(L) + "\n")
    print("\n".join(L))
    return 0


if __name__ == "__main__":
    sys.exit(main())
