"""SchurStein (generalized Schur / QZ method, Gardiner et al. 1992) and its back-substitution kernel.

``B U Aᵀ + sign·D U Cᵀ = V`` for general (non-symmetric, indefinite, defective)
factors, checked against ``scipy.linalg.solve`` on the dense
``A ⊗ B + sign·C ⊗ D`` and, at sizes too big for that, by the residual.
"""

from __future__ import annotations

import contextlib

import numpy as np
import pytest
import scipy.linalg

from kronlin import _ext
from kronlin._kernels.gsylv import (
    PIVOT_RTOL_FACTOR,
    gsylv_backsub,
    gsylv_backsub_raw,
    gsylv_backsub_reference,
    singular_tol,
)
from kronlin.stein.schur import SchurStein
from kronlin.testing import orthonormal, unvec, vec

from helpers import on, rel_err, to_np

SIGNS = [1, -1]
# (p, q): 1x1, p != q both ways, primes, up to 40
SIZES = [(1, 1), (1, 4), (3, 1), (2, 2), (5, 3), (7, 11), (13, 13), (17, 23), (40, 29)]
EPS64 = float(np.finfo(np.float64).eps)


# -- problem generators --------------------------------------------------------
def general_pencil(rng, n):
    """A well-conditioned pencil (M, N) of general real matrices.

    ``M`` is non-symmetric and indefinite (eigenvalues clustered near ±2, split
    into complex-conjugate pairs by a non-symmetric perturbation), ``N`` is a
    non-symmetric perturbation of the identity: the generalized eigenvalues
    have moduli near 2, so ``λ·μ`` stays far from ∓1 and the Kronecker sum is
    well conditioned.
    """
    Q = orthonormal(rng, n)
    M = Q @ (np.diag(rng.choice([-2.0, 2.0], n)) + 0.6 * rng.standard_normal((n, n)) / np.sqrt(n)) @ Q.T
    N = np.eye(n) + 0.3 * rng.standard_normal((n, n)) / np.sqrt(n)
    return M, N


def problem(seed, p, q, batch=()):
    rng = np.random.default_rng(seed)
    A, C = general_pencil(rng, p)
    B, D = general_pencil(rng, q)
    V = rng.standard_normal(batch + (q, p))
    return A, B, C, D, V


def dense_solve(A, B, C, D, V, sign):
    """The dense reference: ``(A ⊗ B + sign·C ⊗ D) vec(U) = vec(V)``, any batch of ``V``."""
    q, p = V.shape[-2], V.shape[-1]
    K = np.kron(A, B) + sign * np.kron(C, D)
    rhs = vec(V).reshape(-1, p * q).T  # one column-stacked right-hand side per column
    u = scipy.linalg.solve(K, rhs).T.reshape(V.shape[:-2] + (p * q,))
    return unvec(u, q, p)


def n_pairs(S):
    """Number of 2×2 diagonal blocks of a quasi-triangular matrix."""
    return int(np.count_nonzero(np.diagonal(S, -1)))


def residual(A, B, C, D, U, V, sign):
    """Normwise backward error ‖B U Aᵀ + sign·D U Cᵀ − V‖ / ((‖A‖‖B‖ + ‖C‖‖D‖)‖U‖ + ‖V‖)."""
    nrm = np.linalg.norm
    R = B @ U @ A.T + sign * (D @ U @ C.T) - V
    return float(nrm(R) / ((nrm(A, 2) * nrm(B, 2) + nrm(C, 2) * nrm(D, 2)) * nrm(U) + nrm(V)))


# -- agreement with the dense solve ----------------------------------------------
@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("sign", SIGNS)
@pytest.mark.parametrize("p,q", SIZES)
def test_matches_dense_solve(xp, dtype, sign, p, q):
    A, B, C, D, V = problem(100 * p + q, p, q)
    # the dense reference solves the problem as rounded to the test dtype
    A, B, C, D, V = (M.astype(dtype).astype(np.float64) for M in (A, B, C, D, V))
    ref = dense_solve(A, B, C, D, V, sign)
    solver = SchurStein(xp, *on(xp, A, B, C, D, dtype=dtype), sign)
    U = solver.solve(on(xp, V, dtype=dtype))
    assert type(U) is type(on(xp, V, dtype=dtype))
    assert U.dtype == getattr(xp, dtype)
    assert U.shape == (q, p)
    # float64: well-conditioned problems (cond(K) ~ 10) give ~1e-14; float32 inputs are
    # solved in float64 and rounded, so the error is the float32 rounding of U
    assert rel_err(U, ref) < (1e-9 if dtype == "float64" else 1e-3)
    assert rel_err(U, ref) < (1e-12 if dtype == "float64" else 1e-6)


def test_two_by_two_blocks_occur_on_both_sides():
    A, B, C, D, V = problem(7, 13, 13)
    solver = SchurStein(np, A, B, C, D, 1)
    # complex generalized eigenvalues of both pencils: 2x2 blocks in S1 and in S2
    assert n_pairs(solver._S1) > 0 and n_pairs(solver._S2) > 0
    assert np.iscomplexobj(scipy.linalg.eigvals(A, C)) and np.any(scipy.linalg.eigvals(A, C).imag != 0)
    assert rel_err(solver.solve(V), dense_solve(A, B, C, D, V, 1)) < 1e-12


@pytest.mark.parametrize("sign", SIGNS)
def test_batched_right_hand_sides(xp, sign):
    p, q = 9, 6
    A, B, C, D, V = problem(3, p, q, batch=(2, 3))
    solver = SchurStein(xp, *on(xp, A, B, C, D), sign)
    U = solver.solve(on(xp, V))
    assert U.shape == (2, 3, q, p)
    assert rel_err(U, dense_solve(A, B, C, D, V, sign)) < 1e-12
    # each slice alone gives the same answer
    assert rel_err(to_np(U)[1, 2], to_np(solver.solve(on(xp, V[1, 2])))) < 1e-14


def test_setup_once_many_solves():
    A, B, C, D, _ = problem(11, 8, 5)
    solver = SchurStein(np, A, B, C, D, -1)
    rng = np.random.default_rng(0)
    for _ in range(3):
        V = rng.standard_normal((5, 8))
        assert rel_err(solver.solve(V), dense_solve(A, B, C, D, V, -1)) < 1e-12
    assert solver.p == 8 and solver.q == 5 and solver.sign == -1
    assert 0 < solver.pivot_ratio < np.inf
    assert "SchurStein(p=8, q=5" in repr(solver)


def test_float64_rhs_against_float32_factors_returns_float64():
    A, B, C, D, V = problem(5, 4, 3)
    A, B, C, D = (M.astype(np.float32) for M in (A, B, C, D))
    U = SchurStein(np, A, B, C, D, 1).solve(V)
    assert U.dtype == np.float64
    assert rel_err(U, dense_solve(*(M.astype(np.float64) for M in (A, B, C, D)), V, 1)) < 1e-12


def test_reference_path_matches_kernel_path(cpu_ext):
    A, B, C, D, V = problem(21, 14, 11, batch=(2,))
    U = SchurStein(np, A, B, C, D, 1).solve(V)
    with _ext.disabled():
        solver = SchurStein(np, A, B, C, D, 1)
        U_ref = solver.solve(V)
    assert rel_err(U, U_ref) < 1e-13


def test_empty_problem():
    solver = SchurStein(np, np.zeros((0, 0)), np.eye(3), np.zeros((0, 0)), np.eye(3), 1)
    assert solver.pivot_ratio == np.inf
    assert solver.solve(np.zeros((2, 3, 0))).shape == (2, 3, 0)
    A, B, C, D, _ = problem(1, 3, 2)
    assert SchurStein(np, A, B, C, D, 1).solve(np.zeros((0, 2, 3))).shape == (0, 2, 3)


def test_bad_arguments():
    A, B, C, D, _ = problem(1, 3, 2)
    solver = SchurStein(np, A, B, C, D, 1)
    with pytest.raises(ValueError, match=r"\(\.\.\., 2, 3\)"):
        solver.solve(np.ones((3, 2)))
    with pytest.raises(ValueError, match="sign"):
        SchurStein(np, A, B, C, D, 2)
    with pytest.raises(ValueError, match="square 2-D"):
        SchurStein(np, np.stack([A, A]), B, np.stack([C, C]), D, 1)
    with pytest.raises(ValueError, match="share one shape"):
        SchurStein(np, A, B, C[:2, :2], D, 1)


# -- non-normal factors ------------------------------------------------------------
@pytest.mark.parametrize("sign", SIGNS)
def test_defective_factors(sign):
    """Jordan blocks (orthogonally disguised): no usable eigenvector basis, still solved.

    The eigenvector-based formula ``U = Xb [(Xb⁻¹ V Xa⁻ᵀ) ⊘ (λ μᵀ + sign)] Xaᵀ``
    (K-FAC appendix B's route, with eigenvectors in place of the symmetric
    ones) loses everything: the eigenvector matrices have condition numbers
    above 1e12.
    """
    rng = np.random.default_rng(3)
    n = 12
    Qa, Qb = orthonormal(rng, n), orthonormal(rng, n)
    A = Qa @ (1.0 * np.eye(n) + 0.5 * np.eye(n, k=1)) @ Qa.T
    B = Qb @ (2.0 * np.eye(n) + 0.5 * np.eye(n, k=1)) @ Qb.T
    C = Qa @ (np.eye(n) + 0.1 * np.triu(rng.standard_normal((n, n)), 1)) @ Qa.T  # C⁻¹A stays defective
    D = np.eye(n)
    V = rng.standard_normal((n, n))
    la, Xa = np.linalg.eig(np.linalg.solve(C, A))
    lb, Xb = np.linalg.eig(B)
    assert np.linalg.cond(Xa) > 1e12 and np.linalg.cond(Xb) > 1e12
    ref = dense_solve(A, B, C, D, V, sign)
    cond = np.linalg.cond(np.kron(A, B) + sign * np.kron(C, D))
    U = SchurStein(np, A, B, C, D, sign).solve(V)
    assert residual(A, B, C, D, U, V, sign) < 1e-14
    assert rel_err(U, ref) < 100 * EPS64 * cond
    # what the eigenvector route gives (C⁻¹A ⊗ B + sign·I: the same equation, multiplied by C⁻¹ on the right)
    Ve = np.linalg.solve(Xb, V @ np.linalg.inv(C).T) @ np.linalg.inv(Xa).T
    Ue = (Xb @ (Ve / (np.outer(lb, la) + sign)) @ Xa.T).real
    assert rel_err(Ue, ref) > 1e-2


# -- singular and nearly singular equations ----------------------------------------
def schur_pencil(rng, n, eigs, pairs=(), similarity="orthogonal"):
    """A pencil (M, N) with prescribed generalized eigenvalues.

    ``eigs`` real eigenvalues and ``pairs`` complex pairs ``a ± ib`` (2×2 blocks
    ``[[a, b], [-b, a]]``) on the diagonal of a quasi-triangular ``S`` with a
    random strictly upper part and ``T = I + strictly upper``; then
    ``(M, N) = (Q S Zᵀ, Q T Zᵀ)`` with random orthogonal ``Q, Z`` or, for an
    exactly representable pencil, a permutation similarity.
    """
    S = 0.3 * np.triu(rng.standard_normal((n, n)), 1)
    T = np.eye(n) + 0.3 * np.triu(rng.standard_normal((n, n)), 1)
    i = 0
    for a, b in pairs:
        S[i : i + 2, i : i + 2] = [[a, b], [-b, a]]
        T[i : i + 2, i : i + 2] = np.eye(2)
        i += 2
    S[np.arange(i, n), np.arange(i, n)] = eigs
    assert i + len(eigs) == n
    if similarity == "orthogonal":
        Q, Z = orthonormal(rng, n), orthonormal(rng, n)
        return Q @ S @ Z.T, Q @ T @ Z.T
    P = rng.permutation(n)
    return S[P][:, P], T[P][:, P]


def singular_problem(sign, rel_distance, similarity="orthogonal", kind="real", seed=0):
    """(A, B, C, D) with a product λ·μ = -sign·(1 + rel_distance) of generalized eigenvalues."""
    rng = np.random.default_rng(seed)
    if kind == "real":
        B, D = schur_pencil(rng, 5, [2.0, 1.5, 3.0], pairs=[(0.7, 0.4)], similarity=similarity)
        mu = -sign * 0.5 * (1 + rel_distance)  # λ = 2
        A, C = schur_pencil(rng, 6, [mu, 0.9, 1.1, -0.7], pairs=[(0.3, 0.8)], similarity=similarity)
    else:  # a complex pair: λ = a + ib, μ = -sign·conj(λ)/|λ|² (times 1 + rel_distance)
        a, b = 0.7, 0.4
        r2 = a * a + b * b
        B, D = schur_pencil(rng, 5, [2.0, 1.5, 3.0], pairs=[(a, b)], similarity=similarity)
        mu = (-sign * a / r2 * (1 + rel_distance), sign * b / r2 * (1 + rel_distance))
        A, C = schur_pencil(rng, 6, [0.9, 1.1], pairs=[mu, (0.3, 0.8)], similarity=similarity)
    return A, B, C, D


@pytest.mark.parametrize("use_ext", [True, False], ids=["kernel", "reference"])
@pytest.mark.parametrize("kind,similarity", [("real", "permutation"), ("real", "orthogonal"), ("pair", "orthogonal")])
@pytest.mark.parametrize("rel_distance", [0.0, 1e-15], ids=["exact", "1e-15"])
@pytest.mark.parametrize("sign", SIGNS)
def test_singular_equation_raises(sign, rel_distance, kind, similarity, use_ext):
    if use_ext and _ext.cpu() is None:
        pytest.skip("compiled CPU extension disabled")
    A, B, C, D = singular_problem(sign, rel_distance, similarity, kind)
    target = "-1" if sign > 0 else "\\+1"
    with (_ext.disabled() if not use_ext else contextlib.nullcontext()):
        with pytest.raises(np.linalg.LinAlgError, match=f"singular to working precision.*equals {target}"):
            SchurStein(np, A, B, C, D, sign)


@pytest.mark.parametrize("sign", SIGNS)
def test_nearly_singular_but_resolvable(sign):
    """1e-8 away from singular: no error, and the answer is as accurate as the conditioning allows."""
    A, B, C, D = singular_problem(sign, 1e-8, "orthogonal", "real")
    V = np.random.default_rng(1).standard_normal((5, 6))
    solver = SchurStein(np, A, B, C, D, sign)
    assert solver.pivot_ratio > singular_tol(EPS64, 6, 5)
    K = np.kron(A, B) + sign * np.kron(C, D)
    U = solver.solve(V)
    assert residual(A, B, C, D, U, V, sign) < 1e-14
    assert rel_err(U, dense_solve(A, B, C, D, V, sign)) < 100 * EPS64 * np.linalg.cond(K)


def test_trivially_singular_and_zero_factors():
    rng = np.random.default_rng(0)
    A = rng.standard_normal((4, 4))
    B = rng.standard_normal((3, 3))
    # A ⊗ B - A ⊗ B = 0
    with pytest.raises(np.linalg.LinAlgError, match="singular"):
        SchurStein(np, A, B, A, B, -1)
    with pytest.raises(np.linalg.LinAlgError, match="singular"):
        SchurStein(np, np.zeros((4, 4)), np.zeros((3, 3)), np.zeros((4, 4)), np.zeros((3, 3)), 1)


@pytest.mark.parametrize("use_ext", [True, False], ids=["kernel", "reference"])
def test_backsub_raises_on_singular_schur_form(use_ext):
    if use_ext and _ext.cpu() is None:
        pytest.skip("compiled CPU extension disabled")
    # 1x1 blocks: S1 = diag(2, 1), T1 = I; S2 = diag(-0.5, 3), T2 = I; sign=+1: 2·(-0.5) + 1 = 0
    S1, T1 = np.array([[2.0, 0.3], [0.0, 1.0]]), np.eye(2)
    S2, T2 = np.array([[-0.5, 0.1], [0.0, 3.0]]), np.eye(2)
    W = np.ones((1, 2, 2))
    with (_ext.disabled() if not use_ext else contextlib.nullcontext()):
        with pytest.raises(np.linalg.LinAlgError, match="smallest relative pivot 0 <="):
            gsylv_backsub(np, S1, T1, S2, T2, W.copy(), 1)
        # sign=-1 is fine: 2·(-0.5) - 1 = -2
        Y = gsylv_backsub(np, S1, T1, S2, T2, W.copy(), -1)
    assert np.allclose(S1 @ Y[0] @ S2.T - T1 @ Y[0] @ T2.T, 1.0)


def test_singularity_threshold_is_relative():
    """Scaling every factor by a power of two scales all pivots and the scale alike."""
    A, B, C, D = singular_problem(1, 1e-8, "permutation", "real")
    r = SchurStein(np, A, B, C, D, 1).pivot_ratio
    r_scaled = SchurStein(np, 2.0**40 * A, 2.0**-30 * B, 2.0**40 * C, 2.0**-30 * D, 1).pivot_ratio
    assert r == pytest.approx(r_scaled, rel=1e-12)
    assert singular_tol(EPS64, 6, 5) == PIVOT_RTOL_FACTOR * EPS64  # the policy does not scale with the order


# -- the compiled kernel against its NumPy reference ----------------------------------
def schur_forms(seed, p, q, dtype):
    A, B, C, D, _ = problem(seed, p, q)
    S1, T1, _, _ = scipy.linalg.qz(B, D, output="real")
    S2, T2, _, _ = scipy.linalg.qz(A, C, output="real")
    return tuple(np.ascontiguousarray(M, dtype=dtype) for M in (S1, T1, S2, T2))


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("sign", SIGNS)
@pytest.mark.parametrize("shape", [(1, 1, 1), (1, 5, 3), (3, 13, 17), (2, 40, 33), (1, 70, 65)])
def test_kernel_matches_reference(cpu_ext, dtype, sign, shape):
    B, q, p = shape
    S1, T1, S2, T2 = schur_forms(sum(shape), p, q, dtype)
    if q >= 13:
        assert n_pairs(S1) > 0 and n_pairs(S2) > 0
    W = np.random.default_rng(0).standard_normal(shape).astype(dtype)
    with _ext.disabled():
        Y_ref, rel_ref = gsylv_backsub_raw(np, S1, T1, S2, T2, W.copy(), sign)
    Wk = W.copy()
    rel = cpu_ext.gsylv_backsub(S1, T1, S2, T2, Wk, sign)
    assert rel_err(Wk, Y_ref) < (1e-13 if dtype == "float64" else 1e-4)
    # the same small systems, factored the same way: pivots agree to rounding
    assert rel == pytest.approx(rel_ref, rel=1e-10 if dtype == "float64" else 1e-4)
    # and Y solves the quasi-triangular equation
    R = S1 @ Wk @ S2.T + sign * (T1 @ Wk @ T2.T) - W
    assert np.abs(R).max() < (1e-12 if dtype == "float64" else 1e-4) * np.abs(W).max()


def test_kernel_ignores_entries_below_the_structure(cpu_ext):
    S1, T1, S2, T2 = schur_forms(5, 9, 11, "float64")
    rng = np.random.default_rng(1)
    junk = [
        M + np.tril(rng.standard_normal(M.shape), k)
        for M, k in ((S1, -2), (T1, -1), (S2, -2), (T2, -1))
    ]
    junk = [np.ascontiguousarray(M) for M in junk]
    W = rng.standard_normal((2, 11, 9))
    Y = gsylv_backsub(np, S1, T1, S2, T2, W.copy(), 1)
    Yk = W.copy()
    cpu_ext.gsylv_backsub(*junk, Yk, 1)
    Y_ref = gsylv_backsub_reference(np, *junk, W.copy(), 1)
    assert rel_err(Yk, Y) < 1e-15 and rel_err(Y_ref, Y) < 1e-13


def test_kernel_dispatch_non_contiguous_and_reference_namespace(cpu_ext):
    S1, T1, S2, T2 = schur_forms(2, 6, 4, "float64")
    W = np.random.default_rng(2).standard_normal((6, 4)).T  # (4, 6), not C-contiguous
    W0 = W.copy()
    Y = gsylv_backsub(np, S1, T1, S2, T2, W, -1)
    assert np.array_equal(W, W0)  # a copy was solved
    with _ext.disabled():
        Y_ref = gsylv_backsub(np, S1, T1, S2, T2, W.copy(), -1)
    assert rel_err(Y, Y_ref) < 1e-13


def test_kernel_binding_validates(cpu_ext):
    S1, T1, S2, T2 = schur_forms(3, 4, 3, "float64")
    W = np.zeros((1, 3, 4))
    with pytest.raises(ValueError, match="C-contiguous"):
        cpu_ext.gsylv_backsub(np.asfortranarray(S1 + np.triu(S1, 1)), T1, S2, T2, W, 1)
    with pytest.raises(ValueError, match="one dtype"):
        cpu_ext.gsylv_backsub(S1.astype(np.float32), T1, S2, T2, W, 1)
    with pytest.raises(ValueError, match=r"\(p, p\)"):
        cpu_ext.gsylv_backsub(S1, T1, S2[:3, :3].copy(), T2, W, 1)
    with pytest.raises(ValueError, match=r"\(q, q\)"):
        cpu_ext.gsylv_backsub(S2, T1, S2, T2, W, 1)
    with pytest.raises(ValueError, match="sign"):
        cpu_ext.gsylv_backsub(S1, T1, S2, T2, W, 0)
    with pytest.raises(ValueError, match="W"):
        cpu_ext.gsylv_backsub(S1, T1, S2, T2, W[0], 1)
    bad = np.triu(np.ones((4, 4)), -1)  # a chain of nonzero subdiagonal entries
    with pytest.raises(ValueError, match="quasi-upper-triangular"):
        cpu_ext.gsylv_backsub(S1, T1, bad, T2, W, 1)
    assert cpu_ext.gsylv_backsub(S1, T1, S2, T2, np.zeros((0, 3, 4)), 1) == np.inf


# -- sizes too big for the dense reference -----------------------------------------------
def _needs_kernel():
    # the NumPy reference factors one dense (q·n)×(q·n) matrix per column block: O(p q³),
    # tens of seconds at these sizes; the fallback is covered at moderate size below
    if _ext.cpu() is None:
        pytest.skip("large sizes run with the compiled kernel (the NumPy reference is O(p q³))")


@pytest.mark.slow
@pytest.mark.parametrize("sign", SIGNS)
@pytest.mark.parametrize("p,q", [(300, 300), (257, 311)])
def test_large_residual(sign, p, q):
    _needs_kernel()
    A, B, C, D, V = problem(p + q, p, q)
    solver = SchurStein(np, A, B, C, D, sign)
    assert n_pairs(solver._S1) > 0 and n_pairs(solver._S2) > 0
    U = solver.solve(V)
    R = B @ U @ A.T + sign * (D @ U @ C.T) - V
    assert np.linalg.norm(R) / np.linalg.norm(V) < 1e-12
    assert residual(A, B, C, D, U, V, sign) < 1e-14


@pytest.mark.slow
def test_large_general_gaussian_factors():
    """Unstructured Gaussian factors (no shift): backward error stays at rounding level."""
    _needs_kernel()
    rng = np.random.default_rng(9)
    n = 200
    A, B, C, D = (rng.standard_normal((n, n)) for _ in range(4))
    V = rng.standard_normal((n, n))
    U = SchurStein(np, A, B, C, D, 1).solve(V)
    assert residual(A, B, C, D, U, V, 1) < 1e-14


@pytest.mark.parametrize("sign", SIGNS)
def test_moderate_residual_reference_path(sign):
    """The NumPy reference (the fallback without the extension) at a size beyond the dense grid."""
    A, B, C, D, V = problem(5, 96, 80)
    with _ext.disabled():
        solver = SchurStein(np, A, B, C, D, sign)
        U = solver.solve(V)
    assert n_pairs(solver._S1) > 0 and n_pairs(solver._S2) > 0
    R = B @ U @ A.T + sign * (D @ U @ C.T) - V
    assert np.linalg.norm(R) / np.linalg.norm(V) < 1e-12
