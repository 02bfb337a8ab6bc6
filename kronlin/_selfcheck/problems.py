"""The self-check's random problems: their sizes and settings, what kronlin receives, float64 references.

The generators and dense references are :mod:`kronlin.testing`'s (shared with
the test suite and the benchmarks); this module fixes the self-check's
parameters (condition numbers, damping, network sizes) and how one problem is
drawn from the seed, and caches each reference on first use.
"""

from __future__ import annotations

import math
from functools import cached_property

import numpy as np
import scipy.linalg

from ..testing import (
    chain_inverse,
    damped_tridiag,
    general,
    general_pencil,
    gradient_matrix,
    kfac_factors,
    kron_rows,
    layers_vec,
    per_example_data,
    symmetric,
    symmetric_pencil,
    tanh_mlp,
    vec,
)
from .timing import median_time

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


def spectrum(n: int, cond: float) -> np.ndarray:
    """``n`` values log-spaced from 1 down to ``1/cond`` (the eigenvalues or singular values of a factor)."""
    return np.logspace(0.0, -math.log10(cond), n) if n > 1 else np.ones(1)


def f64(x) -> np.ndarray:
    return np.asarray(x, dtype=np.float64)


def net_widths(p: int, q: int) -> tuple:
    """Widths ``(a, b, a, b)`` of the three-layer networks of problem ``(p, q)``: about ``1.4·sqrt``
    of ``p`` and ``q``, shrunk until the MLP has at most ``NET_MAX_PARAMS`` parameters."""
    a, b = (max(2, math.ceil(1.4 * math.sqrt(n))) for n in (p, q))
    while a > 2 or b > 2:
        if 3 * a * b + 2 * b + a <= NET_MAX_PARAMS:  # (a+1)b + (b+1)a + (a+1)b
            break
        a, b = (a - 1, b) if a >= b else (a, b - 1)
    return (a, b, a, b)


def woodbury_spec(p: int, q: int) -> dict:
    """A small weight-sharing + dense network for ``WoodburyFisher``: widths from :func:`net_widths`."""
    a, b = net_widths(p, q)[:2]
    T = max(2, round(math.sqrt(q)))  # weight-sharing positions of the first layer
    return {
        "T": T,
        "N": min(24, max(2, round(math.sqrt(p * q) / 8))),
        "layers": (("shared", T, a, b), ("dense", b, a), ("dense", a, b)),  # as kronlin.testing.per_example_data
    }


def extra_base(seed: int, p: int, q: int, A, G, An, Gn) -> dict:
    """Inputs of the Kronecker-sum, ``DampedKron`` and network checks of problem ``(p, q)``.

    Drawn from their own stream, ``default_rng((seed, p, q))``, so the ``Kron``
    problems keep the draws they always had.
    """
    rng = np.random.default_rng((seed, p, q))
    r = math.sqrt(STEIN_RHO)
    ext = {
        "C": symmetric_pencil(rng, np.linalg.cholesky(A), r),
        "D": symmetric_pencil(rng, np.linalg.cholesky(G), r),
        "Cn": general_pencil(rng, An, r),
        "Dn": general_pencil(rng, Gn, r),
    }
    widths = net_widths(p, q)
    n_mlp = 2 * max(widths) + 8
    acts, grads = tanh_mlp(rng, widths, n_mlp)
    ext["mlp"] = {
        "widths": widths,
        "acts": acts,
        "grads": grads,
        "V": [rng.standard_normal((widths[k + 1], widths[k] + 1)) for k in range(len(widths) - 1)],
    }
    spec = woodbury_spec(p, q)
    wacts, werrs = per_example_data(rng, spec["layers"], spec["N"], WOODBURY_LABELS)
    Gm = gradient_matrix(wacts, werrs)
    lmax = float(np.linalg.eigvalsh(Gm.T @ Gm / spec["N"])[-1])
    ext["woodbury"] = {
        "spec": spec,
        "acts": wacts,
        "errs": werrs,
        "damping": lmax / (WOODBURY_COND - 1.0),  # cond(λI + F) = (λmax + λ) / λ
        "U": [rng.standard_normal((de, da)) for *_, da, de in spec["layers"]],
    }
    # KronEigh.from_rows: rows of one-batch factors, A from fewer rows than its order (a thin eigenbasis)
    ext["rows"] = {"a": rng.standard_normal((max(1, p // 4), p)), "g": rng.standard_normal((max(1, q // 2), q))}
    return ext



class MLPProblem:
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
        self.acts64, self.grads64 = [f64(a) for a in self.acts], [f64(g) for g in self.grads]
        f = kfac_factors(base["acts"], base["grads"])
        f["A_diag"] = [(M + M.T) / 2 for M in f["A_diag"]]
        f["G_diag"] = [(M + M.T) / 2 for M in f["G_diag"]]
        self.f = {k: [M.astype(dtype) for M in v] for k, v in f.items()}
        self.f64 = {k: [f64(M) for M in v] for k, v in self.f.items()}
        self.V = [v.astype(dtype) for v in base["V"]]
        self.v64 = layers_vec([f64(v) for v in self.V])
        self.n_params = int(self.v64.size)

    def describe(self) -> str:
        return f"tanh MLP widths {self.widths}, N={self.N}, P={self.n_params}"

    @cached_property
    def tridiag(self):
        """``(F̃ on its tridiagonal blocks, layer offsets, damped factor pairs)`` in float64."""
        return damped_tridiag(self.f64, NET_GAMMA)

    @cached_property
    def Finv_ref(self) -> np.ndarray:
        """K-FAC §4.3's ``F̂⁻¹`` from the dense tridiagonal blocks of ``F̃`` (:func:`chain_inverse`)."""
        F, off, _ = self.tridiag
        return chain_inverse(F, off)

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
        return median_time(lambda: scipy.linalg.solve(damped_tridiag(self.f, NET_GAMMA)[0], v),
                          repeats=3, min_repeats=2, budget=0.1)


class WoodburyProblem:
    """The weight-sharing + dense network of ``WoodburyFisher`` in one dtype, with float64 references
    built from per-example gradients materialised here (and nowhere in kronlin's calls)."""

    def __init__(self, base: dict, dtype: str):
        self.spec, self.damping = base["spec"], float(base["damping"])
        self.acts = [a.astype(dtype) for a in base["acts"]]
        self.errs = [e.astype(dtype) for e in base["errs"]]
        self.U = [u.astype(dtype) for u in base["U"]]
        self.u64 = layers_vec([f64(u) for u in self.U])
        self.n_params = int(self.u64.size)
        self.n_columns = self.spec["N"] * WOODBURY_LABELS
        self.kappa = WOODBURY_COND

    def describe(self) -> str:
        T = self.spec["T"]
        layers = ", ".join(f"{da}->{de}" + (f" shared over T={T}" if kind == "shared" else "")
                           for kind, *_, da, de in self.spec["layers"])
        return f"layers {layers}; N={self.spec['N']} x S={WOODBURY_LABELS}, P={self.n_params}, M={self.n_columns}"

    @cached_property
    def F(self) -> np.ndarray:
        """``F = (1/N) G Gᵀ`` from the dense per-example gradients of the inputs kronlin received."""
        Gm = gradient_matrix([f64(a) for a in self.acts], [f64(e) for e in self.errs])
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
            Gm = gradient_matrix(self.acts, self.errs)
            M = Gm @ Gm.T
            M *= 1.0 / self.spec["N"]
            M[np.diag_indices_from(M)] += self.damping
            return scipy.linalg.solve(M, u)

        return median_time(call, repeats=3, min_repeats=2, budget=0.1)


class Problem:
    """One random problem of size ``(p, q)`` in one dtype, with cached float64 references."""

    def __init__(self, base: dict, dtype: str, rows: np.ndarray):
        self.p, self.q, self.dtype = base["p"], base["q"], dtype
        self.n = self.p * self.q
        cast = {k: base[k].astype(dtype) for k in ("A", "G", "An", "Gn", "X", "V")}
        self.A, self.G, self.An, self.Gn, self.X, self.V = (cast[k] for k in ("A", "G", "An", "Gn", "X", "V"))
        # the inputs kronlin receives, cast up exactly: every reference starts from these
        self.A64, self.G64, self.An64, self.Gn64, self.X64, self.V64 = (
            f64(cast[k]) for k in ("A", "G", "An", "Gn", "X", "V")
        )
        self.x64 = vec(self.X64)
        self.rows = rows
        self.dense = self.n <= DENSE_REF_LIMIT
        self.spectral = self.n <= SPECTRAL_REF_LIMIT
        lam = spectrum(self.p, COND)
        mu = spectrum(self.q, COND)
        self.kappa = float(lam[0] / lam[-1] * mu[0] / mu[-1])  # cond(A ⊗ G) = cond(A) cond(G)
        self.lmax, self.lmin = float(lam[0] * mu[0]), float(lam[-1] * mu[-1])
        self.kappa_damped = (self.lmax + DAMPING) / (self.lmin + DAMPING)
        la_c, lg_c = lam + CG_SHIFT, mu + CG_SHIFT
        self.kappa_cg = float(la_c[0] * lg_c[0] / (la_c[-1] * lg_c[-1]))
        # Kronecker sums: C, D next to (A, G) and Cn, Dn next to (An, Gn), ρ(A⁻¹C)ρ(G⁻¹D) <= STEIN_RHO
        ext = base["ext"]
        self._ext = ext
        self.C, self.D, self.Cn, self.Dn = (ext[k].astype(dtype) for k in ("C", "D", "Cn", "Dn"))
        self.C64, self.D64, self.Cn64, self.Dn64 = (f64(M) for M in (self.C, self.D, self.Cn, self.Dn))
        self.kappa_stein = self.kappa * (1.0 + STEIN_RHO) / (1.0 - STEIN_RHO)
        self._kron_sum_refs: dict = {}
        # DampedKron(mode="factored"): (A + π√d I) ⊗ (G + (√d/π) I), π by the trace rule
        g = math.sqrt(DAMPING)
        pi = math.sqrt((np.trace(self.A64) / self.p) / (np.trace(self.G64) / self.q))
        self.A_fd = self.A64 + pi * g * np.eye(self.p)
        self.G_fd = self.G64 + g / pi * np.eye(self.q)
        self.kappa_fd = float((lam[0] + pi * g) * (mu[0] + g / pi) / ((lam[-1] + pi * g) * (mu[-1] + g / pi)))

    @cached_property
    def mlp(self) -> MLPProblem:
        return MLPProblem(self._ext["mlp"], self.dtype)

    @cached_property
    def gram_rows(self) -> dict:
        """The rows of :meth:`KronEigh.from_rows`' check in the dtype, their factors ``A = aᵀa/n_a``,
        ``G = gᵀg/n_g`` in float64 and the condition number of ``A ⊗ G + DAMPING·I`` (A is singular)."""
        a, g = (self._ext["rows"][k].astype(self.dtype) for k in ("a", "g"))
        A, G = (f64(x).T @ f64(x) / x.shape[0] for x in (a, g))
        top = float(np.linalg.eigvalsh(A)[-1] * np.linalg.eigvalsh(G)[-1])
        return {"a": a, "g": g, "A": A, "G": G, "kappa": (top + DAMPING) / DAMPING}

    @cached_property
    def woodbury(self) -> WoodburyProblem:
        return WoodburyProblem(self._ext["woodbury"], self.dtype)

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
        return kron_rows(self.An64, self.Gn64, self.rows)

    def kmul(self, A64, G64, Y) -> np.ndarray:
        """``(A ⊗ G) vec(Y)`` as a ``(q, p)`` array, in NumPy float64 (``G @ Y @ A.T``)."""
        return G64 @ f64(Y) @ A64.T


def draw(rng: np.random.Generator, seed: int, p: int, q: int):
    """The float64 problem ``(p, q)`` as the next draws of ``rng`` (and its own stream for the extras), and the
    sampled rows of the ``rows`` checks: ``(base, rows)`` for :class:`Problem`."""
    base = {
        "p": p,
        "q": q,
        "A": symmetric(rng, spectrum(p, COND)),
        "G": symmetric(rng, spectrum(q, COND)),
        "An": general(rng, spectrum(p, COND)),
        "Gn": general(rng, spectrum(q, COND)),
        "X": rng.standard_normal((q, p)),
        "V": rng.standard_normal((p * q, MATMAT_K)),
    }
    n = p * q
    rows = np.sort(rng.choice(n, size=min(n, SAMPLED_ROWS), replace=False))
    base["ext"] = extra_base(seed, p, q, base["A"], base["G"], base["An"], base["Gn"])
    return base, rows
