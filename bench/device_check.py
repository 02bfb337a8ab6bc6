"""GPU timings of the one-call device check (``bench/device_check.sh``; issue 12).

Times, with CUDA events (median of many repeats after warm-up, the kronlin
call and its floor alternated and paired):

* ``KronEigh.solve`` against its four cuBLAS GEMMs, n = 1024…8192, float32/float64;
* the ``eig_scale`` kernel against the CuPy elementwise composition;
* the weight-sharing Gram kernel against the CuPy composition, T = 16…1024
  (time and peak memory-pool bytes);
* batched eigendecompositions of 200 × 64² and 50 × 256² factors: kronlin's
  route, ``cupy.linalg.eigh`` on the stack, a Python loop, torch's batched eigh;
* ``eigh``'s float32 failure path: matrices near float32's range, raw cuSOLVER
  against kronlin (which retries in float64 and must never return NaN);
* the CuPy decomposition routes kronlin chooses between (stacked or looped ``eigh``, SPD inverses);
* kronlin.torch's amortised KFAC step on CUDA against the SGD step (issue 16).

Writes ``gpu-<date>.json`` and ``gpu-<date>.md`` into ``--out`` and prints the
markdown table last.  Without CuPy or a CUDA device it writes nothing, prints
one line saying so and exits 0.

Usage: ``python bench/device_check.py --out bench/results [--quick]``
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import subprocess
import sys
import time
import traceback

import numpy as np


def _gpu_available() -> tuple[bool, str]:
    try:
        import cupy
    except ImportError as exc:
        return False, f"CuPy is not installed ({exc})"
    try:
        n = cupy.cuda.runtime.getDeviceCount()
    except Exception as exc:  # noqa: BLE001 - no driver
        return False, f"no CUDA driver ({type(exc).__name__}: {exc})"
    return (n > 0), (f"{n} CUDA device(s)" if n else "no CUDA device")


def _cmd(args) -> str:
    try:
        return subprocess.run(args, capture_output=True, text=True, timeout=30).stdout.strip()
    except Exception as exc:  # noqa: BLE001 - tool missing
        return f"unavailable ({type(exc).__name__})"


def environment() -> dict:
    import cupy

    import kronlin

    props = cupy.cuda.runtime.getDeviceProperties(0)
    env = {
        "card": props["name"].decode() if isinstance(props["name"], bytes) else str(props["name"]),
        "multiprocessors": int(props["multiProcessorCount"]),
        "memory_gib": round(props["totalGlobalMem"] / 2**30, 1),
        "driver": _cmd(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"]),
        "cuda_driver_api": cupy.cuda.runtime.driverGetVersion(),
        "cuda_runtime": cupy.cuda.runtime.runtimeGetVersion(),
        "nvcc": _cmd(["nvcc", "--version"]).splitlines()[-1:] or [""],
        "cupy": cupy.__version__,
        "numpy": np.__version__,
        "python": platform.python_version(),
        "kronlin": kronlin.extension_info(),
    }
    env["nvcc"] = env["nvcc"][0]
    try:
        import torch

        env["torch"] = torch.__version__
    except ImportError:
        env["torch"] = None
    return env


# -- timing ---------------------------------------------------------------------------------------
def _event_ms(fn) -> float:
    import cupy

    start, stop = cupy.cuda.Event(), cupy.cuda.Event()
    start.record()
    fn()
    stop.record()
    stop.synchronize()
    return float(cupy.cuda.get_elapsed_time(start, stop))


def paired(fn, floor, reps: int, warmup: int = 3) -> dict:
    """Alternate ``fn`` and ``floor``, each timed by CUDA events; medians and the median ratio."""
    for _ in range(warmup):
        fn()
        floor()
    a, b = [], []
    for _ in range(reps):
        a.append(_event_ms(fn))
        b.append(_event_ms(floor))
    a, b = np.array(a), np.array(b)
    return {
        "ms": float(np.median(a)),
        "floor_ms": float(np.median(b)),
        "ratio": float(np.median(a / b)),
        "reps": reps,
    }


def _peak_bytes(fn) -> int:
    """Peak bytes the CuPy memory pool held while ``fn`` ran (from an emptied pool)."""
    import cupy

    pool = cupy.get_default_memory_pool()
    cupy.cuda.get_current_stream().synchronize()
    pool.free_all_blocks()
    fn()
    cupy.cuda.get_current_stream().synchronize()
    return int(pool.total_bytes())


def _orth(cp, n, rng, dtype):
    Q, _ = np.linalg.qr(rng.standard_normal((n, n))) if n <= 1024 else cp.linalg.qr(cp.asarray(rng.standard_normal((n, n))))
    return cp.asarray(Q, dtype=dtype)


# -- sections -------------------------------------------------------------------------------------
def solve_vs_gemms(quick: bool) -> list:
    import cupy as cp

    import kronlin

    rng = np.random.default_rng(0)
    out = []
    for n in (1024, 2048) if quick else (1024, 2048, 4096, 8192):
        Q64 = _orth(cp, n, rng, cp.float64)
        lam = cp.asarray(rng.uniform(0.1, 10.0, n))
        for dtype in (cp.float32, cp.float64):
            Q, w = Q64.astype(dtype), lam.astype(dtype)
            E = kronlin.KronEigh(Q, w, Q, w)
            X = cp.asarray(rng.standard_normal((n, n)), dtype=dtype)
            ref = E.solve(X, 0.1)

            def gemms():
                Y = Q.T @ X @ Q
                return Q @ Y @ Q.T

            # correctness first: the solve against the dense formula through the same basis
            d = (w[:, None] * w[None, :] + 0.1)
            check = Q @ ((Q.T @ X @ Q) / d) @ Q.T
            err = float(cp.linalg.norm(ref - check) / cp.linalg.norm(check))
            reps = 10 if n >= 4096 else 30
            r = paired(lambda: E.solve(X, 0.1), gemms, reps)
            r.update(n=n, dtype=np.dtype(dtype).name, rel_err_vs_composition=err)
            out.append(r)
            del E, X, ref, check
        del Q64
        cp.get_default_memory_pool().free_all_blocks()
    return out


def eig_scale_vs_composition(quick: bool) -> list:
    import cupy as cp

    from kronlin.kernels import eig_scale, eig_scale_reference

    rng = np.random.default_rng(1)
    out = []
    for n in (1024, 4096) if quick else (1024, 2048, 4096, 8192):
        for dtype in (cp.float32, cp.float64):
            Y = cp.asarray(rng.standard_normal((1, n, n)), dtype=dtype)
            lg = cp.asarray(rng.uniform(0.9, 1.1, (1, n)), dtype=dtype)
            la = cp.asarray(rng.uniform(0.9, 1.1, (1, n)), dtype=dtype)
            ref = eig_scale_reference(cp, Y, lg, la, 0.01, -1.0)
            err = float(cp.max(cp.abs(eig_scale(cp, Y.copy(), lg, la, 0.01, -1.0) - ref)) / cp.max(cp.abs(ref)))
            work = Y.copy()
            r = paired(lambda: eig_scale(cp, work, lg, la, 0.0, -1.0),
                       lambda: eig_scale_reference(cp, Y, lg, la, 0.0, -1.0), 30)
            r.update(n=n, dtype=np.dtype(dtype).name, max_rel_err=err)
            out.append(r)
            del Y, work, ref
    return out


def gram_vs_composition(quick: bool) -> list:
    import cupy as cp

    from kronlin.kernels import compiled, gram_shared, kernel

    run = kernel(cp, "woodbury_gram_shared")
    rng = np.random.default_rng(2)
    out = []
    N, S, da, de = 32, 1, 64, 64
    for T in (16, 64, 256) if quick else (16, 64, 256, 1024):
        for dtype in (cp.float32, cp.float64):
            A = cp.asarray(rng.standard_normal((N, T, da)), dtype=dtype)
            E = cp.asarray(rng.standard_normal((N, S, T, de)), dtype=dtype)
            E3 = E.reshape(N * S, T, de)
            R = gram_shared(cp, A, E, "reference")
            reps = 5 if T >= 1024 else 15
            row = {"N": N, "S": S, "T": T, "d_in": da, "d_out": de, "dtype": np.dtype(dtype).name,
                   "auto_tile": int(compiled(cp).gram_tile_for(T, dtype == cp.float64))}
            for tile in (32, 64, 128):
                K = cp.empty((N * S, N * S), dtype=dtype)

                def kern(tile=tile, K=K):
                    run(A, E3, K, 1.0, tile=tile)

                kern()
                err = float(cp.linalg.norm(K - R) / cp.linalg.norm(R))
                r = paired(kern, lambda: gram_shared(cp, A, E, "reference"), reps)
                row[f"tile{tile}_ms"], row[f"tile{tile}_speedup"], row[f"tile{tile}_rel_err"] = (
                    r["ms"], 1.0 / r["ratio"], err)
                row["composition_ms"] = r["floor_ms"]
            row["kernel_peak_bytes"] = _peak_bytes(lambda: gram_shared(cp, A, E, "kernel"))
            row["composition_peak_bytes"] = _peak_bytes(lambda: gram_shared(cp, A, E, "reference"))
            row["input_bytes"] = int(A.nbytes + E.nbytes)
            out.append(row)
            del A, E, E3, R
    return out


def batched_eigh(quick: bool) -> list:
    import cupy as cp

    import kronlin

    try:
        import torch
    except ImportError:
        torch = None
    rng = np.random.default_rng(3)
    out = []
    for B, n in ((200, 64), (50, 256)):
        for dtype in (cp.float32, cp.float64):
            X = rng.standard_normal((B, n, 2 * n))
            M = cp.asarray(X @ X.transpose(0, 2, 1) / (2 * n) + 0.1 * np.eye(n), dtype=dtype)
            K = kronlin.Kron(M, M)
            row = {"B": B, "n": n, "dtype": np.dtype(dtype).name}

            def kron_eigh():
                kronlin.Kron(M, M).eigh()  # a fresh operator: the decomposition is not cached

            def stack():
                cp.linalg.eigh(M)

            def loop():
                for i in range(B):
                    cp.linalg.eigh(M[i])

            reps = 5 if n >= 256 else 10
            r = paired(kron_eigh, loop, reps, warmup=1)
            # Kron.eigh decomposes both factors: compare with two loops / two stacked calls
            row["kronlin_ms"] = r["ms"] / 2
            row["loop_ms"] = r["floor_ms"]
            row["speedup_vs_loop"] = 1.0 / (r["ratio"] / 2)
            row["cupy_stack_ms"] = paired(stack, loop, reps, warmup=1)["ms"]
            if torch is not None and torch.cuda.is_available():
                tM = torch.from_dlpack(M)
                row["torch_stack_ms"] = paired(lambda: torch.linalg.eigh(tM), stack, reps, warmup=1)["ms"]
            streams = [cp.cuda.Stream(non_blocking=True) for _ in range(8)]

            def loop_streams():
                for i in range(B):
                    with streams[i % 8]:
                        cp.linalg.eigh(M[i])
                for st in streams:
                    st.synchronize()

            row["loop_8_streams_ms"] = paired(loop_streams, stack, reps, warmup=1)["ms"]
            try:
                import cupyx.cusolver

                def syevj():
                    cupyx.cusolver.syevj(M, with_eigen_vector=True)

                row["syevj_ms"] = paired(syevj, stack, reps, warmup=1)["ms"]
            except Exception as exc:  # noqa: BLE001 - record why the route is unavailable
                row["syevj_ms"] = None
                row["syevj_error"] = f"{type(exc).__name__}: {exc}"[:200]
            Qa, la, _, _ = K.eigh()
            recon = (Qa * la[:, None, :]) @ Qa.transpose(0, 2, 1)
            row["max_rel_recon_err"] = float(cp.max(cp.linalg.norm(recon - M, axis=(1, 2)) / cp.linalg.norm(M, axis=(1, 2))))
            out.append(row)
            del M, K
    return out


def eigh_failure_path(quick: bool) -> list:
    import cupy as cp

    import kronlin

    rng = np.random.default_rng(4)
    out = []
    n = 128
    Q = np.linalg.qr(rng.standard_normal((n, n)))[0]
    cases = []
    for scale in (1e-35, 1e-30, 1e25, 1e30, 1e32):
        M = (Q * np.geomspace(1.0, 1e6, n)) @ Q.T * scale
        cases.append((f"cond 1e6 x {scale:g}", (M + M.T) / 2))
    Z = np.diag(np.r_[np.full(n // 2, 1e-38), np.full(n // 2, 1e38)])
    cases.append(("diag(1e-38, 1e38)", (Q @ Z @ Q.T + (Q @ Z @ Q.T).T) / 2))
    for name, M in cases:
        Mc = cp.asarray(M, dtype=cp.float32)
        if not bool(cp.all(cp.isfinite(Mc))):
            out.append({"case": name, "skipped": "not finite in float32"})
            continue
        try:
            w, V = cp.linalg.eigh(Mc)
            raw_nan = not (bool(cp.all(cp.isfinite(w))) and bool(cp.all(cp.isfinite(V))))
            raw_err = None
        except Exception as exc:  # noqa: BLE001 - record cuSOLVER's failure
            raw_nan, raw_err = None, f"{type(exc).__name__}: {exc}"[:200]
        try:
            # kronlin's eigh of M through the public operator (the 1 x 1 output factor adds nothing)
            V2, w2, _, _ = kronlin.Kron(Mc, cp.ones((1, 1), dtype=Mc.dtype)).eigh()
            k_nan = not (bool(cp.all(cp.isfinite(w2))) and bool(cp.all(cp.isfinite(V2))))
            ref = np.linalg.eigvalsh(cp.asnumpy(Mc).astype(np.float64))
            k_err = float(np.linalg.norm(cp.asnumpy(w2).astype(np.float64) - ref) / np.linalg.norm(ref))
            k_raise = None
        except Exception as exc:  # noqa: BLE001 - a clear LinAlgError is acceptable, NaN is not
            k_nan, k_err, k_raise = False, None, f"{type(exc).__name__}: {exc}"[:200]
        out.append({"case": name, "cusolver_float32_nonfinite": raw_nan, "cusolver_error": raw_err,
                    "kronlin_nonfinite": k_nan, "kronlin_rel_err": k_err, "kronlin_raised": k_raise})
    return out


def cupy_routes(quick: bool) -> list:
    """The CuPy decomposition routes kronlin chooses between (``kronlin._linalg``), with kronlin's own call.

    * ``eigh`` of a stack: CuPy's stacked call (cuSOLVER ``syevjBatched``) against a loop of ``syevd``,
      and the stacked call's reconstruction error ``max ‖QΛQᵀ − M‖_F / ‖M‖_F`` (``syevjBatched`` is
      documented for n ≤ 32);
    * the SPD inverse of a stack: kronlin's, the batched LU solve of ``L`` against ``I``, a loop of one
      ``solve_triangular``, and ``cupy.linalg.inv``.

    kronlin's own calls go through the public operator: ``Kron(M, M).eigh()`` and ``Kron(M, M).inv()`` decompose
    the stack twice, so their times are halved.  Times: CUDA events, medians of 5 after a warm-up, float32 and
    float64.
    """
    import cupy as cp
    import cupyx.scipy.linalg as csl

    import kronlin

    def ms(fn, reps=5):
        fn()
        return float(np.median([_event_ms(fn) for _ in range(reps)]))

    rng = np.random.default_rng(5)
    sizes = ((2, 64), (16, 128), (2, 256), (16, 256)) if quick else (
        (2, 64), (200, 64), (2, 128), (4, 128), (16, 128), (2, 256), (16, 256), (2, 1024), (2, 2049))
    out = []
    for B, n in sizes:
        X = rng.standard_normal((B, n, n))
        S = X @ X.transpose(0, 2, 1) / n + np.eye(n)
        for dtype in (cp.float32, cp.float64):
            M = cp.asarray(S, dtype=dtype)
            L = cp.linalg.cholesky(M)
            eye = cp.broadcast_to(cp.eye(n, dtype=dtype), M.shape)
            w, Q = cp.linalg.eigh(M)
            recon = (Q * w[:, None, :]) @ Q.transpose(0, 2, 1) - M
            err = float(cp.max(cp.linalg.norm(recon, axis=(1, 2)) / cp.linalg.norm(M, axis=(1, 2))))
            row = {"B": B, "n": n, "dtype": np.dtype(dtype).name,
                   "eigh_stacked_ms": ms(lambda: cp.linalg.eigh(M)),
                   "eigh_loop_ms": ms(lambda: [cp.linalg.eigh(M[i]) for i in range(B)]),
                   "eigh_kronlin_ms": ms(lambda: kronlin.Kron(M, M).eigh()) / 2,
                   "eigh_stacked_recon_err": err,
                   "inv_kronlin_ms": ms(lambda: kronlin.Kron(M, M).inv()) / 2,
                   "inv_lu_ms": ms(lambda: cp.linalg.solve(L, eye)),
                   "inv_trsm_loop_ms": ms(lambda: [csl.solve_triangular(L[i], eye[i], lower=True) for i in range(B)]),
                   "inv_cupy_ms": ms(lambda: cp.linalg.inv(M))}
            out.append(row)
            del M, L, eye, w, Q, recon
        cp.get_default_memory_pool().free_all_blocks()
    return out


def torch_kfac_step(quick: bool) -> list:
    """kronlin.torch on CUDA: the amortised KFAC step (refresh every 10) against the plain SGD step.

    Both train the same MLP from the same weights on the same batches (resident on the device); a block
    of 10 steps is timed wall-clock with the device synchronised at its ends, SGD and KFAC alternated
    (paired rounds, median of the per-round ratios).  KFAC is past its first refreshes (steady state).
    """
    import copy as _copy

    import torch

    from _harness import torch_mlp_task, torch_trainer
    import kronlin.torch as kt

    if not torch.cuda.is_available():
        return [{"skipped": "torch has no CUDA device"}]
    dev, out = torch.device("cuda"), []
    shapes = [((784, 512, 512, 10), 256)] + ([] if quick else [((2048, 2048, 2048, 10), 1024)])
    for sizes, N in shapes:
        for mode in ("factored", "exact"):
            base, batches = torch_mlp_task(sizes, N, device=dev)

            def trainer(model, pre, steps=10):
                run = torch_trainer(model, pre, batches, torch.cuda.synchronize)
                return lambda: 1e3 * run(steps)  # ms per step over a block of 10

            m_kfac = _copy.deepcopy(base)
            kfac = trainer(m_kfac, kt.KFAC(m_kfac, damping=1e-2, damping_mode=mode, refresh_period=10))
            sgd = trainer(base, None)
            for _ in range(3):  # warm-up: cuBLAS/cuSOLVER handles, the first refreshes
                kfac(), sgd()
            rounds = 5 if quick else 9
            k_ms, s_ms = [], []
            for _ in range(rounds):
                k_ms.append(kfac())
                s_ms.append(sgd())
            out.append({"sizes": "-".join(map(str, sizes)), "N": N, "damping_mode": mode, "dtype": "float32",
                        "kfac_ms": float(np.median(k_ms)), "sgd_ms": float(np.median(s_ms)),
                        "ratio": float(np.median(np.array(k_ms) / np.array(s_ms))), "rounds": rounds})
    return out


SECTIONS = {
    "solve_vs_gemms": solve_vs_gemms,
    "eig_scale": eig_scale_vs_composition,
    "gram": gram_vs_composition,
    "batched_eigh": batched_eigh,
    "eigh_failure": eigh_failure_path,
    "cupy_routes": cupy_routes,
    "torch_kfac": torch_kfac_step,
}


# -- report ---------------------------------------------------------------------------------------
def _fmt(v, spec=".3g"):
    return "–" if v is None else (format(v, spec) if isinstance(v, float) else str(v))


def _table_rows(rows, ncols: int, lead, row) -> list:
    """Markdown rows of ``ncols`` cells: ``row(r)``, or for a record that was skipped, ``lead(r)`` (the cells
    before the reason, possibly none), the reason, and empty cells."""
    out = []
    for r in rows:
        if "skipped" in r:
            cells = list(lead(r)) + [f"skipped: {r['skipped']}"]
            out.append("| " + " | ".join(cells) + " |" + " |" * (ncols - len(cells)))
        else:
            out.append(row(r))
    return out


def markdown(rec: dict) -> str:
    env = rec["environment"]
    L = [f"# GPU check {rec['date']}", "",
         f"{env['card']} ({env['multiprocessors']} SMs, {env['memory_gib']} GiB), driver {env['driver']}, "
         f"CUDA runtime {env['cuda_runtime']}, {env['nvcc']}, CuPy {env['cupy']}, torch {env['torch']}, "
         f"NumPy {env['numpy']}, Python {env['python']}. Times: CUDA events, medians; ratios paired "
         f"(kronlin and floor alternated, median of the ratios).", ""]
    s = rec["sections"]
    ratio_tables = (
        ("solve_vs_gemms", "KronEigh.solve against its four GEMMs (p = q = n)", "solve ms", "4 GEMMs ms",
         "rel_err_vs_composition"),
        ("eig_scale", "eig_scale kernel against the CuPy composition (in place vs. allocating)", "kernel ms",
         "composition ms", "max_rel_err"),
    )
    for key, title, what, floor, err in ratio_tables:
        if isinstance(s.get(key), list):
            L += [f"## {title}", "", f"| n | dtype | {what} | {floor} | ratio | rel. err |", "|---|---|---|---|---|---|"]
            L += [f"| {r['n']} | {r['dtype']} | {r['ms']:.3f} | {r['floor_ms']:.3f} | {r['ratio']:.3f} | "
                  f"{r[err]:.1e} |" for r in s[key]]
            L.append("")
    if isinstance(s.get("gram"), list):
        L += ["## Weight-sharing Gram kernel against the CuPy composition (N = 32, S = 1, d_in = d_out = 64)", "",
              "Speed-up = composition time / kernel time (paired). Peak = bytes the CuPy pool holds after one "
              "call from an emptied pool, the inputs included (listed).", "",
              "| T | dtype | composition ms | tile 32 ms | tile 64 ms | tile 128 ms | speed-up 32 / 64 / 128 | "
              "auto tile | kernel peak MiB | composition peak MiB | inputs MiB | rel. err |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|"]
        L += [f"| {r['T']} | {r['dtype']} | {r['composition_ms']:.3f} | {r['tile32_ms']:.3f} | {r['tile64_ms']:.3f} | "
              f"{r['tile128_ms']:.3f} | {r['tile32_speedup']:.2f} / {r['tile64_speedup']:.2f} / "
              f"{r['tile128_speedup']:.2f} | {r['auto_tile']} | "
              f"{r['kernel_peak_bytes'] / 2**20:.1f} | {r['composition_peak_bytes'] / 2**20:.1f} | "
              f"{r['input_bytes'] / 2**20:.1f} | "
              f"{max(r['tile32_rel_err'], r['tile64_rel_err'], r['tile128_rel_err']):.1e} |"
              for r in s["gram"]]
        L.append("")
    if isinstance(s.get("batched_eigh"), list):
        L += ["## Batched eigendecompositions (per factor stack)", "",
              "| B × n² | dtype | kronlin ms | loop ms | speed-up vs loop | cupy stack ms | loop on 8 streams ms | "
              "syevj ms | torch stack ms | recon. err |",
              "|---|---|---|---|---|---|---|---|---|---|"]
        L += [f"| {r['B']} × {r['n']}² | {r['dtype']} | {r['kronlin_ms']:.2f} | {r['loop_ms']:.2f} | "
              f"{r['speedup_vs_loop']:.2f} | {r['cupy_stack_ms']:.2f} | {_fmt(r.get('loop_8_streams_ms'), '.2f')} | "
              f"{_fmt(r.get('syevj_ms'), '.2f')} | {_fmt(r.get('torch_stack_ms'), '.2f')} | "
              f"{r['max_rel_recon_err']:.1e} |" for r in s["batched_eigh"]]
        L.append("")
    if isinstance(s.get("eigh_failure"), list):
        L += ["## eigh float32 failure path (n = 128)", "",
              "| case | cuSOLVER f32 non-finite | cuSOLVER error | kronlin non-finite | kronlin rel. err | kronlin raised |",
              "|---|---|---|---|---|---|"]
        L += _table_rows(s["eigh_failure"], 6, lambda r: [r["case"]], lambda r: (
            f"| {r['case']} | {_fmt(r['cusolver_float32_nonfinite'])} | {_fmt(r['cusolver_error'])} | "
            f"{_fmt(r['kronlin_nonfinite'])} | {_fmt(r['kronlin_rel_err'], '.1e')} | {_fmt(r['kronlin_raised'])} |"))
        L.append("")
    if isinstance(s.get("cupy_routes"), list):
        L += ["## CuPy decomposition routes (kronlin._linalg), ms", "",
              "eigh: CuPy's stacked call (syevjBatched) / a loop of syevd / kronlin's route (the checked stacked "
              "call for n ≤ 64, and n ≤ 128 from 4 matrices; else the loop); the stacked call's reconstruction "
              "error. SPD inverse: kronlin / batched LU solve of L / loop of solve_triangular / cupy.linalg.inv.", "",
              "| B × n² | dtype | eigh stacked | eigh loop | eigh kronlin | stacked recon. err | "
              "inv kronlin | inv LU | inv trsm loop | cupy inv |", "|---|---|---|---|---|---|---|---|---|---|"]
        L += [f"| {r['B']} × {r['n']}² | {r['dtype']} | {r['eigh_stacked_ms']:.2f} | "
              f"{r['eigh_loop_ms']:.2f} | {r['eigh_kronlin_ms']:.2f} | {r['eigh_stacked_recon_err']:.1e} | "
              f"{r['inv_kronlin_ms']:.2f} | {r['inv_lu_ms']:.2f} | {r['inv_trsm_loop_ms']:.2f} | {r['inv_cupy_ms']:.2f} |"
              for r in s["cupy_routes"]]
        L.append("")
    if isinstance(s.get("torch_kfac"), list):
        L += ["## kronlin.torch KFAC step on CUDA against the SGD step (float32, refresh every 10, steady state)", "",
              "Wall clock over blocks of 10 steps, device synchronised at the ends; SGD and KFAC alternated, "
              "ratio = median of the per-round ratios.", "",
              "| MLP | batch | damping | SGD step ms | KFAC step ms | KFAC / SGD |", "|---|---|---|---|---|---|"]
        L += _table_rows(s["torch_kfac"], 6, lambda r: [], lambda r: (
            f"| {r['sizes']} | {r['N']} | {r['damping_mode']} | {r['sgd_ms']:.2f} | {r['kfac_ms']:.2f} | "
            f"{r['ratio']:.2f}x |"))
        L.append("")
    for name, v in s.items():
        if isinstance(v, dict) and "error" in v:
            L += [f"**{name} failed**: `{v['error']}`", ""]
    for k, v in rec.get("checks", {}).items():
        L.append(f"- {k}: {v}")
    return "\n".join(L) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    ap.add_argument("--quick", action="store_true", help="smaller sizes (a minute or so)")
    ap.add_argument("--only", nargs="*", choices=sorted(SECTIONS), help="run only these sections")
    ap.add_argument("--checks", default=None, help="JSON file of the shell script's step results to include")
    args = ap.parse_args(argv)
    ok, why = _gpu_available()
    if not ok:
        print(f"device_check timings: skipped, {why}")
        return 0
    date = _dt.date.today().isoformat()
    rec = {"date": date, "environment": environment(), "sections": {}, "quick": args.quick}
    if args.checks and os.path.exists(args.checks):
        with open(args.checks) as fh:
            rec["checks"] = json.load(fh)
    os.makedirs(args.out, exist_ok=True)
    base = os.path.join(args.out, f"gpu-{date}")
    for name in args.only or SECTIONS:
        t0 = time.perf_counter()
        try:
            rec["sections"][name] = SECTIONS[name](args.quick)
        except Exception as exc:  # noqa: BLE001 - record and go on: one call must return everything
            traceback.print_exc()
            rec["sections"][name] = {"error": f"{type(exc).__name__}: {exc}"[:500]}
        print(f"device_check timings: {name} done in {time.perf_counter() - t0:.1f} s", file=sys.stderr, flush=True)
        with open(base + ".json", "w") as fh:  # written after every section: a timeout keeps what ran
            json.dump(rec, fh, indent=1)
    md = markdown(rec)
    with open(base + ".md", "w") as fh:
        fh.write(md)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
