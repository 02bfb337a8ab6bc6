"""The self-check's report: the header (versions, extension), the legend, one table row per check."""

from __future__ import annotations

import os
import platform
from dataclasses import dataclass
from typing import Optional

import numpy as np
import scipy

from ..kernels import load_info
from .checks import BASE_TOL, KAPPA_REF
from .problems import (
    CG_SHIFT,
    COND,
    DAMPING,
    DENSE_REF_LIMIT,
    GAMMA,
    NET_GAMMA,
    STEIN_RHO,
    WOODBURY_COND,
)
from .timing import fmt_time

__all__ = ["Row", "COLUMNS", "table_line", "format_row", "header", "legend"]


@dataclass
class Row:
    method: str
    p: int
    q: int
    dtype: str
    check: str
    error: float
    tol: float
    seconds: Optional[float]
    speedup: Optional[float]
    ok: bool
    note: str = ""


COLUMNS = (
    ("method", 27, "<"),
    ("p", 4, ">"),
    ("q", 4, ">"),
    ("dtype", 8, "<"),
    ("check", 6, "<"),
    ("error", 9, ">"),
    ("tol", 8, ">"),
    ("time", 10, ">"),
    ("dense/kronlin", 13, ">"),
    ("status", 6, "<"),
)


def table_line(values) -> str:
    return "  ".join(f"{v:{align}{width}}" for v, (_, width, align) in zip(values, COLUMNS)).rstrip()


def format_row(r: Row) -> str:
    err = "ERROR" if r.check == "raised" else (f"{r.error:.2e}" if np.isfinite(r.error) else str(r.error))
    speed = "-" if r.speedup is None else (f"{r.speedup:.3g}x" if r.speedup < 1e4 else f"{r.speedup:.2e}x")
    return table_line(
        (r.method, r.p, r.q, r.dtype, r.check, err, f"{r.tol:.0e}", fmt_time(r.seconds), speed,
         "ok" if r.ok else "FAIL")
    )


def header(kl, out) -> None:
    info = kl.extension_info()
    w = lambda s="": print(s, file=out)  # noqa: E731
    w("kronlin self-check")
    w("=" * 18)
    w(f"kronlin {kl.__version__} ({os.path.dirname(kl.__file__)})")
    w(f"numpy {np.__version__}, scipy {scipy.__version__}, python {platform.python_version()}, "
      f"{platform.machine()}, {os.cpu_count()} CPUs")
    w("extension_info(): " + ", ".join(f"{k}={v}" for k, v in info.items()))
    if not info.get("cpu_extension") or info.get("disabled"):
        if not info.get("cpu_extension"):
            why = f"it is not built or failed to import ({load_info()['cpu_import_error']})."
            fix = "Install kronlin (pip install .) and run from outside the source tree, which has no compiled module."
        else:
            why = "it is disabled (KRONLIN_DISABLE_EXT is set)."
            fix = "Unset KRONLIN_DISABLE_EXT to use the compiled kernels."
        w("")
        w("!" * 78)
        w("WARNING: the compiled CPU extension kronlin._C is NOT in use:")
        w(f"  {why}")
        w("  Every kernel runs its NumPy reference implementation, so the timings below")
        w("  are not those of the compiled build.")
        w(f"  {fix}")
        w("!" * 78)


def legend(out) -> None:
    w = lambda s="": print(s, file=out)  # noqa: E731
    w("")
    w(f"A (p,p), G (q,q): SPD with cond {COND:.0e} each (cond(A (x) G) = {COND**2:.0e}); products, .T and the")
    w("general solve use non-symmetric factors with singular values in the same range.")
    w(f"d = damping {DAMPING:g}; g = gamma {GAMMA:g}; cg on Kron(A + {CG_SHIFT:g} I, G + {CG_SHIFT:g} I).")
    w("solve_kron_sum: B U A^T + sign D U C^T = X with (A, B) = (A, G), symmetric C, D, rho(A^-1 C) rho(B^-1 D)")
    w(f"         = {STEIN_RHO:g}; 'gen' = non-symmetric An, Gn, C, D (same rho bound), sign -1.")
    w("DampedKron(mode): A (x) G + d I exact, or factored (A + pi sqrt(d) I) (x) (G + sqrt(d)/pi I).")
    w(f"Networks (listed per size): batch_factors and Block*Inverse (gamma {NET_GAMMA:g}) on a tanh MLP's statistics,")
    w(f"         WoodburyFisher on a weight-sharing + dense network with cond(damping I + F) = {WOODBURY_COND:.0e}.")
    w("error  = max|kronlin - reference| / max|reference|, references in float64 from the same inputs;")
    w("         check: dense = dense matrix, rows = sampled dense rows, resid = max|M y - x| / max|x|,")
    w("                ident = Kronecker identity on the factors, diag = dense diagonal")
    w(f"tol    = {BASE_TOL['float64']:.0e} (float64) / {BASE_TOL['float32']:.0e} (float32), times "
      f"max(1, cond/{KAPPA_REF:.0e}) where an inverse is involved")
    w("time   = median of 3-5 timed runs (after a warm-up) of the kronlin call from the raw factors")
    w("         (factorizations included), with the BLAS/OpenMP threads of the header")
    w("dense/kronlin = time of scipy.linalg.solve(np.kron(A, G), vec(X)) / kronlin time, same size and")
    w(f"         dtype ('-' where p*q > {DENSE_REF_LIMIT}: the dense matrix is too large to form); network rows:")
    w("         the dense solve of the network's own P x P matrix, formed from the same inputs")
