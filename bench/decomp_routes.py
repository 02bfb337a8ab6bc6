"""Decomposition routes side by side (issue 13, item 1): which LAPACK route is fastest per dtype and size.

One run, one BLAS thread (``threadpoolctl.threadpool_limits(1)``; torch through
``torch.set_num_threads(1)``), the OpenBLAS kernel and the load average
recorded.  Each case times all its routes *paired*: every round runs each route
once, in a fresh random order, on the same input, and a route's ratio is the
median over rounds of ``t_route / t_floor`` where the floor is the fastest
LAPACK route of the case (by median).  Every route's result is checked before it
is timed (eigen-residual, orthonormality, inverse residual, against float64).

Families (single matrices n = 256, 512, 785, 1024, 2048 and stacks 200 x 64²,
50 x 256²; float32 and float64):

* ``eigh``: ``numpy.linalg.eigh`` (syevd), ``scipy.linalg.eigh`` drivers evd, evr,
  ev, evx, LAPACK ``?syevd`` called directly (per matrix in a Python loop for
  stacks), torch.linalg.eigh (MKL, context only);
* ``chol``: ``numpy.linalg.cholesky``, ``scipy.linalg.cholesky``, LAPACK ``?potrf``;
* ``inv`` (SPD): ``potrf`` + ``potri`` (+ mirroring the triangle), ``cho_solve``
  against I, ``numpy.linalg.inv``, torch cholesky + cholesky_inverse (curvlinops'
  ``KFACInverseLinearOperator`` inverts each damped factor exactly so; with exact
  damping it calls ``torch.linalg.eigh``, the ``eigh`` family's torch row: these
  rows are curvlinops' inversion in the same run);
* ``geigh`` (``C x = s A x``): ``scipy.linalg.eigh(C, A)`` drivers gvd and gv,
  Cholesky reduction (potrf, two triangular solves, syevd, one triangular solve);
* ``kron``: ``Kron(A, G).eigh()`` and ``Kron(A, G).inv()`` of this checkout
  (``after``) and of the package at ``--before REF`` (``before``, ``git archive``'d and
  imported beside it as ``kronlin_before`` with REF's own compiled module, built here: the
  kernels' signatures change between refs), p = q = n, against the floor applied to both
  factors.  (Session 11's A/B ran both packages on that build's compiled module.)  (Until issue 11 item 5 the ``before``
  side was REF's ``kronlin/_linalg.py`` alone, patched into this checkout's ``Kron``;
  the committed results of issue 13 were measured that way, with REF differing from
  this checkout in ``_linalg.py`` only.)

kronlin's own route in each family goes through its public operator, as a user
calls it: ``Kron(M, [[1]]).eigh()`` and ``Kron(M, [[1]]).inv()`` (the 1 x 1 output
factor adds nothing but a constructor's copy and checks).  (Until issue 11 item 5
these rows called the private ``_linalg.eigh`` and ``Factor(M).inv()``, and the
``inv`` family had "potrf+potri + blocked mirror" routes through the private
mirroring helper; kronlin's ``inv`` row includes that mirror.)

Run from the repository root (kronlin installed, editable is fine)::

    python bench/decomp_routes.py --before main            # -> bench/results/decomp_routes.json, .md
    python bench/decomp_routes.py --quick                  # small sizes, a smoke run
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import time
from pathlib import Path

import numpy as np
import scipy
import scipy.linalg
import threadpoolctl
from scipy.linalg import lapack

from _harness import one_thread, package_at, shuffled_rounds

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent

try:  # torch is context only
    import torch
except ImportError:  # pragma: no cover
    torch = None


# -- inputs -------------------------------------------------------------------
def kfac_like(rng, n, dtype, batch=()):
    """A K-FAC-like SPD factor: E[a aᵀ] from 2n correlated samples with a decaying spectrum, damped."""
    shape = tuple(batch) + (n, 2 * n)
    decay = (1.0 / np.sqrt(1.0 + np.arange(n)))[:, None]
    B = rng.standard_normal(shape) * decay
    M = B @ np.swapaxes(B, -1, -2) / (2 * n)
    M = M + 1e-3 * np.trace(M, axis1=-2, axis2=-1)[..., None, None] / n * np.eye(n)
    M = (M + np.swapaxes(M, -1, -2)) / 2
    return np.ascontiguousarray(M.astype(dtype))


# -- routes ---------------------------------------------------------------------
def _loop(fn, M, *outs_shapes):
    """Apply ``fn`` to every matrix of a stack (for the per-matrix LAPACK routes)."""
    if M.ndim == 2:
        return fn(M)
    flat = M.reshape((-1,) + M.shape[-2:])
    res = [fn(m) for m in flat]
    if isinstance(res[0], tuple):
        return tuple(np.stack([r[i] for r in res]).reshape(M.shape[:-2] + res[0][i].shape) for i in range(len(res[0])))
    return np.stack(res).reshape(M.shape[:-2] + res[0].shape)


def _syevd(m):
    f = lapack.get_lapack_funcs("syevd", (m,))
    w, v, info = f(m, compute_v=1, lower=1)
    assert info == 0
    return w, v


def _potrf(m):
    f = lapack.get_lapack_funcs("potrf", (m,))
    c, info = f(m.T, lower=0, clean=1)  # upper of Mᵀ = lower of M; Uᵀ is C-contiguous L
    assert info == 0
    return c.T


def _potri(m, mirror=None):
    """potrf + potri: the inverse's upper triangle only (the LAPACK floor); ``mirror`` completes it."""
    potrf, potri = lapack.get_lapack_funcs(("potrf", "potri"), (m,))
    c, info = potrf(m.T, lower=0, clean=0, overwrite_a=0)
    assert info == 0
    c, info = potri(c, lower=0, overwrite_c=1)
    assert info == 0
    if mirror == "triu":  # what kronlin did before issue 13: a strided transposed read of the whole matrix
        c = np.triu(c)
        c += np.triu(c, 1).T
    return c


def _torch(fn):
    def run(M):
        return fn(torch.from_numpy(M))
    return run


def eigh_routes(stacked, n=0):
    r = {"numpy.linalg.eigh": np.linalg.eigh}
    if stacked:
        r["loop lapack ?syevd"] = lambda M: _loop(_syevd, M)
        r["loop scipy evd"] = lambda M: _loop(lambda m: scipy.linalg.eigh(m, driver="evd", check_finite=False), M)
        r["loop scipy evr"] = lambda M: _loop(lambda m: scipy.linalg.eigh(m, driver="evr", check_finite=False), M)
    else:
        # ev (QR iteration) and evx (bisection + inverse iteration for all eigenvalues) are 4-11x
        # slower than evd from n = 256 on (measured below); at 1024+ they would cost minutes a case
        for d in ("evd", "evr") + (("ev", "evx") if n <= 785 else ()):
            r[f"scipy {d}"] = (lambda d: lambda M: scipy.linalg.eigh(M, driver=d, check_finite=False))(d)
        r["lapack ?syevd"] = _syevd
    if torch is not None:
        r["torch.linalg.eigh (ctx)"] = _torch(lambda T: torch.linalg.eigh(T))
    r.update(kronlin_routes("eigh"))
    return r


def kronlin_routes(family):
    """kronlin's own route for the family (never a floor), through the public operator with a 1 x 1 output
    factor: ``Kron(M, 1).eigh()`` (psd=True, float64 retry armed) and ``Kron(M, 1).inv()`` (symmetry check,
    Cholesky, pivot check, potri, mirror)."""
    import kronlin

    def one(M):
        return np.ones((1, 1), dtype=M.dtype)

    if family == "eigh":
        def eigh(M):
            Q, w, _, _ = kronlin.Kron(M, one(M)).eigh()
            return w, Q
        return {"kronlin Kron(M, 1).eigh()": eigh}
    # the operator itself (what a caller keeps): its .A accessor would add a copy of the result to the timing
    return {"kronlin Kron(M, 1).inv()": lambda M: kronlin.Kron(M, one(M)).inv()}


def chol_routes(stacked):
    r = {"numpy.linalg.cholesky": np.linalg.cholesky}
    if stacked:
        r["loop lapack ?potrf"] = lambda M: _loop(_potrf, M)
    else:
        r["scipy.linalg.cholesky"] = lambda M: scipy.linalg.cholesky(M, lower=True, check_finite=False)
        r["lapack ?potrf"] = _potrf
    if torch is not None:
        r["torch.linalg.cholesky (ctx)"] = _torch(lambda T: torch.linalg.cholesky(T))
    return r


def inv_routes(stacked):
    eye = lambda M: np.broadcast_to(np.eye(M.shape[-1], dtype=M.dtype), M.shape)  # noqa: E731
    r = {"numpy.linalg.inv": np.linalg.inv}
    if stacked:
        r["loop potrf+potri"] = lambda M: _loop(_potri, M)
        r["numpy cholesky + batched solve_triangular"] = lambda M: _tri_inv(np.linalg.cholesky(M))
    else:
        r["potrf+potri"] = _potri  # upper triangle only: the floor a full symmetric inverse cannot beat
        r["potrf+potri + triu mirror"] = lambda M: _potri(M, "triu")
        r["cho_solve(I)"] = lambda M: scipy.linalg.cho_solve(
            scipy.linalg.cho_factor(M, lower=True, check_finite=False), eye(M), check_finite=False)
    if torch is not None:
        r["torch cholesky+cholesky_inverse (ctx)"] = _torch(lambda T: torch.cholesky_inverse(torch.linalg.cholesky(T)))
    r.update(kronlin_routes("inv"))
    return r


def _tri_inv(L):
    eye = np.broadcast_to(np.eye(L.shape[-1], dtype=L.dtype), L.shape)
    Y = scipy.linalg.solve_triangular(L, eye, lower=True, check_finite=False)
    return np.swapaxes(Y, -1, -2) @ Y


def geigh_routes(stacked, n=0):
    def reduce(C, A):
        L = _potrf(A)
        Y = scipy.linalg.solve_triangular(L, C, lower=True, check_finite=False)
        Ct = scipy.linalg.solve_triangular(L, Y.T, lower=True, check_finite=False)
        s, E = _syevd(Ct)
        return s, scipy.linalg.solve_triangular(L, E, lower=True, trans="T", check_finite=False)

    r = {
        "scipy eigh(C, A) gvd": lambda C, A: scipy.linalg.eigh(C, A, driver="gvd", check_finite=False),
        "scipy eigh(C, A) gv": lambda C, A: scipy.linalg.eigh(C, A, driver="gv", check_finite=False),
        "cholesky reduction + syevd": reduce,
        "lapack ?sygvd": lambda C, A: lapack.get_lapack_funcs("sygvd", (A,))(C, A, itype=1, jobz="V", uplo="L")[:2],
    }
    if n > 1024:  # gv (QR iteration) is 3-8x gvd from 256 on; at 2048 it would cost minutes a case
        del r["scipy eigh(C, A) gv"]
    return r


# -- checks -------------------------------------------------------------------------
def _f64(x):
    return np.asarray(x.numpy() if hasattr(x, "numpy") else x, dtype=np.float64)


def check(family, M, out, C=None):
    eps = np.finfo(M.dtype).eps
    n = M.shape[-1]
    M64 = M.astype(np.float64)
    tol = 50 * n * eps
    if family == "eigh":
        w, Q = (_f64(o) for o in out)
        res = np.linalg.norm(M64 @ Q - Q * w[..., None, :], axis=(-2, -1)) / np.linalg.norm(M64, axis=(-2, -1))
        orth = np.linalg.norm(np.swapaxes(Q, -1, -2) @ Q - np.eye(n), axis=(-2, -1))
        assert res.max() < tol and orth.max() < tol, (res.max(), orth.max(), tol)
    elif family == "chol":
        L = _f64(out)
        res = np.linalg.norm(L @ np.swapaxes(L, -1, -2) - M64, axis=(-2, -1)) / np.linalg.norm(M64, axis=(-2, -1))
        assert res.max() < tol and np.all(np.triu(L, 1) == 0), res.max()
    elif family == "inv":
        X = _f64(out.to_dense() if hasattr(out, "to_dense") else out)  # kronlin's route returns A⁻¹ ⊗ [[1]]
        if not np.array_equal(X, np.swapaxes(X, -1, -2)):  # the bare LAPACK route: complete it to check it
            X = np.triu(X) + np.swapaxes(np.triu(X, 1), -1, -2)
        cond = np.linalg.cond(M64).max()
        res = np.linalg.norm(M64 @ X - np.eye(n), axis=(-2, -1)) / np.sqrt(n)
        assert res.max() < tol * cond, (res.max(), tol * cond)
    elif family == "geigh":
        s, K = (_f64(o) for o in out)
        A64, C64 = M64, C.astype(np.float64)
        res = np.linalg.norm(C64 @ K - A64 @ K * s, axis=(-2, -1)) / (np.linalg.norm(C64) * np.linalg.norm(K))
        cond = np.linalg.cond(A64)
        borth = np.linalg.norm(K.T @ A64 @ K - np.eye(n)) / np.sqrt(n)
        assert res < tol * cond and borth < tol * cond, (res, borth, tol * cond)


# -- the paired timing ---------------------------------------------------------------
def is_lapack(route):
    return "(ctx)" not in route and not route.startswith("kron") and "kronlin" not in route


FOCUS = False
_FOCUS_ROUTES = ("numpy.linalg", "lapack ?syevd", "scipy evd", "potrf+potri", "kronlin", "loop")


def run_case(family, routes, args, rounds, warmup=None, floor_routes=None, checker=None):
    if FOCUS:
        routes = {k: v for k, v in routes.items() if k.startswith(_FOCUS_ROUTES) and "triu" not in k}
        rounds = 2 * rounds + 1
    names = list(routes)
    for name in names:
        out = routes[name](*args)
        if checker is not None:
            checker(name, out)
        del out
    if warmup is None:  # the checked call above warmed every route up; one more round below 1024
        warmup = 1 if args[0].shape[-1] < 1024 or args[0].ndim > 2 else 0
    times = shuffled_rounds(routes, rounds, warmup, args)
    cand = [k for k in names if (floor_routes is None and is_lapack(k)) or (floor_routes is not None and k in floor_routes)]
    return finalize({"floor_candidates": cand, "rounds": rounds,
                     "times_ms": {k: [1e3 * t for t in v] for k, v in times.items()}})


def finalize(rec):
    """Floor and ratios from the raw round times: the floor is the candidate with the smallest median
    over rounds of t / (the fastest candidate of that round), robust where a few slow rounds (load)
    would make the medians of a three-round case pick the wrong floor."""
    times = rec["times_ms"]
    cand = rec.get("floor_candidates") or [  # records written before the candidates were stored
        k for k in times if is_lapack(k) and (k.startswith("2x") or not rec["family"].startswith("kron"))]
    rec["floor_candidates"] = cand
    nr = len(next(iter(times.values())))
    best = [min(times[k][i] for k in cand) for i in range(nr)]
    floor = min(cand, key=lambda k: statistics.median(times[k][i] / best[i] for i in range(nr)))
    rec["floor"] = floor
    rec["median_ms"] = {k: statistics.median(v) for k, v in times.items()}
    rec["paired_ratio"] = {k: statistics.median(a / b for a, b in zip(v, times[floor])) for k, v in times.items()}
    return rec


def rounds_for(n, dtype, stacked):
    if stacked:
        return 7
    return {256: 15, 512: 9, 785: 7, 1024: 5, 2048: 3}.get(n, 5)


def kron_routes(old):
    import kronlin

    def routes(lib):
        return (lambda A, G: lib.Kron(A, G).eigh()), (lambda A, G: lib.Kron(A, G).inv())

    (eigh_after, inv_after), (eigh_before, inv_before) = routes(kronlin), routes(old)
    return eigh_after, eigh_before, inv_after, inv_before


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--before", default=None, help="git ref whose kronlin (and compiled module) is timed as 'before'")
    ap.add_argument("--quick", action="store_true", help="n = 64, 128 and small stacks only (a smoke run)")
    ap.add_argument("--sizes", default=None, help="comma-separated n (default 256,512,785,1024,2048)")
    ap.add_argument("--families", default="eigh,chol,inv,geigh,kron")
    ap.add_argument("--dtypes", default="float32,float64")
    ap.add_argument("--no-stacks", action="store_true")
    ap.add_argument("--focus", action="store_true",
                    help="eigh and inv only, with the fastest LAPACK routes, numpy's and kronlin's (more rounds)")
    ap.add_argument("--rounds", type=int, default=None,
                    help="rounds R per case (default: 3-15 by size; --focus runs 2R + 1); a paired A/B of small "
                         "differences needs 20 or more")
    ap.add_argument("--out", default=str(BENCH / "results" / "decomp_routes.json"))
    ap.add_argument("--render", nargs="+", default=None, metavar="JSON",
                    help="only rewrite --out's markdown from these JSON files (merged in order)")
    a = ap.parse_args()
    if a.render:
        runs = [json.loads(Path(f).read_text()) for f in a.render]
        results = [finalize(r) for run in runs for r in run["results"]]
        Path(a.out).with_suffix(".md").write_text(markdown([run["meta"] for run in runs], results))
        return

    limiter = one_thread(torch)
    info = threadpoolctl.threadpool_info()
    random.seed(0)
    sizes = [64, 128] if a.quick else [int(s) for s in (a.sizes if a.sizes is not None else "256,512,785,1024,2048").split(",") if s.strip()]
    stacks = [] if a.no_stacks else ([(20, 32)] if a.quick else [(200, 64), (50, 256)])
    families = a.families.split(",")
    if a.focus:
        global FOCUS
        FOCUS = True
        families = [f for f in families if f in ("eigh", "inv")]
    old = package_at(a.before, "kronlin_before", build=True) if a.before and "kron" in families else None
    meta = {
        "loadavg_at_start": list(os.getloadavg()),
        "threadpool_info": info,
        "OPENBLAS_CORETYPE": os.environ.get("OPENBLAS_CORETYPE"),
        "numpy": np.__version__, "scipy": scipy.__version__,
        "torch": getattr(torch, "__version__", None),
        "torch_config_blas": (torch.__config__.show().split("BLAS_INFO=")[1].split(",")[0]
                              if torch is not None and "BLAS_INFO=" in torch.__config__.show() else None),
        "before": a.before,
        "git_head": subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip(),
        "cpu": next((ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name")), "?"),
    }
    results = []
    rng = np.random.default_rng(0)
    for dtype in a.dtypes.split(","):
        cases = [(n, ()) for n in sizes] + [(n, (b,)) for b, n in stacks]
        for n, batch in cases:
            stacked = bool(batch)
            M = kfac_like(rng, n, dtype, batch)
            label = f"{batch[0]}x{n}x{n}" if stacked else f"{n}x{n}"
            R = a.rounds if a.rounds is not None else rounds_for(n, dtype, stacked)
            for fam in families:
                t0 = time.perf_counter()
                if fam == "eigh":
                    rec = run_case(fam, eigh_routes(stacked, n), (M,), R, checker=lambda k, o: check("eigh", M, o))
                elif fam == "chol":
                    rec = run_case(fam, chol_routes(stacked), (M,), R, checker=lambda k, o: check("chol", M, o))
                elif fam == "inv":
                    rec = run_case(fam, inv_routes(stacked), (M,), R, checker=lambda k, o: check("inv", M, o))
                elif fam == "geigh":
                    if stacked:
                        continue
                    C = kfac_like(rng, n, dtype)
                    rec = run_case(fam, geigh_routes(False, n), (C, M), R,
                                   checker=lambda k, o: check("geigh", M, o, C=C))
                elif fam == "kron":
                    if old is None:
                        continue
                    G = kfac_like(rng, n, dtype, batch)
                    ea, eb, ia, ib = kron_routes(old)
                    both = lambda f: (lambda A, G_: (f(A), f(G_)))  # noqa: E731
                    eroutes = {"Kron.eigh() after": ea, "Kron.eigh() before": eb}
                    iroutes = {"Kron.inv() after": ia, "Kron.inv() before": ib}
                    # the floors: the fastest routes of the eigh/inv families (the slow drivers are left out here)
                    for k, f in eigh_routes(stacked, n).items():
                        if is_lapack(k) and ("syevd" in k or "evd" in k or k.startswith("numpy")):
                            eroutes[f"2x {k}"] = both(f)
                    for k, f in inv_routes(stacked).items():
                        if is_lapack(k) and ("potri" in k or k.startswith("numpy.linalg")):
                            iroutes[f"2x {k}"] = both(f)
                    for sub, routes in (("kron_eigh", eroutes), ("kron_inv", iroutes)):
                        rec = run_case(sub, routes, (M, G), R, floor_routes=[k for k in routes if k.startswith("2x")])
                        rec.update(family=sub, n=n, batch=list(batch), dtype=dtype, label=label,
                                   loadavg=list(os.getloadavg()))
                        results.append(rec)
                        _print(rec)
                    save(a.out, meta, results)
                    continue
                rec.update(family=fam, n=n, batch=list(batch), dtype=dtype, label=label,
                           loadavg=list(os.getloadavg()), wall_s=time.perf_counter() - t0)
                results.append(rec)
                _print(rec)
                save(a.out, meta, results)  # after every case: an interrupted run keeps what it measured
    save(a.out, meta, results)
    limiter.restore_original_limits()
    print(f"wrote {a.out} and {Path(a.out).with_suffix('.md')}")


def save(out, meta, results):
    meta["loadavg_at_end"] = list(os.getloadavg())
    out = Path(out)
    out.write_text(json.dumps({"meta": meta, "results": results}, indent=1))
    out.with_suffix(".md").write_text(markdown([meta], results))


def _print(rec):
    print(f"{rec['family']:9s} {rec['label']:>12s} {rec['dtype']}  floor={rec['floor']}  load={rec['loadavg'][0]:.2f}",
          flush=True)
    for k, v in rec["median_ms"].items():
        print(f"    {k:45s} {v:10.2f} ms  {rec['paired_ratio'][k]:6.2f}x")


def markdown(metas, results):
    lines = [
        "# Decomposition routes (issue 13, item 1)",
        "",
        "Generated by `bench/decomp_routes.py`; one BLAS thread; paired (each round runs every route once in a "
        "random order on the same input; ratio = median over rounds of route / floor, the floor being the case's "
        "LAPACK route with the smallest median ratio to the fastest route of each round). torch (MKL) is "
        "context only and never the floor. Absolute times are inflated by the load (2 cores shared with other "
        "work); compare ratios.",
        "",
    ]
    for i, meta in enumerate(metas):
        blas = "; ".join(f"{d.get('internal_api')} {d.get('version')} arch={d.get('architecture')} "
                         f"threads={d.get('num_threads')} ({Path(d.get('filepath', '?')).name})"
                         for d in meta["threadpool_info"])
        lines += [
            f"Run {i + 1}:",
            f"- CPU: {meta['cpu']}; numpy {meta['numpy']}, scipy {meta['scipy']}, torch {meta['torch']}",
            f"- BLAS pools: {blas}; OPENBLAS_CORETYPE={meta['OPENBLAS_CORETYPE']!r}",
            f"- load average at start {meta['loadavg_at_start'][0]:.2f}, at end {meta['loadavg_at_end'][0]:.2f}; "
            f"HEAD {meta['git_head'][:10]}, before = {meta['before']}",
            "",
        ]
    fams = []
    for r in results:
        if r["family"] not in fams:
            fams.append(r["family"])
    for fam in fams:
        rs = [r for r in results if r["family"] == fam]
        lines += [f"## {fam}", "", "| case | dtype | route | median ms | paired ratio to floor | load |",
                  "| --- | --- | --- | ---: | ---: | ---: |"]
        for r in rs:
            for k in r["median_ms"]:
                mark = " **(floor)**" if k == r["floor"] else ""
                lines.append(f"| {r['label']} | {r['dtype']} | {k}{mark} | {r['median_ms'][k]:.2f} | "
                             f"{r['paired_ratio'][k]:.2f} | {r['loadavg'][0]:.2f} |")
        lines.append("")
        pairs = [(r, k) for r in rs for k in r["times_ms"] if k.endswith(" after")]
        if pairs:  # --before: the change itself, paired round by round
            lines += ["| case | dtype | route | after / before, paired median | rounds |", "| --- | --- | --- | ---: | ---: |"]
            for r, k in pairs:
                a, b = r["times_ms"][k], r["times_ms"][k[: -len("after")] + "before"]
                lines.append(f"| {r['label']} | {r['dtype']} | {k[: -len(' after')]} | "
                             f"{statistics.median(x / y for x, y in zip(a, b)):.3f} | {r['rounds']} |")
            lines.append("")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
