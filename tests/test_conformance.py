"""Every public operator against the one contract of tests/conformance.py, on every backend present.

Each class supplies the inputs, how to build the operator and independent
dense references (``np.kron``, ``np.linalg`` and the NumPy references of
``kronlin.testing``); the tests are inherited.
"""

from __future__ import annotations

import numpy as np

import kronlin
from kronlin.testing import chain_inverse, damped_tridiag, kfac_factors, spd

from conformance import OperatorConformance


def _sym(M):
    return (M + M.T) / 2


def _logdet(M):
    sign, value = np.linalg.slogdet(M)
    assert sign > 0
    return float(value)


P, Q = 4, 3  # the Kronecker operators' (q, p) = (3, 4): p ≠ q catches transposed conventions


class TestKron(OperatorConformance):
    """Non-symmetric factors: the LU path, and a transpose that differs from the operator."""

    blocks = [(Q, P)]
    accessors = ("A", "G")

    def data(self):
        rng = np.random.default_rng(10)
        return {"A": rng.standard_normal((P, P)) + 4 * np.eye(P), "G": rng.standard_normal((Q, Q)) + 4 * np.eye(Q)}

    def build(self, make):
        return kronlin.Kron(make("A"), make("G"))

    def refs(self, d):
        K = np.kron(d["A"], d["G"])
        return {"forward": K, "solve": np.linalg.inv(K), "logdet": _logdet(K), "to_dense": K, "matmat": K, "linop": K}


class TestKronSPD(TestKron):
    """Symmetric positive definite factors: the Cholesky path (TestKron's build and references)."""

    def data(self):
        rng = np.random.default_rng(11)
        return {"A": spd(rng, P), "G": spd(rng, Q)}


class TestKronEigh(OperatorConformance):
    blocks = [(Q, P)]
    accessors = ("Qa", "la", "Qg", "lg")

    def data(self):
        rng = np.random.default_rng(12)
        return {"A": spd(rng, P), "G": spd(rng, Q)}

    def build(self, make):
        return kronlin.Kron(make("A"), make("G")).eigh()

    def refs(self, d):
        K = np.kron(d["A"], d["G"])
        return {"forward": K, "solve": np.linalg.inv(K), "logdet": _logdet(K), "matmat": K, "linop": K}


class TestKronEighFromRows(OperatorConformance):
    """A thin eigenbasis (A from 2 rows of order 4: rank 2; G from 5 rows, full): singular, so no solve/logdet."""

    blocks = [(Q, P)]
    accessors = ("Qa", "la", "Qg", "lg")

    def data(self):
        rng = np.random.default_rng(13)
        return {"a": rng.standard_normal((2, P)), "g": rng.standard_normal((5, Q))}

    def build(self, make):
        return kronlin.KronEigh.from_rows(make("a"), make("g"), scale_a=0.5)

    def refs(self, d):
        K = np.kron(0.5 * d["a"].T @ d["a"], d["g"].T @ d["g"])
        return {"forward": K, "matmat": K, "linop": K}


class TestDampedKronExact(OperatorConformance):
    blocks = [(Q, P)]
    lam = 0.3

    def data(self):
        rng = np.random.default_rng(13)
        return {"A": spd(rng, P), "G": spd(rng, Q)}

    def build(self, make):
        return kronlin.DampedKron(make("A"), make("G"), self.lam, mode="exact")

    def refs(self, d):
        M = np.kron(d["A"], d["G"]) + self.lam * np.eye(P * Q)
        Minv = np.linalg.inv(M)
        return {"forward": M, "solve": Minv, "to_dense": M, "matmat": M, "linop": Minv}


class TestDampedKronFactored(OperatorConformance):
    blocks = [(Q, P)]
    lam = 0.3

    def data(self):
        rng = np.random.default_rng(14)
        return {"A": spd(rng, P), "G": spd(rng, Q)}

    def build(self, make):
        return kronlin.DampedKron(make("A"), make("G"), self.lam, mode="factored")

    def refs(self, d):
        A, G = d["A"], d["G"]
        pi = np.sqrt((np.trace(A) / P) / (np.trace(G) / Q))
        g = np.sqrt(self.lam)
        M = np.kron(A + pi * g * np.eye(P), G + g / pi * np.eye(Q))
        Minv = np.linalg.inv(M)
        return {"forward": M, "solve": Minv, "to_dense": M, "matmat": M, "linop": Minv}


class TestKronSumInverseEig(OperatorConformance):
    """``(A ⊗ B + C ⊗ D)⁻¹``: the operator *is* the inverse (``@`` = ``solve``); logdet is of the sum."""

    blocks = [(Q, P)]

    def data(self):
        rng = np.random.default_rng(15)
        return {"A": spd(rng, P), "B": spd(rng, Q), "C": 0.2 * _sym(rng.standard_normal((P, P))),
                "D": 0.3 * spd(rng, Q, 3.0)}

    def build(self, make):
        return kronlin.KronSumInverse(make("A"), make("B"), make("C"), make("D"), method="eig")

    def refs(self, d):
        M = np.kron(d["A"], d["B"]) + np.kron(d["C"], d["D"])
        Minv = np.linalg.inv(M)
        return {"forward": Minv, "solve": Minv, "logdet": _logdet(M), "matmat": Minv, "linop": Minv}


class TestKronSumInverseSchur(OperatorConformance):
    """General (non-symmetric) factors: the transpose differs from the operator."""

    blocks = [(Q, P)]

    def data(self):
        rng = np.random.default_rng(16)
        return {"A": rng.standard_normal((P, P)) + 4 * np.eye(P), "B": rng.standard_normal((Q, Q)) + 4 * np.eye(Q),
                "C": rng.standard_normal((P, P)), "D": rng.standard_normal((Q, Q))}

    def build(self, make):
        return kronlin.KronSumInverse(make("A"), make("B"), make("C"), make("D"), sign=-1, method="schur")

    def refs(self, d):
        Minv = np.linalg.inv(np.kron(d["A"], d["B"]) - np.kron(d["C"], d["D"]))
        return {"forward": Minv, "solve": Minv, "matmat": Minv, "linop": Minv}


def _layer_stats(rng, widths=(3, 4, 2), N=40):
    """Consistent K-FAC statistics of a random batch (homogeneous coordinate appended), keyed ``A_diag0``, ..."""
    acts = [rng.standard_normal((N, d)) for d in widths[:-1]]
    grads = [rng.standard_normal((N, d)) for d in widths[1:]]
    return {f"{key}{k}": M for key, Ms in kfac_factors(acts, grads).items() for k, M in enumerate(Ms)}


def _damped(d, n, gamma, tridiagonal):
    """``(F̃, layer offsets)``: the damped dense matrix of ``n`` layers' statistics ``d`` (diagonal factors
    symmetrized first), on its diagonal blocks or its tridiagonal ones."""
    m = n - 1 if tridiagonal else 0
    f = {"A_diag": [_sym(d[f"A_diag{k}"]) for k in range(n)], "G_diag": [_sym(d[f"G_diag{k}"]) for k in range(n)],
         "A_off": [d[f"A_off{k}"] for k in range(m)], "G_off": [d[f"G_off{k}"] for k in range(m)]}
    F, off, _ = damped_tridiag(f, gamma)
    return F, off


class TestBlockDiagInverse(OperatorConformance):
    layered = True
    gamma = 0.1
    blocks = [(4, 4), (2, 5)]

    def data(self):
        return _layer_stats(np.random.default_rng(17))

    def build(self, make):
        return kronlin.BlockDiagInverse([make("A_diag0"), make("A_diag1")], [make("G_diag0"), make("G_diag1")],
                                        gamma=self.gamma)

    def refs(self, d):
        F, _ = _damped(d, 2, self.gamma, tridiagonal=False)
        Finv = np.linalg.inv(F)
        return {"forward": Finv, "to_dense": Finv, "logdet": _logdet(F), "matmat": Finv, "linop": Finv}


class TestBlockTridiagInverse(OperatorConformance):
    """F̂⁻¹ by the chain's clique formula: Σ_cliques [Σ_CC⁻¹] − Σ_separators [Σ_SS⁻¹] (padded; kronlin.testing.chain_inverse)."""

    layered = True
    gamma = 0.1
    blocks = [(4, 4), (2, 5), (3, 3)]

    def data(self):
        return _layer_stats(np.random.default_rng(18), widths=(3, 4, 2, 3))

    def build(self, make):
        n = 3
        return kronlin.BlockTridiagInverse(
            [make(f"A_diag{k}") for k in range(n)], [make(f"G_diag{k}") for k in range(n)],
            [make(f"A_off{k}") for k in range(n - 1)], [make(f"G_off{k}") for k in range(n - 1)], gamma=self.gamma)

    def refs(self, d):
        Finv = chain_inverse(*_damped(d, 3, self.gamma, tridiagonal=True))
        return {"forward": Finv, "to_dense": Finv, "logdet": -_logdet(Finv), "matmat": Finv, "linop": Finv}


class TestWoodburyFisher(OperatorConformance):
    """``matvec`` is F (undamped), ``solve`` is (λI + F)⁻¹, ``logdet`` is log det(λI + F)."""

    layered = True
    forward = "matvec"
    accessors = ("gram",)
    lam = 0.2
    N = 5
    blocks = [(3, 4), (2, 3)]

    def data(self):
        rng = np.random.default_rng(19)
        return {"a0": rng.standard_normal((self.N, 4)), "e0": rng.standard_normal((self.N, 3)),
                "a1": rng.standard_normal((self.N, 3)), "e1": rng.standard_normal((self.N, 2))}

    def build(self, make):
        return kronlin.WoodburyFisher([make("a0"), make("a1")], [make("e0"), make("e1")], self.lam)

    def refs(self, d):
        # per-example gradient i: vec(e_i a_iᵀ) = a_i ⊗ e_i, layers concatenated
        Gm = np.stack([np.concatenate([np.kron(d["a0"][i], d["e0"][i]), np.kron(d["a1"][i], d["e1"][i])])
                       for i in range(self.N)], axis=1)
        F = Gm @ Gm.T / self.N
        M = F + self.lam * np.eye(len(F))
        return {"forward": F, "solve": np.linalg.inv(M), "logdet": _logdet(M), "to_dense": F, "matmat": F,
                "linop": F}
