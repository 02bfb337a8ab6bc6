"""Reliability (issue 17 items 3-5, issue 11 item 3): well-posed problems solved, one singularity policy,
no silent non-finite results.  Dense references: np.kron and scipy.linalg."""

import numpy as np
import pytest
import scipy.linalg as sl

import kronlin
from kronlin import KronSumInverse, solve_kron_sum
from kronlin._validate import SINGULAR_RTOL_FACTOR, singular_tol

METHODS = ("eig", "auto", "schur")


def dense_solve(A, B, C, D, V, sign=1):
    K = np.kron(A.astype(np.float64), B.astype(np.float64)) + sign * np.kron(C.astype(np.float64), D.astype(np.float64))
    return sl.solve(K, V.astype(np.float64).flatten("F")).reshape(V.shape, order="F"), np.linalg.cond(K)


def rel(U, ref):
    return float(np.linalg.norm(np.asarray(U, np.float64) - ref) / np.linalg.norm(ref))


@pytest.mark.parametrize("dtype,t", [(np.float32, 1e-4), (np.float64, 1e-8)])
@pytest.mark.parametrize("method", METHODS)
def test_eig_solves_badly_scaled_diagonal_problem(dtype, t, method):
    """A = B = diag(1, t), C = D = diag(t, 1): eig/auto refused it as singular (issue 17 item 4)."""
    A = np.diag([1.0, t]).astype(dtype)
    C = np.diag([t, 1.0]).astype(dtype)
    V = np.ones((2, 2), dtype)
    U = solve_kron_sum(A, A, C, C, V, method=method)
    ref, cond = dense_solve(A, A, C, C, V)
    assert U.dtype == dtype
    # the float32 rounding of the answer (eps) plus the 10·cond·eps the issue allows
    assert rel(U, ref) <= 10 * cond * np.finfo(dtype).eps


def spd(rng, n, cond):
    Q, _ = np.linalg.qr(rng.standard_normal((n, n)))
    return (Q * np.geomspace(1.0, 1.0 / cond, n)) @ Q.T


@pytest.mark.parametrize("method", ("eig", "auto"))
def test_float32_eig_accuracy_within_operator_condition(method):
    """float32 eig/auto: error within 10·cond(A⊗B + C⊗D)·eps (it was 6.9e-4 at cond 166)."""
    rng = np.random.default_rng(17)
    worst = 0.0
    for _ in range(20):
        p, q = rng.integers(2, 12, size=2)
        A, B = spd(rng, p, 10 ** rng.uniform(0, 4)), spd(rng, q, 10 ** rng.uniform(0, 4))
        C, D = spd(rng, p, 10 ** rng.uniform(0, 4)), spd(rng, q, 10 ** rng.uniform(0, 4))
        A, B, C, D = (M.astype(np.float32) for M in (A, B, C, D))
        V = rng.standard_normal((q, p)).astype(np.float32)
        ref, cond = dense_solve(A, B, C, D, V)
        err = rel(solve_kron_sum(A, B, C, D, V, method=method), ref)
        worst = max(worst, err / (cond * np.finfo(np.float32).eps))
    assert worst <= 10


def test_float64_ill_conditioned_whitening_is_refined():
    """Whitening pair of condition 1e12·1e12, operator well conditioned: auto is accurate to cond·eps."""
    rng = np.random.default_rng(5)
    p, q = 8, 7
    A, B = spd(rng, p, 1e12), spd(rng, q, 1e12)
    C, D = spd(rng, p, 1e12), spd(rng, q, 1e12)
    A, C = A + 1e-3 * C, C  # keep A⊗B + C⊗D far better conditioned than A, B
    V = rng.standard_normal((q, p))
    ref, cond = dense_solve(A, B, C, D, V)
    inv = KronSumInverse(A, B, C, D, method="auto")
    assert rel(inv.solve(V), ref) <= 10 * cond * np.finfo(np.float64).eps


def test_smith_balances_unbalanced_radii():
    """ρ(B⁻¹D) = 4.5, ρ(A⁻¹C) = 0.2, product 0.9 < 1: was refused as 'estimated at 0.909 ≥ 1'."""
    I = np.eye(3)
    V = np.arange(9.0).reshape(3, 3)
    inv = KronSumInverse(I, I, 0.2 * I, 4.5 * I, method="smith")
    np.testing.assert_allclose(inv.solve(V), V / 1.9, rtol=1e-13)
    assert inv.solver.rho_estimate < 1


def test_smith_still_refuses_divergent_problems():
    I = np.eye(3)
    with pytest.raises(np.linalg.LinAlgError, match="diverges"):
        KronSumInverse(I, I, 0.25 * I, 4.5 * I, method="smith")  # ρ·ρ = 1.125


# -- one singularity policy ------------------------------------------------------------------------------------
def _stein_problem(delta, dtype):
    """A = B = I (scaled), C = D = diag(1, s): the operator's eigenvalues are 1 + s2·s1; one equals delta."""
    A = np.diag([1.0, 2.0, 3.0]).astype(dtype)
    B = np.diag([1.0, 0.5]).astype(dtype)
    C = np.diag([1.0, 1.0, 1.0]).astype(dtype)
    D = np.diag([-(1.0 - delta), 0.25]).astype(dtype)  # 1·1 - (1 - δ)·1 = δ at (i, j) = (0, 0)
    return A, B, C, D


def _verdict(method, A, B, C, D):
    try:
        KronSumInverse(A, B, C, D, method=method)
        return "solved"
    except np.linalg.LinAlgError as exc:
        assert "singular to working precision" in str(exc)
        return "singular"


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_same_verdict_from_every_method(dtype):
    """Issue 11 item 3: the same Stein problem gets the same verdict from eig, auto and schur."""
    eps = np.finfo(dtype).eps
    for delta, want in ((0.0, "singular"), (0.1 * singular_tol(eps), "singular"),
                        (1e3 * singular_tol(eps), "solved"), (0.5, "solved")):
        A, B, C, D = _stein_problem(delta, dtype)
        # D is indefinite, so "eig" needs a sum of SPD pairs: use A ⊗ B + C ⊗ D with C = I, D symmetric
        got = {m: _verdict(m, A, B, C, D) for m in ("eig", "auto", "schur")}
        assert set(got.values()) == {want}, (delta, got)


def test_policy_is_one_constant():
    from kronlin._kernels import gsylv

    assert gsylv.PIVOT_RTOL_FACTOR == SINGULAR_RTOL_FACTOR
    assert gsylv.singular_tol(1.0, 5, 7) == singular_tol(1.0)


def test_kron_eigh_singularity_agrees_with_kron_solve():
    """A ⊗ G with cond(A) = cond(G) = 1e3 in float32 (product 1e6) is solved by both; a singular factor by neither."""
    rng = np.random.default_rng(1)
    A, G = spd(rng, 13, 1e3).astype(np.float32), spd(rng, 11, 1e3).astype(np.float32)
    X = rng.standard_normal((11, 13)).astype(np.float32)
    K = kronlin.Kron(A, G)
    np.testing.assert_allclose(K.eigh().solve(X), K.solve(X), rtol=0, atol=1e-2 * np.abs(K.solve(X)).max())
    S = np.ones((3, 3))  # exactly singular (rank 1), not diagonal
    K = kronlin.Kron(S, np.eye(2))
    for call in (lambda: K.solve(np.ones((2, 3))), lambda: K.eigh().solve(np.ones((2, 3)))):
        with pytest.raises(np.linalg.LinAlgError, match="singular"):
            call()


# -- item 3: silently wrong or non-finite results ----------------------------------------------------------------
def test_kron_eigh_checks_orthonormal_eigenvectors():
    with pytest.raises(ValueError, match=r"Qa \(shape \(2, 2\)\) must have orthonormal columns"):
        kronlin.KronEigh(np.zeros((2, 2)), np.ones(2), np.eye(2), np.ones(2))
    Q = np.linalg.qr(np.random.default_rng(0).standard_normal((4, 4)))[0].astype(np.float32)
    f32 = np.float32
    kronlin.KronEigh(np.eye(3, dtype=f32), np.ones(3, f32), Q, np.ones(4, f32))  # float32 orthonormal: accepted


@pytest.mark.parametrize("seed", range(4))
def test_eigh_logdet_of_singular_factor_raises_like_solve(seed):
    X = np.random.default_rng(seed).standard_normal((6, 3))
    A = X @ X.T  # rank 3: exactly singular, eigenvalues of ~1e-16 after rounding
    K = kronlin.Kron(A, np.eye(2))
    with pytest.raises(np.linalg.LinAlgError):
        K.solve(np.ones((2, 6)))
    with pytest.raises(np.linalg.LinAlgError):
        K.eigh().logdet()


def test_tridiag_smith_rejects_what_eig_rejects():
    rng = np.random.default_rng(0)
    X = rng.standard_normal((3, 3))
    Ad = [np.diag([1.0, -1.0, 2.0]), X @ X.T + np.eye(3)]
    Gd = [np.eye(2), np.eye(2)]
    args = (Ad, Gd, [0.1 * np.ones((3, 3))], [0.1 * np.ones((2, 2))])
    for method in ("eig", "smith"):
        with pytest.raises(np.linalg.LinAlgError, match="not positive definite"):
            kronlin.BlockTridiagInverse(*args, method=method)


def test_overflow_raises_naming_the_argument():
    rng = np.random.default_rng(0)
    X = rng.standard_normal((3, 3))
    A, G = X @ X.T + np.eye(3), np.eye(2) * 2.0
    E = kronlin.Kron(A, G).eigh()
    with pytest.raises(ValueError, match="power=1e"):
        E.power(np.ones((2, 3)), 1e300)
    with pytest.raises(ValueError, match="power=-1e"):
        E.power(np.ones((2, 3)), -1e300)
    with pytest.raises(ValueError, match="pi"):
        kronlin.factored_damping(A, G, 1.0, pi=5e-324)
    with pytest.raises(ValueError, match="pi"):
        kronlin.BlockDiagInverse([A], [G], gamma=1.0, pi=5e-324)
    with pytest.raises(ValueError, match=r"A_off\[0\]"):
        kronlin.BlockTridiagInverse([A, A], [G, G], [1e300 * np.ones((3, 3))], [np.eye(2)])
    for method in ("auto", "eig", "schur", "smith"):
        with pytest.raises(ValueError, match=r"A ⊗ B .*overflows"):
            KronSumInverse(1e300 * A, 1e300 * A, A, A, method=method)
    # representable answers are still returned: damping 5e-324 and gamma 1e300 (an underflowing inverse)
    assert np.isfinite(kronlin.DampedKron(A, G, 5e-324).solve(np.ones((2, 3)))).all()
    assert np.isfinite(kronlin.factored_damping(A, G, 1e300).solve(np.ones((2, 3)))).all()


# -- overflow: a result that leaves the dtype's range raises, naming the call and what to rescale ------------------
_RNG = np.random.default_rng(17)
_A = (lambda X: X @ X.T + np.eye(3))(_RNG.standard_normal((3, 3)))
_G = 2.0 * np.eye(2)
_X = np.ones((2, 3))
_ACTS, _ERRS = [_RNG.standard_normal((5, 3))], [_RNG.standard_normal((5, 2))]

OVERFLOWING_RESULTS = {
    # the list: factors x1e300, gamma 1e300 on the damped product, activations x1e300, tiny factors
    "Kron @ X": (lambda: kronlin.Kron(1e300 * _A, 1e300 * _G) @ _X, r"Kron @ X .*rescale the factors A and G"),
    "Kron.matmat": (lambda: kronlin.Kron(1e300 * _A, _G).matmat(1e10 * np.ones((6, 2))), r"Kron\.matmat\(\)"),
    "Kron.solve tiny": (lambda: kronlin.Kron(1e-300 * _A, 1e-300 * _G).solve(_X), r"Kron\.solve\(\)"),
    "Kron.trace": (lambda: kronlin.Kron(1e300 * _A, 1e300 * _G).trace(), r"Kron\.trace\(\)"),
    "Kron.to_dense": (lambda: kronlin.Kron(1e300 * _A, 1e300 * _G).to_dense(), r"Kron\.to_dense\(\)"),
    "linop": (lambda: kronlin.Kron(1e300 * _A, 1e300 * _G).aslinearoperator().matvec(np.ones(6)),
              r"Kron\.aslinearoperator\(\)"),
    "KronEigh.solve": (lambda: kronlin.Kron(1e-100 * _A, 1e-100 * _G).eigh().solve(1e250 * _X),
                       r"KronEigh\.solve\(\)"),  # returns through power(): the outer call is named
    "factored_damping @": (lambda: kronlin.factored_damping(_A, _G, 1e300) @ _X, r"Kron @ X"),
    "DampedKron @": (lambda: kronlin.DampedKron(_A, _G, 1e300) @ (1e300 * _X), r"DampedKron @ X .*damping"),
    "WoodburyFisher.matvec": (lambda: kronlin.WoodburyFisher([1e300 * a for a in _ACTS], _ERRS, 1.0).matvec([_X]),
                              r"WoodburyFisher\.matvec\(\) .*rescale acts and errs"),
    "WoodburyFisher.quad": (lambda: kronlin.WoodburyFisher([1e300 * a for a in _ACTS], _ERRS, 1.0).quad([_X]),
                            r"WoodburyFisher\.quad\(\)"),
    "WoodburyFisher.solve": (lambda: kronlin.WoodburyFisher([1e300 * a for a in _ACTS], _ERRS, 1.0).solve([_X]),
                             r"gram\(\) = scale·GᵀG .*rescale acts and errs"),  # was "singular to working precision"
    "WoodburyFisher.batch_gradient": (lambda: kronlin.WoodburyFisher.batch_gradient([1e300 * a for a in _ACTS],
                                                                                    [1e300 * e for e in _ERRS]),
                                      r"batch_gradient\(\) of layer 0 .*errs\[0\]"),
    "batch_factors": (lambda: kronlin.batch_factors([1e300 * a for a in _ACTS], _ERRS),
                      r"A_diag\[0\] \(the second moment of acts\[0\]\) .*rescale acts\[0\]"),
    "FactorEstimator.update": (lambda: kronlin.FactorEstimator().update(_ACTS, [1e300 * e for e in _ERRS]),
                               r"G_diag\[0\] \(the second moment of grads\[0\]\)"),
    "pi_factor": (lambda: kronlin.pi_factor(1e308 * np.eye(2), 1e308 * np.eye(3)), r"trace of A \(shape \(2, 2\)\) overflows"),
}


@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")  # NumPy's warning on the way; the error is the outcome
@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
@pytest.mark.parametrize("case", sorted(OVERFLOWING_RESULTS))
def test_overflowing_result_raises_naming_call_and_fix(case):
    """Finite inputs, a result beyond the dtype's range: FloatingPointError, not Inf/NaN with a RuntimeWarning."""
    call, match = OVERFLOWING_RESULTS[case]
    with pytest.raises(FloatingPointError, match=match):
        call()


@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")
def test_overflow_refused_before_work_names_the_argument():
    # the eigenvalue products of A ⊗ G overflow: refused at eigh(), not reported as "singular"
    with pytest.raises(ValueError, match=r"eigenvalue products lg·la overflow .*rescale A and G"):
        kronlin.Kron(1e300 * _A, 1e300 * _G).eigh()
    # Woodbury's 1/damping overflows: refused naming damping (the answer (λI + F)⁻¹u has no representable value)
    with pytest.raises(ValueError, match=r"1/damping .*pass a larger damping"):
        kronlin.WoodburyFisher(_ACTS, _ERRS, 5e-324).solve([_X])
    # a power whose rounding error amplification leaves no correct digit
    with pytest.raises(ValueError, match=r"power=1e\+20 is too large"):
        kronlin.Kron(np.eye(3), np.eye(2)).eigh().power(_X, 1e20)


def test_estimator_keeps_its_averages_when_a_batch_overflows():
    est = kronlin.FactorEstimator().update(_ACTS, _ERRS)
    before = est.state_dict()
    with np.errstate(over="ignore"), pytest.raises(FloatingPointError, match=r"acts\[0\]"):
        est.update([1e300 * a for a in _ACTS], _ERRS)
    after = est.state_dict()
    assert after["step"] == before["step"] == 1
    for key in ("A_diag", "G_diag", "A_off", "G_off"):
        for M, M0 in zip(after["stats"][key], before["stats"][key]):
            np.testing.assert_array_equal(M, M0)


def test_results_near_the_range_are_returned():
    """The check is on the result, not on magnitudes: large but representable answers come back exactly."""
    K = kronlin.Kron(1e150 * _A, 1e150 * _G)
    np.testing.assert_allclose(K @ _X, 1e300 * (_G @ _X @ _A.T), rtol=1e-14)
    np.testing.assert_allclose(kronlin.Kron(1e-150 * _A, 1e-150 * _G).solve(_X),
                               1e300 * np.linalg.solve(_G, np.linalg.solve(_A, _X.T).T), rtol=1e-12)
    big = np.full((2, 3), 1e307)  # the sum of these entries overflows; the entries do not (no false alarm)
    np.testing.assert_array_equal(kronlin.Kron(np.eye(3), np.eye(2)) @ big, big)
    F = kronlin.WoodburyFisher([1e100 * a for a in _ACTS], _ERRS, 1.0)
    assert np.isfinite(F.solve([_X])[0]).all()


def test_subnormal_factors_are_refused_not_factored_inaccurately():
    """max|A| below the smallest normal number: slogdet was off by 0.57 (the matrix's digits are gone)."""
    K = kronlin.Kron(1e-310 * _A, _G)
    for call in (K.slogdet, lambda: K.solve(_X), K.eigh):
        with pytest.raises(ValueError, match=r"^A \(shape \(3, 3\)\) is too small in magnitude to factor .*rescale A"):
            call()
    s, l = kronlin.Kron(1e-300 * _A, _G).slogdet()  # small but normal: factored, accurately
    s0, l0 = np.linalg.slogdet(np.kron(_A, _G))
    assert s == s0 and abs(l - (l0 + 2 * 3 * np.log(1e-300))) <= 1e-10 * abs(l)


def test_tridiag_overflow_names_gamma_not_the_inner_stein_factors():
    """gamma=1e300: the inner Stein set-up's "A ⊗ B overflows; rescale A and B" named arguments the caller never passed."""
    with pytest.raises(ValueError, match=r"damped A_diag\[0\] and G_diag\[0\] \(gamma = 1e\+300\) are too large"):
        kronlin.BlockTridiagInverse([_A, _A], [_G, _G], [0.1 * _A], [0.1 * _G], gamma=1e300)


@pytest.mark.parametrize("tol", [1.0, 2.0, float("inf")])
def test_smith_refuses_a_tolerance_that_accepts_any_answer(tol):
    """tol is a relative change: tol ≥ 1 stops at once (tol=2 gave 7% error, tol=inf 66%); refused by name."""
    rng = np.random.default_rng(0)
    A, B = np.eye(3), np.eye(4)
    C, D = 0.3 * rng.standard_normal((3, 3)), 0.3 * rng.standard_normal((4, 4))
    with pytest.raises(ValueError, match="tol"):
        solve_kron_sum(A, B, C, D, np.ones((4, 3)), method="smith", tol=tol)


@pytest.mark.parametrize("flag", ["no", 0, None])
def test_smith_squared_is_a_switch(flag):
    """squared="no" used to be silently True."""
    with pytest.raises(TypeError, match="squared must be True or False"):
        KronSumInverse(np.eye(2), np.eye(2), 0.1 * np.eye(2), 0.1 * np.eye(2), method="smith", squared=flag)


def test_auto_solves_a_nonsingular_indefinite_difference():
    """sign=-1 with A⊗B − C⊗D nonsingular but indefinite: "eig" cannot (it needs a positive definite sum),
    "auto" used to refuse it with "add damping" where "schur" solves it; now it falls back to "schur"."""
    rng = np.random.default_rng(1)
    A, B = np.eye(3), np.eye(4)
    C, D = np.diag([2.0, 3.0, 1.5]), np.diag([1.2, 2.0, 0.3, 0.9])  # no product of eigenvalues equals 1
    V = rng.standard_normal((4, 3))
    inv = KronSumInverse(A, B, C, D, sign=-1, method="auto")
    assert inv.method == "schur"
    ref, cond = dense_solve(A, B, C, D, V, sign=-1)
    assert rel(inv.solve(V), ref) <= 10 * cond * np.finfo(np.float64).eps
