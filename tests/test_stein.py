"""solve_kron_sum / KronSumInverse against dense scipy, plus method agreement and error cases."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.linalg as sl

from kronlin import DampedKron, KronSumInverse, factored_damping, solve_kron_sum
from kronlin.testing import orthonormal, spd, unvec, vec

from helpers import DTYPES, on, rel_err, to_np

SHAPES = [(1, 1), (1, 4), (3, 1), (5, 7), (11, 13), (17, 6), (31, 29), (60, 41)]


def stein_problem(seed, p, q, sign, cond=10.0, batch=()):
    """SPD A, B (eigenvalues in [1, cond]) and symmetric C, D with ρ(A⁻¹C)ρ(B⁻¹D) ≤ 0.81.

    The contraction makes every method applicable, for either sign.
    """
    rng = np.random.default_rng(seed)
    A, B = spd(rng, p, cond), spd(rng, q, cond)
    C = 0.9 * spd(rng, p, cond) / cond
    D = 0.9 * spd(rng, q, cond) / cond
    if sign > 0:  # make C indefinite: the sum stays nonsingular
        C = C - 0.5 * np.trace(C) / p * np.eye(p) * (p > 1)
    V = rng.standard_normal(batch + (q, p))
    return A, B, C, D, V


def dense_solve(A, B, C, D, V, sign):
    M = np.kron(A, B) + sign * np.kron(C, D)
    q, p = V.shape[-2:]
    flat = vec(V).reshape(-1, p * q).T
    return unvec(sl.solve(M, flat).T.reshape(V.shape[:-2] + (p * q,)), q, p)


def residual(A, B, C, D, U, V, sign):
    U = to_np(U)
    R = B @ U @ A.T + sign * (D @ U @ C.T) - V
    return np.abs(R).max() / np.abs(V).max()


TOL = {"float64": 1e-9, "float32": 1e-3}


@pytest.mark.parametrize("p,q", SHAPES)
@pytest.mark.parametrize("sign", [1, -1])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("method", ["eig", "smith", "schur"])
def test_methods_against_dense(p, q, sign, dtype, method):
    A, B, C, D, V = stein_problem(p * 1000 + q, p, q, sign, batch=(2,))
    inv = KronSumInverse(*(M.astype(dtype) for M in (A, B, C, D)), sign=sign, method=method)
    U = inv.solve(V.astype(dtype))
    assert U.dtype == np.dtype(dtype) and U.shape == V.shape
    assert rel_err(U, dense_solve(A, B, C, D, V, sign)) < TOL[dtype]


@pytest.mark.parametrize("sign", [1, -1])
@pytest.mark.parametrize("method", ["eig", "smith", "schur"])
def test_array_api_strict_and_flat_vectors(xp, sign, method):
    A, B, C, D, V = stein_problem(5, 6, 4, sign)
    ref = dense_solve(A, B, C, D, V, sign)
    U = solve_kron_sum(*on(xp, A, B, C, D), on(xp, V), sign=sign, method=method)
    assert type(U) is type(on(xp, V))
    assert rel_err(U, ref) < 1e-10
    u = KronSumInverse(*on(xp, A, B, C, D), sign=sign, method=method).solve(on(xp, vec(V)))
    assert rel_err(u, vec(ref)) < 1e-10


@pytest.mark.parametrize("sign", [1, -1])
def test_methods_agree_with_each_other(sign):
    A, B, C, D, V = stein_problem(9, 23, 19, sign, batch=(3,))
    sols = {m: KronSumInverse(A, B, C, D, sign=sign, method=m).solve(V) for m in ("eig", "schur", "smith")}
    assert rel_err(sols["schur"], sols["eig"]) < 1e-11
    assert rel_err(sols["smith"], sols["eig"]) < 1e-11


@pytest.mark.parametrize("sign", [1, -1])
@pytest.mark.parametrize("method", ["eig", "smith", "schur"])
def test_residual_beyond_dense_sizes(sign, method):
    A, B, C, D, V = stein_problem(3, 160, 140, sign, cond=100.0)
    U = KronSumInverse(A, B, C, D, sign=sign, method=method).solve(V)
    assert residual(A, B, C, D, U, V, sign) < 1e-11


def test_auto_chooses_eig_for_spd_and_schur_otherwise():
    A, B, C, D, V = stein_problem(1, 5, 4, 1)
    assert KronSumInverse(A, B, C, D).method == "eig"
    rng = np.random.default_rng(0)
    N = rng.standard_normal((5, 5)) + 5 * np.eye(5)
    assert KronSumInverse(N, B, C, D).method == "schur"
    assert KronSumInverse(A, B, C, D + np.triu(np.ones((4, 4)), 1)).method == "schur"
    assert KronSumInverse(-A, B, C, D).method == "schur"  # symmetric but not positive definite
    U = solve_kron_sum(N, B, C, D, V)
    assert rel_err(U, dense_solve(N, B, C, D, V, 1)) < 1e-10


def test_whitening_by_the_better_conditioned_pair():
    """cond(C) = cond(D) = 1e12: whitening by (C, D) would lose ~1e-4; by (A, B) keeps ~1e-14."""
    rng = np.random.default_rng(2)
    p, q = 12, 10
    A, B = spd(rng, p, 3.0), spd(rng, q, 3.0)
    C, D = spd(rng, p, 1e12) / 1e12, spd(rng, q, 1e12) / 1e12  # eigenvalues in [1e-12, 1]
    V = rng.standard_normal((q, p))
    ref = dense_solve(A, B, C, D, V, 1)  # the sum itself is well conditioned
    inv = KronSumInverse(A, B, C, D, method="eig")
    assert inv.solver.whitened_by == "AB"
    assert rel_err(inv.solve(V), ref) < 1e-12
    # the pairs swapped: the solver must swap back
    inv2 = KronSumInverse(C, D, A, B, method="eig")
    assert inv2.solver.whitened_by == "CD"
    assert rel_err(inv2.solve(V), ref) < 1e-12
    # what the choice avoids: whitening by the ill-conditioned pair (as GPyTorch always does), without the
    # refinement that KronSumInverse adds when the whitening pair is this ill-conditioned
    from kronlin.stein.eig import EigStein, _spd_factor

    bad = EigStein.__new__(EigStein)
    bad.xp, bad.sign = np, 1
    bad.K1, bad.s1 = bad._pair(A, C, _spd_factor(np, C, "C"), "A", "C")
    bad.K2, bad.s2 = bad._pair(B, D, _spd_factor(np, D, "D"), "B", "D")
    assert rel_err(bad._solve(V), ref) > 1e-8


def test_scalar_identity_special_case():
    """ξ I ⊗ I ± C ⊗ D (K-FAC appendix B) uses plain eigendecompositions."""
    rng = np.random.default_rng(3)
    C, D = spd(rng, 6, 10.0), spd(rng, 5, 10.0)
    V = rng.standard_normal((5, 6))
    for sign, scale in ((1, 1.0), (-1, 0.01)):
        A, B = 2.0 * np.eye(6), 3.0 * np.eye(5)
        inv = KronSumInverse(A, B, scale * C, D, sign=sign, method="eig")
        assert inv.solver.plain_eigh
        assert rel_err(inv.solve(V), dense_solve(A, B, scale * C, D, V, sign)) < 1e-12


def test_exact_damping_routes():
    """Ā ⊗ G + λ I ⊗ I three ways: KronSumInverse, DampedKron(exact), dense."""
    rng = np.random.default_rng(4)
    A, G, lam = spd(rng, 7, 1e3), spd(rng, 4, 1e3), 0.05
    X = rng.standard_normal((4, 7))
    ref = unvec(sl.solve(np.kron(A, G) + lam * np.eye(28), vec(X)), 4, 7)
    exact = DampedKron(A, G, lam, mode="exact")
    assert rel_err(exact.solve(X), ref) < 1e-10
    assert rel_err(KronSumInverse(A, G, np.eye(7), lam * np.eye(4)).solve(X), ref) < 1e-10
    assert rel_err(exact.to_dense(), np.kron(A, G) + lam * np.eye(28)) < 1e-14
    assert rel_err(exact @ exact.solve(X), X) < 1e-10
    fact = DampedKron(A, G, lam, mode="factored")
    Kf = factored_damping(A, G, np.sqrt(lam))
    assert rel_err(fact.to_dense(), Kf.to_dense()) < 1e-15
    assert rel_err(fact.solve(X), unvec(sl.solve(Kf.to_dense(), vec(X)), 4, 7)) < 1e-10
    for mode in ("exact", "factored"):
        L = DampedKron(A, G, lam, mode=mode).aslinearoperator()
        Dm = DampedKron(A, G, lam, mode=mode).to_dense()
        assert rel_err(L @ vec(X), sl.solve(Dm, vec(X))) < 1e-10
        assert rel_err(L.rmatvec(vec(X)), sl.solve(Dm.T, vec(X))) < 1e-10
    with pytest.raises(ValueError, match="mode must be one of"):
        DampedKron(A, G, lam, mode="heuristic")


def test_smith_iteration_counts():
    """Squared Smith needs ~log2 of plain Smith's iterations (ρ(M)ρ(N) = 0.999)."""
    rng = np.random.default_rng(5)
    Q = orthonormal(rng, 4)
    M = (Q * np.array([0.999, 0.5, -0.3, 0.1])) @ Q.T
    A, B, C, V = np.eye(4), np.eye(4), np.eye(4), rng.standard_normal((4, 4))
    sq = KronSumInverse(A, B, C, M, sign=1, method="smith")
    U = sq.solve(V)
    assert abs(sq.solver.rho_estimate - 0.999) < 1e-3
    assert 12 <= sq.solver.iterations <= 18
    plain = KronSumInverse(A, B, C, M, sign=1, method="smith", squared=False, tol=1e-11)
    U2 = plain.solve(V)
    assert 15_000 <= plain.solver.iterations <= 30_000
    ref = dense_solve(A, B, C, M, V, 1)
    assert rel_err(U, ref) < 1e-12
    assert rel_err(U2, ref) < 1e-11 / (1 - 0.999) * 10  # relative-change stopping leaves tol/(1-ρ)


def test_smith_divergence_is_an_error():
    A, B, C, D, _ = stein_problem(6, 4, 3, 1)
    with pytest.raises(np.linalg.LinAlgError, match=r"Smith iteration diverges: ρ\(B⁻¹D\)·ρ\(A⁻¹C\) is estimated"):
        KronSumInverse(A, B, 5 * A, 2 * B, method="smith")
    with pytest.raises(np.linalg.LinAlgError, match="diverges"):
        KronSumInverse(A, B, A, B, sign=-1, method="smith")  # ρ = 1 exactly (and singular)
    with pytest.raises(np.linalg.LinAlgError, match="did not converge within max_iter=2"):
        KronSumInverse(A, B, 0.99 * A, B, method="smith", max_iter=2)


def test_eig_errors():
    A, B, C, D, V = stein_problem(7, 4, 3, 1)
    with pytest.raises(np.linalg.LinAlgError, match=r"method='eig' needs A \(shape \(4, 4\)\) symmetric positive definite"):
        KronSumInverse(-A, B, C, D, method="eig")
    with pytest.raises(ValueError, match=r"^D \(shape \(3, 3\)\) must be symmetric"):
        KronSumInverse(A, B, C, D + np.triu(np.ones((3, 3)), 1), method="eig")
    # A ⊗ B - C ⊗ D indefinite: inconsistent statistics
    with pytest.raises(np.linalg.LinAlgError, match="not positive definite.*inconsistent.*add damping"):
        KronSumInverse(A, B, 3 * A, B, sign=-1, method="eig")
    # exactly singular: A ⊗ B + (-A) ⊗ B = 0
    with pytest.raises(np.linalg.LinAlgError, match="singular to working precision"):
        KronSumInverse(A, B, -A, B, sign=1, method="eig")


def test_input_validation():
    I3, I2 = np.eye(3), np.eye(2)
    with pytest.raises(ValueError, match=r"^A must be a square matrix; got shape \(3, 2\)"):
        KronSumInverse(np.ones((3, 2)), I2, I3, I2)
    with pytest.raises(ValueError, match=r"^C must have the shape of A, \(3, 3\); got \(2, 2\)"):
        KronSumInverse(I3, I2, I2, I2)
    with pytest.raises(ValueError, match=r"^D must have the shape of B, \(2, 2\); got \(3, 3\)"):
        KronSumInverse(I3, I2, I3, I3)
    with pytest.raises(ValueError, match=r"^B \(shape \(2, 2\)\) contains NaN"):
        KronSumInverse(I3, np.diag([1.0, np.nan]), I3, I2)
    with pytest.raises(ValueError, match="sign must be"):
        KronSumInverse(I3, I2, I3, I2, sign=2)
    with pytest.raises(ValueError, match="method must be one of"):
        KronSumInverse(I3, I2, I3, I2, method="qr")
    with pytest.raises(ValueError, match="apply to method='smith' only"):
        KronSumInverse(I3, I2, I3, I2, method="eig", tol=1e-3)
    inv = KronSumInverse(I3, I2, 0.5 * I3, I2)
    with pytest.raises(ValueError, match=r"^V must have shape \(\.\.\., q, p\) = \(\.\.\., 2, 3\)"):
        inv.solve(np.ones((3, 2)))


def test_transpose_and_linear_operator_for_nonsymmetric():
    rng = np.random.default_rng(8)
    A = rng.standard_normal((5, 5)) + 4 * np.eye(5)
    B = rng.standard_normal((3, 3)) + 3 * np.eye(3)
    C, D = 0.2 * rng.standard_normal((5, 5)), 0.2 * rng.standard_normal((3, 3))
    M = np.kron(A, B) + np.kron(C, D)
    inv = KronSumInverse(A, B, C, D, method="schur")
    L = inv.aslinearoperator()
    v = rng.standard_normal(15)
    assert rel_err(L @ v, sl.solve(M, v)) < 1e-11
    assert rel_err(L.rmatvec(v), sl.solve(M.T, v)) < 1e-11
    U = inv.solve(unvec(v, 3, 5))
    assert rel_err(inv.operator_matmul(U), unvec(v, 3, 5)) < 1e-12
