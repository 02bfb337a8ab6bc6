"""Self-check behind ``python -m kronlin``: every public method against dense NumPy/SciPy.

For each problem size ``(p, q)`` and dtype, random factors are drawn from
``numpy.random.default_rng(seed)``:

* symmetric positive definite ``A`` (p, p) and ``G`` (q, q) with eigenvalues
  log-spaced in ``[1/COND, 1]`` (condition number ``COND = 1e2`` each, so
  ``cond(A ⊗ G) = 1e4``) in a random orthonormal basis;
* non-symmetric ``An`` (p, p), ``Gn`` (q, q) with singular values log-spaced in
  ``[1/COND, 1]``, used for the products and the transpose (a symmetric
  factor cannot tell ``A`` from ``Aᵀ``) and for the general (LU) solve;
* a right-hand side ``X`` (q, p) and a block ``V`` (p*q, 4) of flat vectors.

The checks of the Kronecker-sum, damping and network API draw further inputs
from their own stream ``numpy.random.default_rng((seed, p, q))`` (so the
draws above stay what they were):

* ``solve_kron_sum(A, B, C, D, X, sign, method)`` (``B U Aᵀ + sign·D U Cᵀ = X``)
  with ``A``, ``B`` the SPD ``A``, ``G`` above and symmetric ``C = L_A S L_Aᵀ``,
  ``D = L_G S' L_Gᵀ`` (``L`` Cholesky factors, ``S``, ``S'`` with eigenvalues
  ``±sqrt(STEIN_RHO)``), so ``ρ(A⁻¹C)·ρ(G⁻¹D) = STEIN_RHO = 0.5``: Smith
  converges and both signs give an SPD sum of condition at most
  ``cond(A ⊗ G)·(1 + ρ)/(1 − ρ)``; for ``method="schur"`` also the
  non-symmetric ``An``, ``Gn`` with ``Cn = An R``, ``Dn = Gn R'``
  (``‖R‖₂ = ‖R'‖₂ = sqrt(STEIN_RHO)``), sign −1;
* ``DampedKron(A, G, DAMPING, mode)``: the exact ``A ⊗ G + DAMPING·I`` and the
  factored ``(A + π√d I) ⊗ (G + (√d/π) I)`` (π by the trace rule);
* a random tanh MLP (three layers, widths about ``1.4·sqrt`` of ``p`` and
  ``q``, at most ``NET_MAX_PARAMS`` parameters) whose activations and
  back-propagated vectors feed ``batch_factors`` (against ``āᵀā/N``,
  ``gᵀg/N`` in NumPy) and, as exact factor estimates rounded to the dtype,
  ``BlockDiagInverse`` and ``BlockTridiagInverse`` with ``gamma = NET_GAMMA``:
  ``apply`` against ``to_dense()`` and against dense references built from
  the damped ``F̃``'s blocks (per-block dense solves; for the tridiagonal one
  ``F̂⁻¹`` assembled from the inverses of neighbouring block pairs), and
  ``np.linalg.inv(to_dense())`` against ``F̃`` on its tridiagonal blocks;
* a weight-sharing + dense network (random activations and errors, ``S = 2``
  labels per input) for ``WoodburyFisher`` with the damping that gives
  ``cond(λI + F) = WOODBURY_COND``: ``solve``, ``matvec`` and ``logdet``
  against ``F = G Gᵀ/N`` from per-example gradients formed in the check only.

The float32 problem is the float64 problem rounded to float32.  Every
reference is computed in float64 from the very inputs kronlin received (the
float32 ones cast up), so an error measures kronlin's arithmetic alone.

Each (method, size, dtype) gives one row: the relative error, the tolerance,
the time of kronlin's call and the ratio "dense solve time / kronlin time".
The dense solve is ``scipy.linalg.solve(np.kron(A, G), vec(X))`` in the same
dtype, ``np.kron`` included, because kronlin's timed calls also start from the
raw factors (see :func:`_median_time`).  The network rows compare with the dense
solve of their own ``P x P`` matrix instead (the damped ``F̃`` on its
tridiagonal blocks, ``λI + F``), formed from the same inputs.

How an error is measured (the ``check`` column):

``dense``
    against the dense matrix ``np.kron(A, G)`` itself (``scipy.linalg.solve``,
    ``scipy.linalg.inv``, ``scipy.linalg.eigh``, ``np.linalg.slogdet``,
    ``np.linalg.norm``, or one shared dense Cholesky factor,
    ``scipy.linalg.cho_factor``, for the SPD solve and log-determinant);
    ``max|got - ref| / max|ref|``.
``rows``
    against a random sample of rows of the dense matrix: of ``np.kron(A, G)``,
    each row built as ``np.kron(A[i], G[j])``, where the whole matrix would
    not fit in memory; of the dense inverse, from the dense Cholesky factor,
    where a full ``scipy.linalg.inv`` would dominate the run time.
``resid``
    the residual of the defining equation, ``max|M y - x| / max|x|``, with
    ``M`` applied densely (``p*q <= DENSE_REF_LIMIT``) or as ``G @ Y @ A.T``
    in NumPy float64.
``ident``
    a Kronecker identity evaluated on the factors with NumPy/SciPy alone
    (``det(A ⊗ G) = det(A)^q det(G)^p``, ``‖A ⊗ I_q‖_* = q ‖A‖_*``, ...).
``diag``
    ``tr(A ⊗ G)`` as the sum of the dense diagonal ``np.kron(diag A, diag G)``.

Dense references are used where ``p*q <= DENSE_REF_LIMIT`` (4096; a float64
``np.kron`` of that order is 128 MiB).  The costliest of them (a dense
``eigh`` or SVD, a full ``scipy.linalg.inv``, an LU ``slogdet`` of the
``p*q`` square matrix) only where ``p*q <= SPECTRAL_REF_LIMIT`` (1024); up to
``DENSE_REF_LIMIT`` they are replaced by the dense Cholesky factor, a
residual with the dense matrix, or a Kronecker identity.  Larger sizes fall
back to ``rows``, ``resid`` or ``ident`` as listed above.  The network rows
are dense at every size: their parameter count is capped instead.
"""

from __future__ import annotations

import math
import os
import platform
import sys
import time
import traceback
from dataclasses import dataclass
from functools import cached_property
from typing import Callable, Optional

import numpy as np
import scipy
import scipy.linalg
import scipy.sparse.linalg

from ._threads import DEFAULT_THREADS, thread_limit

__all__ = ["run", "DEFAULT_SIZES", "QUICK_SIZES", "DENSE_REF_LIMIT", "SPECTRAL_REF_LIMIT"]

#: Problem sizes ``(p, q)`` of a full run and of ``--quick``.
DEFAULT_SIZES = ((8, 5), (64, 48), (256, 192))
QUICK_SIZES = ((8, 5), (24, 16))

#: Largest ``p*q`` for which the dense ``(p*q, p*q)`` matrix is formed and solved.
DENSE_REF_LIMIT = 4096
#: Largest ``p*q`` for which a dense ``eigh``/SVD/inverse/LU of that matrix serves as reference.
SPECTRAL_REF_LIMIT = 1024

#: Condition number of each generated factor (so ``cond(A ⊗ G) = COND**2``).
COND = 1e2
#: Tikhonov damping of the ``KronEigh`` solve and power checks.
DAMPING = 1e-3
#: ``gamma`` of the ``factored_damping`` check.
GAMMA = 1e-2
#: The CG check runs on ``Kron(A + CG_SHIFT*I, G + CG_SHIFT*I)`` (condition ~300)
#: so that it converges in a few hundred iterations at every size.
CG_SHIFT = 5e-2
#: Iteration cap of the CG check (it needs about 250 at the default settings).
CG_MAXITER = 2000
#: Number of flat right-hand sides for ``matmat`` and sampled rows for ``rows``.
MATMAT_K = 4
SAMPLED_ROWS = 128
#: ``ρ(A⁻¹C)·ρ(B⁻¹D)`` of the ``solve_kron_sum`` problems (split evenly between
#: the two pairs): below 1, so Smith converges and ``A ⊗ B − C ⊗ D`` is
#: positive definite, and ``cond(A ⊗ B ± C ⊗ D) <= cond(A ⊗ B) (1 + ρ) / (1 − ρ)``.
STEIN_RHO = 0.5
#: Factored damping γ of the ``BlockDiagInverse`` / ``BlockTridiagInverse`` checks.
NET_GAMMA = 0.1
#: Largest parameter count of the generated networks (their dense references
#: are ``P x P`` inverses and eigenvalues).
NET_MAX_PARAMS = 1500
#: ``cond(λI + F)`` of the ``WoodburyFisher`` checks (λ is chosen to give it)
#: and the number of labels per input ``S`` (an MC Fisher with two samples).
WOODBURY_COND = 1e3
WOODBURY_LABELS = 2

# Tolerance rule.  The base tolerances (1e-10 float64, 1e-4 float32) are set
# for well-conditioned work: products, traces, norms, and anything whose
# conditioning is at most that of one factor (COND = 1e2).  Where the result
# involves an inverse (solve, inv, logdet, damped eigenbasis solve, inverse
# power, CG) its forward error (or its residual relative to ||x||) can grow like
# kappa * eps, kappa the 2-norm condition number of the matrix inverted, so
# such rows use  tol = base * max(1, kappa / KAPPA_REF)  with KAPPA_REF = COND.
BASE_TOL = {"float64": 1e-10, "float32": 1e-4}
KAPPA_REF = COND


def _tolerance(dtype: str, kappa: float = 1.0) -> float:
    """Tolerance of one row: ``BASE_TOL[dtype] * max(1, kappa / KAPPA_REF)``."""
    return BASE_TOL[dtype] * max(1.0, kappa / KAPPA_REF)


# -- problem generation ----------------------------------------------------------


def _orthonormal(rng: np.random.Generator, n: int) -> np.ndarray:
    Q, R = np.linalg.qr(rng.standard_normal((n, n)))
    return Q * np.sign(np.diag(R))


def _spectrum(n: int, cond: float) -> np.ndarray:
    return np.logspace(0.0, -math.log10(cond), n) if n > 1 else np.ones(1)


def _spd(rng: np.random.Generator, n: int, cond: float) -> np.ndarray:
    """Symmetric positive definite, eigenvalues log-spaced in ``[1/cond, 1]``, exactly symmetric."""
    Q = _orthonormal(rng, n)
    M = (Q * _spectrum(n, cond)) @ Q.T
    return (M + M.T) / 2


def _general(rng: np.random.Generator, n: int, cond: float) -> np.ndarray:
    """Non-symmetric, singular values log-spaced in ``[1/cond, 1]``."""
    U, W = _orthonormal(rng, n), _orthonormal(rng, n)
    return (U * _spectrum(n, cond)) @ W.T


def _vec(X: np.ndarray) -> np.ndarray:
    """Column-stacking ``vec`` (docs/design.md §1)."""
    return np.asarray(X, dtype=np.float64).flatten(order="F")


def _f64(x) -> np.ndarray:
    return np.asarray(x, dtype=np.float64)


def _relerr(got, ref) -> float:
    """``max|got - ref| / max|ref|`` in float64 (absolute when the reference is zero)."""
    got, ref = _f64(got), _f64(ref)
    if got.shape != ref.shape:
        raise ValueError(f"result has shape {got.shape}, reference {ref.shape}")
    scale = float(np.max(np.abs(ref))) if ref.size else 0.0
    diff = float(np.max(np.abs(got - ref))) if ref.size else 0.0
    return diff / scale if scale > 0 else diff


def _kron_rows(A: np.ndarray, G: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """Rows ``rows`` of ``np.kron(A, G)``: row ``r`` is ``np.kron(A[r // q], G[r % q])``."""
    p, q = A.shape[0], G.shape[0]
    return (A[rows // q][:, :, None] * G[rows % q][:, None, :]).reshape(len(rows), p * q)


# -- problems of the Kronecker-sum and network checks ------------------------------------


def _sym_pencil(rng: np.random.Generator, L: np.ndarray, r: float) -> np.ndarray:
    """Symmetric ``L S Lᵀ`` with ``S`` of eigenvalues ``r·linspace(-1, 1)``: ``ρ((L Lᵀ)⁻¹ C) = r``.

    ``(L Lᵀ)⁻¹ L S Lᵀ = L⁻ᵀ S Lᵀ`` is similar to ``S``, so with ``A = L Lᵀ`` the
    generalized eigenvalues of ``(C, A)`` are those of ``S``, both signs included.
    """
    n = L.shape[0]
    Q = _orthonormal(rng, n)
    s = r * (np.linspace(-1.0, 1.0, n) if n > 1 else np.ones(1))
    M = L @ ((Q * s) @ Q.T) @ L.T
    return (M + M.T) / 2


def _general_pencil(rng: np.random.Generator, A: np.ndarray, r: float) -> np.ndarray:
    """Non-symmetric ``A R`` with ``‖R‖₂ = r``, so ``ρ(A⁻¹C) <= ‖A⁻¹C‖₂ = r``."""
    return A @ (r * _general(rng, A.shape[0], 10.0))


def _net_widths(p: int, q: int) -> tuple:
    """Widths ``(a, b, a, b)`` of the three-layer networks of problem ``(p, q)``: about ``1.4·sqrt``
    of ``p`` and ``q``, shrunk until the MLP has at most ``NET_MAX_PARAMS`` parameters."""
    a, b = (max(2, math.ceil(1.4 * math.sqrt(n))) for n in (p, q))
    while a > 2 or b > 2:
        if 3 * a * b + 2 * b + a <= NET_MAX_PARAMS:  # (a+1)b + (b+1)a + (a+1)b
            break
        a, b = (a - 1, b) if a >= b else (a, b - 1)
    return (a, b, a, b)


def _tanh_mlp(rng: np.random.Generator, widths, N: int):
    """Activations ``(N, d_k)`` and back-propagated vectors ``(N, d_{k+1})`` of a random tanh MLP.

    Layer ``k`` maps ``d_k -> d_{k+1}`` with homogeneous weights ``(d_{k+1}, d_k + 1)``; the
    output's back-propagated vectors are standard normal (the Fisher of a squared-error model
    with targets sampled from its predictive distribution, K-FAC §5).
    """
    L = len(widths) - 1
    Ws = [rng.standard_normal((widths[k + 1], widths[k] + 1)) / math.sqrt(widths[k] + 1) for k in range(L)]
    a = rng.standard_normal((N, widths[0]))
    acts, pre = [], []
    for k, W in enumerate(Ws):
        acts.append(a)
        s = np.concatenate([a, np.ones((N, 1))], axis=1) @ W.T
        pre.append(s)
        a = np.tanh(s) if k < L - 1 else s
    g = rng.standard_normal((N, widths[-1]))
    grads = [g] * L
    for k in range(L - 1, -1, -1):
        grads[k] = g
        if k > 0:
            g = (g @ Ws[k][:, :-1]) * (1.0 - np.tanh(pre[k - 1]) ** 2)
    return acts, grads


_FACTOR_KEYS = ("A_diag", "G_diag", "A_off", "G_off")


def _mlp_factors(acts, grads) -> dict:
    """K-FAC's batch factors in NumPy float64: ``ā_kᵀ ā_j / N`` and ``g_kᵀ g_j / N``, ``j ∈ {k, k+1}``."""
    N = acts[0].shape[0]
    A = [np.concatenate([_f64(a), np.ones((N, 1))], axis=1) for a in acts]
    G = [_f64(g) for g in grads]
    n = len(A)
    return {
        "A_diag": [a.T @ a / N for a in A],
        "G_diag": [g.T @ g / N for g in G],
        "A_off": [A[k].T @ A[k + 1] / N for k in range(n - 1)],
        "G_off": [G[k].T @ G[k + 1] / N for k in range(n - 1)],
    }


def _damped_tridiag(f: dict, gamma: float):
    """The damped ``F̃`` (K-FAC §6.3 factored damping, π by the trace rule) on its tridiagonal blocks.

    Returns the dense ``P x P`` matrix (zero outside the tridiagonal blocks), the layer
    offsets and the damped diagonal factor pairs.  Works in the dtype of ``f``.
    """
    pairs = []
    for A, G in zip(f["A_diag"], f["G_diag"]):
        pi = math.sqrt((np.trace(A) / A.shape[0]) / (np.trace(G) / G.shape[0]))
        pairs.append((A + pi * gamma * np.eye(A.shape[0], dtype=A.dtype),
                      G + gamma / pi * np.eye(G.shape[0], dtype=G.dtype)))
    sizes = [A.shape[0] * G.shape[0] for A, G in pairs]
    off = np.concatenate([[0], np.cumsum(sizes)]).astype(int)
    F = np.zeros((off[-1], off[-1]), dtype=pairs[0][0].dtype)
    for k, (A, G) in enumerate(pairs):
        F[off[k]:off[k + 1], off[k]:off[k + 1]] = np.kron(A, G)
    for k, (Ao, Go) in enumerate(zip(f["A_off"], f["G_off"])):
        B = np.kron(Ao, Go)
        F[off[k]:off[k + 1], off[k + 1]:off[k + 2]] = B
        F[off[k + 1]:off[k + 2], off[k]:off[k + 1]] = B.T
    return F, off, pairs


def _chain_inverse(F: np.ndarray, off) -> np.ndarray:
    """The inverse of the matrix that agrees with ``F`` on its tridiagonal blocks and has a
    block-tridiagonal inverse (K-FAC §4.3's ``F̂⁻¹``), from ``F``'s blocks alone.

    A chain of layers is a decomposable graph: ``F̂⁻¹ = Σ_k pad(F_{k:k+2, k:k+2}⁻¹) − Σ_k pad(F_{k,k}⁻¹)``
    over the neighbouring pairs and the interior layers they share.
    """
    n = len(off) - 1
    if n == 1:
        return np.linalg.inv(F)
    out = np.zeros_like(F)
    for k in range(n - 1):
        s = slice(off[k], off[k + 2])
        out[s, s] += np.linalg.inv(F[s, s])
    for k in range(1, n - 1):
        s = slice(off[k], off[k + 1])
        out[s, s] -= np.linalg.inv(F[s, s])
    return (out + out.T) / 2


def _layers_vec(Us) -> np.ndarray:
    """Concatenation of the column-stacked vecs of per-layer ``(d_out, d_in)`` arrays (docs/design.md §1)."""
    return np.concatenate([_vec(u) for u in Us])


def _woodbury_spec(p: int, q: int) -> dict:
    """A small weight-sharing + dense network for ``WoodburyFisher``: widths from :func:`_net_widths`."""
    a, b = _net_widths(p, q)[:2]
    return {
        "T": max(2, round(math.sqrt(q))),  # weight-sharing positions of the first layer
        "N": min(24, max(2, round(math.sqrt(p * q) / 8))),
        "layers": (("shared", a, b), ("dense", b, a), ("dense", a, b)),  # (kind, d_in, d_out)
    }


def _woodbury_net(rng: np.random.Generator, spec: dict):
    """Random activations and errors, ``(N, T, d_in)`` / ``(N, S, T, d_out)`` for the weight-sharing layer and
    ``(N, d_in)`` / ``(N, S, d_out)`` for the dense ones."""
    N, T, S = spec["N"], spec["T"], WOODBURY_LABELS
    acts, errs = [], []
    for kind, da, de in spec["layers"]:
        if kind == "shared":
            acts.append(rng.standard_normal((N, T, da)))
            errs.append(rng.standard_normal((N, S, T, de)))
        else:
            acts.append(rng.standard_normal((N, da)))
            errs.append(rng.standard_normal((N, S, de)))
    return acts, errs


def _per_example_grads(acts, errs) -> np.ndarray:
    """``P x M``: the column-stacked per-example gradients ``g_c = Σ_t e_{c,t} a_{i,t}ᵀ`` (``c = i·S + s``)."""
    cols = []
    for a, e in zip(acts, errs):
        a3 = a[:, None, :] if a.ndim == 2 else a  # (N, T, d_in)
        e4 = e.reshape(e.shape[0], e.shape[1], a3.shape[1], e.shape[-1])  # (N, S, T, d_out)
        g = np.einsum("nsto,nti->nsio", e4, a3)  # (N, S, d_in, d_out): vec(g_c) = g[n, s].ravel()
        cols.append(g.reshape(g.shape[0] * g.shape[1], -1))
    return np.concatenate(cols, axis=1).T


def _extra_base(seed: int, p: int, q: int, A, G, An, Gn) -> dict:
    """Inputs of the Kronecker-sum, ``DampedKron`` and network checks of problem ``(p, q)``.

    Drawn from their own stream, ``default_rng((seed, p, q))``, so the ``Kron``
    problems keep the draws they always had.
    """
    rng = np.random.default_rng((seed, p, q))
    r = math.sqrt(STEIN_RHO)
    ext = {
        "C": _sym_pencil(rng, np.linalg.cholesky(A), r),
        "D": _sym_pencil(rng, np.linalg.cholesky(G), r),
        "Cn": _general_pencil(rng, An, r),
        "Dn": _general_pencil(rng, Gn, r),
    }
    widths = _net_widths(p, q)
    n_mlp = 2 * max(widths) + 8
    acts, grads = _tanh_mlp(rng, widths, n_mlp)
    ext["mlp"] = {
        "widths": widths,
        "acts": acts,
        "grads": grads,
        "V": [rng.standard_normal((widths[k + 1], widths[k] + 1)) for k in range(len(widths) - 1)],
    }
    spec = _woodbury_spec(p, q)
    wacts, werrs = _woodbury_net(rng, spec)
    Gm = _per_example_grads(wacts, werrs)
    lmax = float(np.linalg.eigvalsh(Gm.T @ Gm / spec["N"])[-1])
    ext["woodbury"] = {
        "spec": spec,
        "acts": wacts,
        "errs": werrs,
        "damping": lmax / (WOODBURY_COND - 1.0),  # cond(λI + F) = (λmax + λ) / λ
        "U": [rng.standard_normal((de, da)) for _, da, de in spec["layers"]],
    }
    return ext


class _MLPProblem:
    """The tanh MLP of one problem in one dtype: what kronlin receives, float64 references.

    ``acts``/``grads`` go to ``batch_factors``; the factors handed to the inverse
    classes are the exact float64 estimates rounded to the dtype (so a fault of
    ``batch_factors`` shows in its own row only).
    """

    def __init__(self, base: dict, dtype: str):
        self.widths = base["widths"]
        self.N = base["acts"][0].shape[0]
        self.acts = [a.astype(dtype) for a in base["acts"]]
        self.grads = [g.astype(dtype) for g in base["grads"]]
        self.acts64, self.grads64 = [_f64(a) for a in self.acts], [_f64(g) for g in self.grads]
        f = _mlp_factors(base["acts"], base["grads"])
        f["A_diag"] = [(M + M.T) / 2 for M in f["A_diag"]]
        f["G_diag"] = [(M + M.T) / 2 for M in f["G_diag"]]
        self.f = {k: [M.astype(dtype) for M in v] for k, v in f.items()}
        self.f64 = {k: [_f64(M) for M in v] for k, v in self.f.items()}
        self.V = [v.astype(dtype) for v in base["V"]]
        self.v64 = _layers_vec([_f64(v) for v in self.V])
        self.n_params = int(self.v64.size)

    def describe(self) -> str:
        return f"tanh MLP widths {self.widths}, N={self.N}, P={self.n_params}"

    @cached_property
    def tridiag(self):
        """``(F̃ on its tridiagonal blocks, layer offsets, damped factor pairs)`` in float64."""
        return _damped_tridiag(self.f64, NET_GAMMA)

    @cached_property
    def Finv_ref(self) -> np.ndarray:
        """K-FAC §4.3's ``F̂⁻¹`` from the dense tridiagonal blocks of ``F̃`` (:func:`_chain_inverse`)."""
        F, off, _ = self.tridiag
        return _chain_inverse(F, off)

    @cached_property
    def kappa_tri(self) -> float:
        """``cond(F̂)`` from the eigenvalues of the reference ``F̂⁻¹``."""
        w = np.linalg.eigvalsh(self.Finv_ref)
        if not w[0] > 0:
            raise ValueError(f"the reference F̂⁻¹ is not positive definite (smallest eigenvalue {w[0]:.3g})")
        return float(w[-1] / w[0])

    @cached_property
    def kappa_diag(self) -> float:
        """Largest ``cond(Ā_k ⊗ G_k)`` of the damped diagonal blocks."""
        out = 1.0
        for A, G in self.tridiag[2]:
            wa, wg = np.linalg.eigvalsh(A), np.linalg.eigvalsh(G)
            out = max(out, float(wa[-1] / wa[0] * wg[-1] / wg[0]))
        return out

    @cached_property
    def dense_time(self) -> float:
        """Dense solve with the damped ``F̃`` (tridiagonal blocks), formed from the factors in their dtype."""
        v = self.v64.astype(self.V[0].dtype)
        return _median_time(lambda: scipy.linalg.solve(_damped_tridiag(self.f, NET_GAMMA)[0], v),
                          repeats=3, min_repeats=2, budget=0.1)


class _WoodburyProblem:
    """The weight-sharing + dense network of ``WoodburyFisher`` in one dtype, with float64 references
    built from per-example gradients materialised here (and nowhere in kronlin's calls)."""

    def __init__(self, base: dict, dtype: str):
        self.spec, self.damping = base["spec"], float(base["damping"])
        self.acts = [a.astype(dtype) for a in base["acts"]]
        self.errs = [e.astype(dtype) for e in base["errs"]]
        self.U = [u.astype(dtype) for u in base["U"]]
        self.u64 = _layers_vec([_f64(u) for u in self.U])
        self.n_params = int(self.u64.size)
        self.n_columns = self.spec["N"] * WOODBURY_LABELS
        self.kappa = WOODBURY_COND

    def describe(self) -> str:
        T = self.spec["T"]
        layers = ", ".join(f"{da}->{de}" + (f" shared over T={T}" if kind == "shared" else "")
                           for kind, da, de in self.spec["layers"])
        return f"layers {layers}; N={self.spec['N']} x S={WOODBURY_LABELS}, P={self.n_params}, M={self.n_columns}"

    @cached_property
    def F(self) -> np.ndarray:
        """``F = (1/N) G Gᵀ`` from the dense per-example gradients of the inputs kronlin received."""
        Gm = _per_example_grads([_f64(a) for a in self.acts], [_f64(e) for e in self.errs])
        return Gm @ Gm.T / self.spec["N"]

    @cached_property
    def cho(self):
        """Dense Cholesky factor of ``λI + F``."""
        return scipy.linalg.cho_factor(self.F + self.damping * np.eye(self.n_params), lower=True)

    @cached_property
    def dense_time(self) -> float:
        """Dense solve with ``λI + F`` formed from the per-example gradients, in the inputs' dtype."""
        u = self.u64.astype(self.U[0].dtype)

        def call():
            Gm = _per_example_grads(self.acts, self.errs)
            M = Gm @ Gm.T
            M *= 1.0 / self.spec["N"]
            M[np.diag_indices_from(M)] += self.damping
            return scipy.linalg.solve(M, u)

        return _median_time(call, repeats=3, min_repeats=2, budget=0.1)


class _Problem:
    """One random problem of size ``(p, q)`` in one dtype, with cached float64 references."""

    def __init__(self, base: dict, dtype: str, rows: np.ndarray):
        self.p, self.q, self.dtype = base["p"], base["q"], dtype
        self.n = self.p * self.q
        cast = {k: base[k].astype(dtype) for k in ("A", "G", "An", "Gn", "X", "V")}
        self.A, self.G, self.An, self.Gn, self.X, self.V = (cast[k] for k in ("A", "G", "An", "Gn", "X", "V"))
        # the inputs kronlin receives, cast up exactly: every reference starts from these
        self.A64, self.G64, self.An64, self.Gn64, self.X64, self.V64 = (
            _f64(cast[k]) for k in ("A", "G", "An", "Gn", "X", "V")
        )
        self.x64 = _vec(self.X64)
        self.rows = rows
        self.dense = self.n <= DENSE_REF_LIMIT
        self.spectral = self.n <= SPECTRAL_REF_LIMIT
        lam = _spectrum(self.p, COND)
        mu = _spectrum(self.q, COND)
        self.kappa = float(lam[0] / lam[-1] * mu[0] / mu[-1])  # cond(A ⊗ G) = cond(A) cond(G)
        self.lmax, self.lmin = float(lam[0] * mu[0]), float(lam[-1] * mu[-1])
        self.kappa_damped = (self.lmax + DAMPING) / (self.lmin + DAMPING)
        la_c, lg_c = lam + CG_SHIFT, mu + CG_SHIFT
        self.kappa_cg = float(la_c[0] * lg_c[0] / (la_c[-1] * lg_c[-1]))
        # Kronecker sums: C, D next to (A, G) and Cn, Dn next to (An, Gn), ρ(A⁻¹C)ρ(G⁻¹D) <= STEIN_RHO
        ext = base["ext"]
        self._ext = ext
        self.C, self.D, self.Cn, self.Dn = (ext[k].astype(dtype) for k in ("C", "D", "Cn", "Dn"))
        self.C64, self.D64, self.Cn64, self.Dn64 = (_f64(M) for M in (self.C, self.D, self.Cn, self.Dn))
        self.kappa_stein = self.kappa * (1.0 + STEIN_RHO) / (1.0 - STEIN_RHO)
        self._kron_sum_refs: dict = {}
        # DampedKron(mode="factored"): (A + π√d I) ⊗ (G + (√d/π) I), π by the trace rule
        g = math.sqrt(DAMPING)
        pi = math.sqrt((np.trace(self.A64) / self.p) / (np.trace(self.G64) / self.q))
        self.A_fd = self.A64 + pi * g * np.eye(self.p)
        self.G_fd = self.G64 + g / pi * np.eye(self.q)
        self.kappa_fd = float((lam[0] + pi * g) * (mu[0] + g / pi) / ((lam[-1] + pi * g) * (mu[-1] + g / pi)))

    @cached_property
    def mlp(self) -> _MLPProblem:
        return _MLPProblem(self._ext["mlp"], self.dtype)

    @cached_property
    def woodbury(self) -> _WoodburyProblem:
        return _WoodburyProblem(self._ext["woodbury"], self.dtype)

    def stein_factors(self, general: bool):
        """``(A, B, C, D)`` of a Kronecker-sum check, as kronlin receives them and cast up."""
        if general:
            return (self.An, self.Gn, self.Cn, self.Dn), (self.An64, self.Gn64, self.Cn64, self.Dn64)
        return (self.A, self.G, self.C, self.D), (self.A64, self.G64, self.C64, self.D64)

    def kron_sum_solution(self, general: bool, sign: int) -> np.ndarray:
        """``scipy.linalg.solve(np.kron(A, B) + sign·np.kron(C, D), vec(X))``, shared by the methods."""
        key = (general, sign)
        if key not in self._kron_sum_refs:
            _, _, C, D = self.stein_factors(general)[1]
            M = (self.Kn if general else self.K).copy()  # np.kron(A, B): (An, Gn) or (A, G)
            if sign > 0:
                M += np.kron(C, D)
            else:
                M -= np.kron(C, D)
            # symmetric positive definite for the symmetric pencils (both signs, STEIN_RHO < 1)
            self._kron_sum_refs[key] = scipy.linalg.solve(
                M, self.x64, assume_a="gen" if general else "pos", overwrite_a=True, check_finite=False
            )
        return self._kron_sum_refs[key]

    # dense float64 references, built on first use ------------------------------
    @cached_property
    def K(self) -> np.ndarray:
        return np.kron(self.A64, self.G64)

    @cached_property
    def Kn(self) -> np.ndarray:
        return np.kron(self.An64, self.Gn64)

    @cached_property
    def K_cho(self):
        """Dense Cholesky factor of ``np.kron(A, G)``, shared by the SPD solve, inverse and logdet references."""
        return scipy.linalg.cho_factor(self.K, lower=True)

    @cached_property
    def damped_solution(self) -> np.ndarray:
        """``scipy.linalg.solve(np.kron(A, G) + DAMPING·I, vec(X))`` (KronEigh.solve and DampedKron exact)."""
        return scipy.linalg.solve(self.K + DAMPING * np.eye(self.n), self.x64, assume_a="pos")

    @cached_property
    def Kn_rows(self) -> np.ndarray:
        """Sampled rows of ``np.kron(An, Gn)`` (for sizes too large to form it)."""
        return _kron_rows(self.An64, self.Gn64, self.rows)

    def kmul(self, A64, G64, Y) -> np.ndarray:
        """``(A ⊗ G) vec(Y)`` as a ``(q, p)`` array, in NumPy float64 (``G @ Y @ A.T``)."""
        return G64 @ _f64(Y) @ A64.T


# -- timing ------------------------------------------------------------------------


def _median_time(fn: Callable[[], object], repeats: int = 5, min_repeats: int = 3, budget: float = 0.1) -> float:
    """Median wall time of ``fn()`` in seconds (``time.perf_counter``), after a warm-up.

    ``fn`` has already been called once (the checked call, which also warms
    caches and lazy imports); one more call, timed only to size the loop, is
    a second warm-up.  Calls shorter than a millisecond are then looped so
    that each measurement spans about 1 ms, and at least ``min_repeats`` and
    at most ``repeats`` measurements are taken, stopping early once
    ``budget`` seconds are spent; the median is returned, so one measurement
    disturbed by other work on the machine does not decide the row.  A call
    longer than ``budget`` is measured once (after the checked call as its
    warm-up).  Every timed kronlin call starts from the raw factors
    (``Kron(A, G)...``), so construction and any factorization are included:
    kronlin caches factorizations on an operator, and the dense solve
    refactors every time.  :func:`run` pins BLAS/OpenMP threads while timing.
    """
    t0 = time.perf_counter()
    fn()
    first = time.perf_counter() - t0
    if first > budget:
        return first
    number = 1 if first >= 1e-3 else min(1000, max(1, int(1e-3 / max(first, 1e-7))))
    times: list[float] = []
    spent = first
    while len(times) < repeats and (len(times) < min_repeats or spent < budget):
        t0 = time.perf_counter()
        for _ in range(number):
            fn()
        dt = time.perf_counter() - t0
        times.append(dt / number)
        spent += dt
    return float(np.median(times))


def _fmt_time(t: Optional[float]) -> str:
    if t is None:
        return "-"
    if t < 1e-3:
        return f"{t * 1e6:.1f} us"
    if t < 1.0:
        return f"{t * 1e3:.2f} ms"
    return f"{t:.2f} s"


# -- the checks ------------------------------------------------------------------------


@dataclass
class _Outcome:
    """What one check returns: how it was checked, the error, the condition number for its tolerance."""

    check: str
    error: float
    kappa: float
    call: Callable[[], object]
    note: str = ""
    passed_extra: bool = True
    #: time of the dense solve this row is compared with, where that is not the problem's
    #: ``np.kron(A, G)`` solve (the network rows: their own ``P x P`` matrix)
    dense_time: Optional[float] = None


def _check_matmul(kl, P: _Problem) -> _Outcome:
    call = lambda: kl.Kron(P.An, P.Gn) @ P.X  # noqa: E731
    got = _vec(call())
    if P.dense:
        return _Outcome("dense", _relerr(got, P.Kn @ P.x64), 1.0, call)
    return _Outcome("rows", _relerr(got[P.rows], P.Kn_rows @ P.x64), 1.0, call)


def _check_matmat(kl, P: _Problem) -> _Outcome:
    call = lambda: kl.Kron(P.An, P.Gn).matmat(P.V)  # noqa: E731
    got = _f64(call())
    if P.dense:
        return _Outcome("dense", _relerr(got, P.Kn @ P.V64), 1.0, call)
    return _Outcome("rows", _relerr(got[P.rows], P.Kn_rows @ P.V64), 1.0, call)


def _check_transpose(kl, P: _Problem) -> _Outcome:
    call = lambda: kl.Kron(P.An, P.Gn).T @ P.X  # noqa: E731
    got = _vec(call())
    if P.dense:
        return _Outcome("dense", _relerr(got, P.Kn.T @ P.x64), 1.0, call)
    ref = _kron_rows(P.An64.T, P.Gn64.T, P.rows) @ P.x64  # rows of (A ⊗ G)ᵀ = Aᵀ ⊗ Gᵀ
    return _Outcome("rows", _relerr(got[P.rows], ref), 1.0, call)


def _check_solve_spd(kl, P: _Problem) -> _Outcome:
    call = lambda: kl.Kron(P.A, P.G).solve(P.X)  # noqa: E731
    Y = call()
    if P.dense:
        ref = scipy.linalg.cho_solve(P.K_cho, P.x64)
        return _Outcome("dense", _relerr(_vec(Y), ref), P.kappa, call)
    return _Outcome("resid", _relerr(P.kmul(P.A64, P.G64, Y), P.X64), P.kappa, call)


def _check_solve_general(kl, P: _Problem) -> _Outcome:
    call = lambda: kl.Kron(P.An, P.Gn).solve(P.X)  # noqa: E731
    Y = call()
    if P.dense:
        ref = scipy.linalg.solve(P.Kn, P.x64)
        return _Outcome("dense", _relerr(_vec(Y), ref), P.kappa, call)
    return _Outcome("resid", _relerr(P.kmul(P.An64, P.Gn64, Y), P.X64), P.kappa, call)


def _check_inv(kl, P: _Problem) -> _Outcome:
    call = lambda: kl.Kron(P.A, P.G).inv()  # noqa: E731
    Kinv = call()
    if P.spectral:
        return _Outcome("dense", _relerr(Kinv.to_dense(), scipy.linalg.inv(P.K)), P.kappa, call)
    if P.dense:  # sampled rows of the dense inverse (symmetric: rows = columns), from its Cholesky factor
        E = np.zeros((P.n, len(P.rows)))
        E[P.rows, np.arange(len(P.rows))] = 1.0
        ref = scipy.linalg.cho_solve(P.K_cho, E).T
        return _Outcome("rows", _relerr(_f64(Kinv.to_dense())[P.rows], ref), P.kappa, call)
    return _Outcome("resid", _relerr(P.kmul(P.A64, P.G64, Kinv @ P.X), P.X64), P.kappa, call)


def _check_logdet(kl, P: _Problem) -> _Outcome:
    call = lambda: kl.Kron(P.A, P.G).logdet()  # noqa: E731
    got = float(call())
    if P.spectral:
        sign, ref = np.linalg.slogdet(P.K)
        note = "" if sign > 0 else f"reference determinant sign {sign}"
        return _Outcome("dense", _relerr(got, ref), P.kappa, call, note, sign > 0)
    if P.dense:  # log det from the dense Cholesky factor (K is SPD)
        ref = 2.0 * float(np.sum(np.log(np.diag(P.K_cho[0]))))
        return _Outcome("dense", _relerr(got, ref), P.kappa, call)
    (_, la), (_, lg) = np.linalg.slogdet(P.A64), np.linalg.slogdet(P.G64)
    return _Outcome("ident", _relerr(got, P.q * la + P.p * lg), P.kappa, call)


def _check_trace(kl, P: _Problem) -> _Outcome:
    call = lambda: kl.Kron(P.A, P.G).trace()  # noqa: E731
    got = float(call())
    if P.dense:
        return _Outcome("dense", _relerr(got, np.trace(P.K)), 1.0, call)
    ref = float(np.sum(np.kron(np.diag(P.A64), np.diag(P.G64))))
    return _Outcome("diag", _relerr(got, ref), 1.0, call)


def _check_eigh_solve(kl, P: _Problem) -> _Outcome:
    call = lambda: kl.Kron(P.A, P.G).eigh().solve(P.X, DAMPING)  # noqa: E731
    Y = call()
    if P.dense:
        return _Outcome("dense", _relerr(_vec(Y), P.damped_solution), P.kappa_damped, call)
    resid = P.kmul(P.A64, P.G64, Y) + DAMPING * _f64(Y)
    return _Outcome("resid", _relerr(resid, P.X64), P.kappa_damped, call)


def _check_power(kl, P: _Problem) -> _Outcome:
    call = lambda: kl.Kron(P.A, P.G).eigh().power(P.X, -0.5, DAMPING)  # noqa: E731
    Y = call()
    if P.spectral:
        w, Q = scipy.linalg.eigh(P.K + DAMPING * np.eye(P.n))
        ref = Q @ ((Q.T @ P.x64) / np.sqrt(w))
        return _Outcome("dense", _relerr(_vec(Y), ref), P.kappa_damped, call)
    # resid: M^{-1/2} applied twice must solve M z = x, M = A ⊗ G + damping*I
    Z = _f64(kl.Kron(P.A, P.G).eigh().power(Y, -0.5, DAMPING))
    Mz = (P.K @ _vec(Z)).reshape((P.q, P.p), order="F") if P.dense else P.kmul(P.A64, P.G64, Z)
    return _Outcome("resid", _relerr(Mz + DAMPING * Z, P.X64), P.kappa_damped, call)


def _square(d):
    return d * d


def _check_apply(kl, P: _Problem) -> _Outcome:
    call = lambda: kl.Kron(P.A, P.G).eigh().apply(P.X, _square)  # noqa: E731
    got = call()
    # f(d) = d**2, so the reference is (A ⊗ G)^2 vec(X)
    if P.dense:
        return _Outcome("dense", _relerr(_vec(got), P.K @ (P.K @ P.x64)), 1.0, call)
    ref = P.kmul(P.A64, P.G64, P.kmul(P.A64, P.G64, P.X64))
    return _Outcome("ident", _relerr(got, ref), 1.0, call)


_NORM_ORD = {"trace": "nuc", "fro": "fro", "spectral": 2}


def _pi_reference(P: _Problem, norm: str):
    """``sqrt(‖A ⊗ I_q‖ / ‖I_p ⊗ G‖)`` (K-FAC §6.3) and how it was computed."""
    ord_ = _NORM_ORD[norm]
    if P.dense and (norm == "fro" or P.spectral):
        nA = np.linalg.norm(np.kron(P.A64, np.eye(P.q)), ord_)
        nG = np.linalg.norm(np.kron(np.eye(P.p), P.G64), ord_)
        return math.sqrt(nA / nG), "dense"
    # ‖A ⊗ I_q‖_* = q ‖A‖_*,  ‖A ⊗ I_q‖_F = sqrt(q) ‖A‖_F,  ‖A ⊗ I_q‖_2 = ‖A‖_2
    mult = {"trace": (P.q, P.p), "fro": (math.sqrt(P.q), math.sqrt(P.p)), "spectral": (1.0, 1.0)}[norm]
    nA = mult[0] * np.linalg.norm(P.A64, ord_)
    nG = mult[1] * np.linalg.norm(P.G64, ord_)
    return math.sqrt(nA / nG), "ident"


def _make_pi_check(norm: str):
    def check(kl, P: _Problem) -> _Outcome:
        call = lambda: kl.pi_factor(P.A, P.G, norm)  # noqa: E731
        got = float(call())
        ref, how = _pi_reference(P, norm)
        return _Outcome(how, _relerr(got, ref), 1.0, call)

    check.__name__ = f"_check_pi_{norm}"
    return check


def _check_factored_damping(kl, P: _Problem) -> _Outcome:
    call = lambda: kl.factored_damping(P.A, P.G, GAMMA)  # noqa: E731
    op = call()
    pi, _ = _pi_reference(P, "trace")
    Ad = P.A64 + pi * GAMMA * np.eye(P.p)
    Gd = P.G64 + GAMMA / pi * np.eye(P.q)
    if P.dense:
        return _Outcome("dense", _relerr(op.to_dense(), np.kron(Ad, Gd)), 1.0, call)
    # P.rows sampled rows of the dense np.kron(Ad, Gd)
    got = _vec(op @ P.X)
    return _Outcome("rows", _relerr(got[P.rows], _kron_rows(Ad, Gd, P.rows) @ P.x64), 1.0, call)


def _check_cg(kl, P: _Problem) -> _Outcome:
    dt = np.dtype(P.dtype)
    Ac = P.A + dt.type(CG_SHIFT) * np.eye(P.p, dtype=dt)
    Gc = P.G + dt.type(CG_SHIFT) * np.eye(P.q, dtype=dt)
    b = P.X.flatten(order="F")
    rtol = BASE_TOL[P.dtype] / 10

    def call():
        L = kl.Kron(Ac, Gc).aslinearoperator()
        return scipy.sparse.linalg.cg(L, b, rtol=rtol, atol=0.0, maxiter=CG_MAXITER)

    x, info = call()
    A64, G64 = _f64(Ac), _f64(Gc)
    if P.dense:
        r = np.kron(A64, G64) @ _f64(x)
    else:
        r = _vec(P.kmul(A64, G64, _f64(x).reshape((P.q, P.p), order="F")))
    note = "" if info == 0 else f"cg did not converge (info={info})"
    return _Outcome("resid", _relerr(r, P.x64), P.kappa_cg, call, note, info == 0)


def _make_kron_sum_check(method: str, sign: int, general: bool = False):
    def check(kl, P: _Problem) -> _Outcome:
        (A, B, C, D), (A64, B64, C64, D64) = P.stein_factors(general)
        call = lambda: kl.solve_kron_sum(A, B, C, D, P.X, sign, method)  # noqa: E731
        U = call()
        if P.dense:
            return _Outcome("dense", _relerr(_vec(U), P.kron_sum_solution(general, sign)), P.kappa_stein, call)
        U64 = _f64(U)
        resid = B64 @ U64 @ A64.T + sign * (D64 @ U64 @ C64.T)
        return _Outcome("resid", _relerr(resid, P.X64), P.kappa_stein, call)

    check.__name__ = f"_check_kron_sum_{method}_{'general' if general else 'sym'}_{'plus' if sign > 0 else 'minus'}"
    return check


def _check_damped_exact(kl, P: _Problem) -> _Outcome:
    call = lambda: kl.DampedKron(P.A, P.G, DAMPING, "exact").solve(P.X)  # noqa: E731
    Y = call()
    if P.dense:
        return _Outcome("dense", _relerr(_vec(Y), P.damped_solution), P.kappa_damped, call)
    resid = P.kmul(P.A64, P.G64, Y) + DAMPING * _f64(Y)
    return _Outcome("resid", _relerr(resid, P.X64), P.kappa_damped, call)


def _check_damped_factored(kl, P: _Problem) -> _Outcome:
    call = lambda: kl.DampedKron(P.A, P.G, DAMPING, "factored").solve(P.X)  # noqa: E731
    Y = call()
    if not P.dense:
        return _Outcome("resid", _relerr(P.kmul(P.A_fd, P.G_fd, Y), P.X64), P.kappa_fd, call)
    M = np.kron(P.A_fd, P.G_fd)  # the damped matrix, which to_dense() must return
    ok, note = True, ""
    if P.spectral:
        dense_err = _relerr(kl.DampedKron(P.A, P.G, DAMPING, "factored").to_dense(), M)
        ok = dense_err <= _tolerance(P.dtype)
        note = "" if ok else f"to_dense() differs from the damped matrix by {dense_err:.2e}"
    ref = scipy.linalg.solve(M, P.x64, assume_a="pos", overwrite_a=True)
    return _Outcome("dense", _relerr(_vec(Y), ref), P.kappa_fd, call, note, ok)


def _check_batch_factors(kl, P: _Problem) -> _Outcome:
    net = P.mlp
    call = lambda: kl.batch_factors(net.acts, net.grads)  # noqa: E731
    got = call()
    ref = _mlp_factors(net.acts64, net.grads64)
    flat = lambda f: np.concatenate([_f64(M).ravel() for k in _FACTOR_KEYS for M in f[k]])  # noqa: E731
    shapes = [tuple(M.shape) for k in _FACTOR_KEYS for M in got[k]]
    if shapes != [M.shape for k in _FACTOR_KEYS for M in ref[k]]:
        raise ValueError(f"factor shapes {shapes} differ from the reference's")
    return _Outcome("dense", _relerr(flat(got), flat(ref)), 1.0, call, dense_time=net.dense_time)


def _check_block_diag(kl, P: _Problem) -> _Outcome:
    net, f = P.mlp, P.mlp.f
    make = lambda: kl.BlockDiagInverse(f["A_diag"], f["G_diag"], gamma=NET_GAMMA)  # noqa: E731
    call = lambda: make().apply(net.V)  # noqa: E731
    got = _layers_vec(call())
    _, off, pairs = net.tridiag
    # per layer: the dense solve with the damped diagonal block np.kron(Ā_k, G_k)
    ref = np.concatenate([
        scipy.linalg.solve(np.kron(A, G), net.v64[off[k]:off[k + 1]], assume_a="pos") for k, (A, G) in enumerate(pairs)
    ])
    err = max(_relerr(got, ref), _relerr(got, _f64(make().to_dense()) @ net.v64))
    return _Outcome("dense", err, net.kappa_diag, call, dense_time=net.dense_time)


def _tridiag_inverse(kl, f):
    return kl.BlockTridiagInverse(f["A_diag"], f["G_diag"], f["A_off"], f["G_off"], gamma=NET_GAMMA)


def _check_tridiag_apply(kl, P: _Problem) -> _Outcome:
    net = P.mlp
    call = lambda: _tridiag_inverse(kl, net.f).apply(net.V)  # noqa: E731
    got = _layers_vec(call())
    # against its own to_dense() and against F̂⁻¹ assembled from the dense blocks of F̃
    Finv = _f64(_tridiag_inverse(kl, net.f).to_dense())
    err = max(_relerr(got, Finv @ net.v64), _relerr(got, net.Finv_ref @ net.v64))
    return _Outcome("dense", err, net.kappa_tri, call, dense_time=net.dense_time)


def _check_tridiag_dense(kl, P: _Problem) -> _Outcome:
    net = P.mlp
    call = lambda: _tridiag_inverse(kl, net.f).to_dense()  # noqa: E731
    Finv = _f64(call())
    F, off, _ = net.tridiag
    n = len(off) - 1
    band = np.zeros(Finv.shape, dtype=bool)  # the tridiagonal blocks
    for k in range(n):
        band[off[max(k - 1, 0)]:off[min(k + 2, n)], off[k]:off[k + 1]] = True
    # F̂ = inv(to_dense()) must equal the damped F̃ on the tridiagonal blocks ...
    err = _relerr(np.linalg.inv(Finv)[band], F[band])
    # ... and F̂⁻¹ must vanish outside them
    outside = float(np.max(np.abs(Finv[~band]), initial=0.0)) / float(np.max(np.abs(Finv)))
    ok = outside <= _tolerance(P.dtype)
    note = "" if ok else f"to_dense() is not block-tridiagonal: {outside:.2e} outside the tridiagonal blocks"
    return _Outcome("dense", err, net.kappa_tri, call, note, ok, dense_time=net.dense_time)


def _woodbury_fisher(kl, w: _WoodburyProblem):
    return kl.WoodburyFisher(w.acts, w.errs, w.damping)


def _check_woodbury_solve(kl, P: _Problem) -> _Outcome:
    w = P.woodbury
    call = lambda: _woodbury_fisher(kl, w).solve(w.U)  # noqa: E731
    got = _layers_vec(call())
    ref = scipy.linalg.cho_solve(w.cho, w.u64)
    return _Outcome("dense", _relerr(got, ref), w.kappa, call, dense_time=w.dense_time)


def _check_woodbury_matvec(kl, P: _Problem) -> _Outcome:
    w = P.woodbury
    call = lambda: _woodbury_fisher(kl, w).matvec(w.U)  # noqa: E731
    got = _layers_vec(call())
    return _Outcome("dense", _relerr(got, w.F @ w.u64), 1.0, call, dense_time=w.dense_time)


def _check_woodbury_logdet(kl, P: _Problem) -> _Outcome:
    w = P.woodbury
    call = lambda: _woodbury_fisher(kl, w).logdet()  # noqa: E731
    got = float(call())
    ref = 2.0 * float(np.sum(np.log(np.diag(w.cho[0]))))
    return _Outcome("dense", _relerr(got, ref), w.kappa, call, dense_time=w.dense_time)


#: (row label, check) in the order they are printed.
CHECKS = (
    ("Kron @ X", _check_matmul),
    ("Kron.matmat(V)", _check_matmat),
    ("Kron.T @ X", _check_transpose),
    ("Kron.solve (SPD)", _check_solve_spd),
    ("Kron.solve (general)", _check_solve_general),
    ("Kron.inv()", _check_inv),
    ("Kron.logdet()", _check_logdet),
    ("Kron.trace()", _check_trace),
    ("KronEigh.solve(X, d)", _check_eigh_solve),
    ("KronEigh.power(X, -1/2, d)", _check_power),
    ("KronEigh.apply(X, d**2)", _check_apply),
    ("pi_factor(norm='trace')", _make_pi_check("trace")),
    ("pi_factor(norm='fro')", _make_pi_check("fro")),
    ("pi_factor(norm='spectral')", _make_pi_check("spectral")),
    ("factored_damping(A, G, g)", _check_factored_damping),
    ("aslinearoperator() + cg", _check_cg),
    ("solve_kron_sum(eig, +1)", _make_kron_sum_check("eig", +1)),
    ("solve_kron_sum(eig, -1)", _make_kron_sum_check("eig", -1)),
    ("solve_kron_sum(schur, +1)", _make_kron_sum_check("schur", +1)),
    ("solve_kron_sum(schur, -1)", _make_kron_sum_check("schur", -1)),
    ("solve_kron_sum(schur, gen)", _make_kron_sum_check("schur", -1, general=True)),
    ("solve_kron_sum(smith, +1)", _make_kron_sum_check("smith", +1)),
    ("solve_kron_sum(smith, -1)", _make_kron_sum_check("smith", -1)),
    ("DampedKron(exact).solve", _check_damped_exact),
    ("DampedKron(factored).solve", _check_damped_factored),
    ("batch_factors(acts, grads)", _check_batch_factors),
    ("BlockDiagInverse.apply", _check_block_diag),
    ("BlockTridiagInverse.apply", _check_tridiag_apply),
    ("BlockTridiagInv.to_dense()", _check_tridiag_dense),
    ("WoodburyFisher.solve", _check_woodbury_solve),
    ("WoodburyFisher.matvec", _check_woodbury_matvec),
    ("WoodburyFisher.logdet()", _check_woodbury_logdet),
)


# -- report --------------------------------------------------------------------------------


@dataclass
class _Row:
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


_COLUMNS = (
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


def _line(values) -> str:
    return "  ".join(f"{v:{align}{width}}" for v, (_, width, align) in zip(values, _COLUMNS)).rstrip()


def _format_row(r: _Row) -> str:
    err = "ERROR" if r.check == "raised" else (f"{r.error:.2e}" if np.isfinite(r.error) else str(r.error))
    speed = "-" if r.speedup is None else (f"{r.speedup:.3g}x" if r.speedup < 1e4 else f"{r.speedup:.2e}x")
    return _line(
        (r.method, r.p, r.q, r.dtype, r.check, err, f"{r.tol:.0e}", _fmt_time(r.seconds), speed,
         "ok" if r.ok else "FAIL")
    )


def _header(kl, out) -> None:
    info = kl.extension_info()
    w = lambda s="": print(s, file=out)  # noqa: E731
    w("kronlin self-check")
    w("=" * 18)
    w(f"kronlin {kl.__version__} ({os.path.dirname(kl.__file__)})")
    w(f"numpy {np.__version__}, scipy {scipy.__version__}, python {platform.python_version()}, "
      f"{platform.machine()}, {os.cpu_count()} CPUs")
    w("extension_info(): " + ", ".join(f"{k}={v}" for k, v in info.items()))
    if not info.get("cpu_extension") or info.get("disabled"):
        from . import _ext

        if not info.get("cpu_extension"):
            why = f"it is not built or failed to import ({_ext.cpu_import_error})."
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


def _legend(out) -> None:
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


def _dense_solve_time(P: _Problem) -> Optional[float]:
    if not P.dense:
        return None
    x = P.X.flatten(order="F")
    return _median_time(lambda: scipy.linalg.solve(np.kron(P.A, P.G), x), repeats=3, min_repeats=2, budget=0.3)


def _run_one(kl, label: str, check, P: _Problem, dense_time: Optional[float]) -> _Row:
    try:
        res = check(kl, P)
        seconds = _median_time(res.call)
    except Exception as exc:  # a raising method is a failed row, never a crashed self-check
        tb = traceback.extract_tb(exc.__traceback__)[-1]
        note = f"{type(exc).__name__}: {exc} (at {os.path.basename(tb.filename)}:{tb.lineno})"
        return _Row(label, P.p, P.q, P.dtype, "raised", float("nan"), _tolerance(P.dtype), None, None, False, note)
    tol = _tolerance(P.dtype, res.kappa)
    ok = bool(np.isfinite(res.error) and res.error <= tol and res.passed_extra)
    if res.dense_time is not None:
        dense_time = res.dense_time
    speedup = None if dense_time is None or seconds <= 0 else dense_time / seconds
    return _Row(label, P.p, P.q, P.dtype, res.check, res.error, tol, seconds, speedup, ok, res.note)


def _validate_args(sizes, dtypes):
    sizes = tuple((int(p), int(q)) for p, q in sizes)
    if not sizes or any(p < 1 or q < 1 for p, q in sizes):
        raise ValueError(f"sizes must be a non-empty sequence of (p, q) with p, q >= 1; got {sizes}")
    dtypes = tuple(np.dtype(d).name for d in dtypes)
    bad = [d for d in dtypes if d not in BASE_TOL]
    if not dtypes or bad:
        raise ValueError(f"dtypes must be drawn from {tuple(BASE_TOL)}; got {dtypes}")
    return sizes, dtypes


def run(sizes=DEFAULT_SIZES, dtypes=("float64", "float32"), seed: int = 0, out=None, threads=None) -> bool:
    """Check every public kronlin method against dense NumPy/SciPy and print a report.

    Parameters
    ----------
    sizes : sequence of (int, int)
        Factor orders ``(p, q)``; ``A`` is ``(p, p)``, ``G`` is ``(q, q)`` and
        ``X`` is ``(q, p)``.  Dense references are formed for
        ``p*q <= DENSE_REF_LIMIT`` (4096); beyond it, sampled rows, residuals
        and Kronecker identities are used (see the module docstring).
    dtypes : sequence of {"float64", "float32"}
        The dtypes kronlin is run in.  The float32 problem is the float64 one
        rounded; references are always computed in float64.
    seed : int
        Seed of the ``numpy.random.default_rng`` all problems are drawn from.
    out : text stream, optional
        Where the report goes; ``sys.stdout`` (looked up at call time) when None.
    threads : int, optional
        BLAS/OpenMP threads while checking and timing (``0``: the libraries'
        default); ``None`` pins :data:`kronlin._threads.DEFAULT_THREADS` (one)
        when threadpoolctl is installed (see :mod:`kronlin._threads`).

    Returns
    -------
    bool
        True when every row passed (error within tolerance, nothing raised).

    Notes
    -----
    One row per (method, size, dtype): relative error, tolerance (base
    ``1e-10`` float64 / ``1e-4`` float32, scaled by ``max(1, cond / 100)``
    for rows that involve an inverse), the median time of kronlin's call and
    the ratio of the dense solve time to it.
    """
    import kronlin as kl

    out = sys.stdout if out is None else out
    sizes, dtypes = _validate_args(sizes, dtypes)
    limit, threads_text = thread_limit(DEFAULT_THREADS if threads is None else threads, required=threads is not None)
    with limit:
        return _run(kl, sizes, dtypes, seed, out, threads_text)


def _run(kl, sizes, dtypes, seed, out, threads_text) -> bool:
    rng = np.random.default_rng(seed)
    t_start = time.perf_counter()

    _header(kl, out)
    print(threads_text, file=out)
    print(f"seed {seed}; sizes {', '.join(f'{p}x{q}' for p, q in sizes)}; dtypes {', '.join(dtypes)}", file=out)
    _legend(out)
    print("", file=out)
    head = _line(tuple(name for name, _, _ in _COLUMNS))
    print(head, file=out)
    print("-" * len(head), file=out)

    rows: list[_Row] = []
    for p, q in sizes:
        base = {
            "p": p,
            "q": q,
            "A": _spd(rng, p, COND),
            "G": _spd(rng, q, COND),
            "An": _general(rng, p, COND),
            "Gn": _general(rng, q, COND),
            "X": rng.standard_normal((q, p)),
            "V": rng.standard_normal((p * q, MATMAT_K)),
        }
        n = p * q
        sample = np.sort(rng.choice(n, size=min(n, SAMPLED_ROWS), replace=False))
        base["ext"] = _extra_base(seed, p, q, base["A"], base["G"], base["An"], base["Gn"])
        for dtype in dtypes:
            P = _Problem(base, dtype, sample)
            dense_time = _dense_solve_time(P)
            if P.dense:
                where = f"dense solve {_fmt_time(dense_time)}"
            else:
                where = f"p*q > {DENSE_REF_LIMIT}: no dense matrix, no dense solve"
            print(f"# p={p} q={q} (p*q={n}) {dtype}: {where}", file=out)
            print(f"#   batch_factors, Block*Inverse: {P.mlp.describe()}", file=out)
            print(f"#   WoodburyFisher: {P.woodbury.describe()}", file=out)
            for label, check in CHECKS:
                row = _run_one(kl, label, check, P, dense_time)
                rows.append(row)
                print(_format_row(row), file=out)
                if row.note:
                    print(f"    -> {row.note}", file=out)
                out.flush()
            del P  # release the dense matrices before the next problem

    failed = [r for r in rows if not r.ok]
    elapsed = time.perf_counter() - t_start
    print("-" * len(head), file=out)
    if failed:
        print(f"FAILED: {len(failed)} of {len(rows)} checks failed ({elapsed:.1f} s):", file=out)
        for r in failed:
            what = r.note if r.check == "raised" else f"error {r.error:.2e} > tol {r.tol:.0e}"
            if r.note and r.check != "raised":
                what += f"; {r.note}"
            print(f"  {r.method}  p={r.p} q={r.q} {r.dtype}: {what}", file=out)
    else:
        print(f"OK: all {len(rows)} checks passed ({elapsed:.1f} s).", file=out)
    out.flush()
    return not failed
