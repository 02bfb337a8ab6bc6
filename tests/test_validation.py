"""Every validation rule raises before work, naming the argument, its shape and the fix."""

from __future__ import annotations

import numpy as np
import pytest

import kronlin
from kronlin import Kron, KronEigh, factored_damping, pi_factor

EYE3, EYE2 = np.eye(3), np.eye(2)


@pytest.mark.parametrize(
    "make,match",
    [
        (lambda: Kron(np.ones((3, 2)), EYE2), r"^A must be a square matrix .*got shape \(3, 2\)"),
        (lambda: Kron(EYE3, np.ones(4)), r"^G must be a square matrix .*got shape \(4\)"),
        (lambda: Kron(np.ones((2, 3, 3)), np.ones((4, 2, 2))), r"batch dimensions of A \(2, 3, 3\) and G \(4, 2, 2\)"),
        (lambda: Kron(np.diag([1.0, np.nan, 1.0]), EYE2), r"^A \(shape \(3, 3\)\) contains NaN or infinity"),
        (lambda: Kron(EYE3, np.diag([np.inf, 1.0])), r"^G \(shape \(2, 2\)\) contains NaN"),
        (lambda: KronEigh(EYE3, np.ones(2), EYE2, np.ones(2)), r"^Qa must be .* and la"),
    ],
)
def test_constructor_errors(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_rhs_shape_errors():
    K = Kron(EYE3, EYE2)
    with pytest.raises(ValueError, match=r"^X must have shape \(\.\.\., q, p\) = \(\.\.\., 2, 3\).*got shape \(3, 2\)"):
        K @ np.ones((3, 2))
    with pytest.raises(ValueError, match=r"^X is a flat vector of length 5.*p\*q = 6"):
        K.solve(np.ones(5))
    with pytest.raises(ValueError, match=r"^X \(shape \(2, 3\)\) contains NaN"):
        K.eigh().solve(np.full((2, 3), np.nan))
    with pytest.raises(ValueError, match=r"^V must have shape \(p\*q, k\) = \(6, k\)"):
        K.matmat(np.ones((5, 2)))


def test_symmetry_checked_with_tolerance_never_symmetrised():
    A = np.array([[2.0, 1.0], [0.0, 2.0]])
    with pytest.raises(ValueError, match=r"^A \(shape \(2, 2\)\) must be symmetric: max\|A - Aᵀ\|"):
        Kron(A, EYE2).eigh()
    # round-off asymmetry (a few ulps) is accepted
    rng = np.random.default_rng(0)
    X = rng.standard_normal((50, 7))
    S = X.T @ X
    S[0, 1] *= 1 + 4e-16
    Kron(S, EYE2).eigh()
    with pytest.raises(ValueError, match=r"^G \(shape \(2, 2\)\) must be symmetric"):
        Kron(EYE3, np.array([[1.0, 0.5], [0.4, 1.0]])).eigh()


@pytest.mark.parametrize("bad", [np.nan, np.inf])
@pytest.mark.parametrize("shape", [(3, 3), (4, 70, 70)])
def test_check_symmetric_refuses_a_non_finite_entry(bad, shape):
    """The symmetry test alone refuses NaN and infinity (its maxima are NaN then, which no tolerance compares
    to): callers may skip a separate finiteness pass, as BlockDiagInverse does for its stacks."""
    from kronlin._validate import check_symmetric

    S = np.zeros(shape)
    S[..., -1, 1] = S[..., 1, -1] = bad  # symmetric, not finite
    with pytest.raises(ValueError, match=r"^S \(shape .*\) contains NaN or infinity"):
        check_symmetric(np, S, "S")


def test_block_diag_inverse_names_a_non_finite_factor_of_a_stack():
    A = [np.eye(3), np.eye(3), np.eye(3)]
    A[1] = np.diag([1.0, np.nan, 1.0])
    with pytest.raises(ValueError, match=r"^A_diag\[1\] \(shape \(3, 3\)\) contains NaN or infinity"):
        kronlin.BlockDiagInverse(A, [np.eye(2)] * 3, gamma=0.1)


def test_not_psd_names_argument_and_suggests_damping():
    with pytest.raises(np.linalg.LinAlgError, match=r"^G \(shape \(2, 2\)\) is not positive semi-definite.*add damping"):
        Kron(EYE3, np.diag([1.0, -1.0])).eigh()


def test_damping_must_be_nonnegative_finite():
    E = Kron(EYE3, EYE2).eigh()
    for bad in (-1.0, np.nan, np.inf):
        with pytest.raises(ValueError, match="damping must be finite and non-negative"):
            E.solve(np.ones((2, 3)), damping=bad)
    with pytest.raises(TypeError, match="damping must be a real scalar"):
        E.solve(np.ones((2, 3)), damping="big")


def test_singular_lu_factor():
    with pytest.raises(np.linalg.LinAlgError, match=r"^A \(shape \(2, 2\)\) is singular to working precision; add damping"):
        Kron(np.array([[1.0, 2.0], [2.0, 4.0 + 1e-300]]) @ np.array([[1.0, 0.0], [1.0, 0.0]]), EYE2).solve(np.ones((2, 2)))


@pytest.mark.parametrize(
    "value,match",
    [
        (np.eye(2, dtype=np.float16), "float16; kronlin computes in float32 or float64"),
        (np.eye(2, dtype=np.complex128), "complex dtype complex128"),
        (np.array([["a", "b"], ["c", "d"]]), "not numeric"),
        (np.array([[object(), 1], [1, 1]], dtype=object), "not numeric"),
        ("eye", "must be an array"),
    ],
)
def test_dtype_policy_rejections(value, match):
    with pytest.raises(TypeError, match="A .*" + match if match != "must be an array" else "A must be an array"):
        Kron(value, EYE2)


def test_mixed_libraries_rejected():
    xps = pytest.importorskip("array_api_strict")
    with pytest.raises(TypeError, match="G is a array_api_strict array but A is a numpy array"):
        Kron(EYE3, xps.asarray(EYE2))
    K = Kron(xps.asarray(EYE3), xps.asarray(EYE2))
    with pytest.raises(TypeError, match="X is a numpy array but the operator computes on array_api_strict"):
        K @ np.ones((2, 3))


def test_pi_and_damping_validate_inputs():
    with pytest.raises(ValueError, match="^G .* contains NaN"):
        pi_factor(EYE3, np.full((2, 2), np.nan))
    with pytest.raises(ValueError, match="^A must be a square matrix"):
        factored_damping(np.ones((2, 3)), EYE2, 0.1)


# -- issue 17 item 5: every bad input is named, with the fix ---------------------------------------------------
_Q32 = np.linalg.eigh(np.random.default_rng(3).standard_normal((4, 4)).astype(np.float32) + 4 * np.eye(4, dtype=np.float32))[1]

@pytest.mark.parametrize(
    "call,exc,match",
    [
        (lambda: Kron([[1.0, 2.0], [3.0]], EYE2), ValueError, r"^A is not a rectangular array"),
        (lambda: Kron(EYE3, EYE2) @ [[1.0, 2.0, 3.0], [1.0]], ValueError, r"^X is not a rectangular array"),
        (lambda: Kron(EYE3, EYE2).eigh(psd="no"), TypeError, r"^psd must be True or False; got str 'no'"),
        (lambda: Kron(EYE3, EYE2).to_dense(allow_large=None), TypeError, r"^allow_large must be True or False"),
        (lambda: kronlin.batch_factors([np.ones((4, 3))], [np.ones((4, 2))], append_one="no"), TypeError,
         r"^append_one must be True or False"),
        (lambda: kronlin.FactorEstimator(tridiagonal=1), TypeError, r"^tridiagonal must be True or False"),
        (lambda: kronlin.WoodburyFisher([np.ones((4, 3))], [np.ones((4, 2))], 1.0).aslinearoperator(inverse="yes"),
         TypeError, r"^inverse must be True or False"),
        (lambda: kronlin.jax_callback(None, "solve"), TypeError, r"^op must be a kronlin operator"),
        (lambda: kronlin.jax_callback(Kron(EYE3, EYE2), "solve"), TypeError, r"^op must be an operator built from JAX"),
        (lambda: KronEigh(EYE3, np.ones(3), EYE2, np.ones((1, 2))), ValueError,
         r"^Qg must be \(\.\.\., n, n\) and lg \(\.\.\., n\) with the same batch dimensions"),
        (lambda: KronEigh(_Q32, np.ones(4, np.float32), 3.0, np.ones(2)), ValueError, r"^Qg must be"),  # shapes first
        (lambda: Kron(np.eye(1), np.eye(1)).eigh().apply(np.ones((1, 1)), lambda d: np.ones((7, 7))), ValueError,
         r"^fn must return values broadcastable to the eigenvalue products of shape \(1, 1\); got \(7, 7\)"),
        (lambda: Kron(np.diag([1.0, -1.0]), EYE2).eigh(psd=False).power(np.ones((2, 2)), 0.5), np.linalg.LinAlgError,
         r"^power=0\.5: a fractional power of an indefinite"),
        (lambda: Kron(np.ones((2, 3, 3)) * EYE3, EYE2).aslinearoperator(), ValueError,
         r"batch shape \(2,\)\) is not one linear operator \(its batch dimensions come from the factors A and G\)"),
        (lambda: Kron(EYE3, EYE2).aslinearoperator().matvec([[1.0, 2.0], [1.0]]), ValueError,
         r"^the vector is not a rectangular array"),
        (lambda: Kron(EYE3, EYE2).aslinearoperator().matvec(np.ones(6, np.float16)), TypeError,
         r"^the vector has dtype float16; kronlin computes in float32 or float64"),
        (lambda: kronlin.FactorEstimator().update([np.ones((4, 3))], [np.ones((4, 2))]).update([np.ones((4, 2))], [np.ones((4, 2))]),
         ValueError, r"^acts and grads give A_diag of shapes \[\(3, 3\)\] but the running averages have \[\(4, 4\)\]"),
    ],
)
def test_unclear_errors_name_the_argument(call, exc, match):
    with pytest.raises(exc, match=match):
        call()


def test_linop_refuses_a_torch_vector_by_name():
    torch = pytest.importorskip("torch")
    with pytest.raises(TypeError, match=r"^the vector must be a numpy array .*got torch\.Tensor"):
        Kron(EYE3, EYE2).aslinearoperator().matvec(torch.ones(6, dtype=torch.float64))


def test_factored_damping_without_damping_ignores_pi():
    """gamma=0 with a π that underflows float32 (5e-324 -> 0): γ/π was 0/0 and the factors NaN."""
    A, G = EYE3.astype(np.float32), 2 * EYE2.astype(np.float32)
    K = factored_damping(A, G, 0.0, pi=5e-324)
    np.testing.assert_array_equal(K.to_dense(), np.kron(A, G))
    A[0, 0] = 7.0  # and the operator owns its factors (snapshot semantics)
    assert K.A[0, 0] == 1.0


def test_kron_eigh_accepts_float32_eigenvectors_promoted_by_float64_eigenvalues():
    """la given as a list (float64) promotes the computation; float32 eigenvectors are checked to float32 accuracy."""
    rng = np.random.default_rng(3)
    w, Q = np.linalg.eigh((lambda X: X @ X.T + np.eye(4))(rng.standard_normal((4, 4))).astype(np.float32))
    E = KronEigh(Q, w.tolist(), np.eye(2, dtype=np.float32), [1.0, 2.0])
    assert E.dtype == np.float64


def test_first_nonfinite_decides_once_and_has_no_false_alarm(xp):
    """One decision for many arrays: the first non-finite one by index; finite arrays whose total overflows
    (NumPy's sum prefilter) are still finite."""
    from kronlin._validate import first_nonfinite

    from helpers import on

    big = np.full((3, 3), np.finfo(np.float64).max / 2)
    arrs = [np.ones((2, 2)), big, big, np.ones(4)]
    assert first_nonfinite(xp, [on(xp, a) for a in arrs]) is None
    assert first_nonfinite(xp, []) is None
    for k, bad in ((3, np.nan), (1, np.inf), (0, -np.inf)):
        b = [a.copy() for a in arrs]
        b[k].flat[0] = bad
        b[3].flat[-1] = np.nan  # a later one too: the first is named
        assert first_nonfinite(xp, [on(xp, a) for a in b]) == k


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_one_by_one_factors_are_refused_when_not_finite(bad):
    """The symmetry test is the finiteness test of a factor (one pass for both), at order 1 too, where there
    is nothing off the diagonal to compare: a single layer, a stacked group of 1 × 1 layers, a refresh."""
    import kronlin

    with pytest.raises(ValueError, match=r"A_diag\[0\] \(shape \(1, 1\)\) contains NaN or infinity"):
        kronlin.BlockDiagInverse([np.array([[bad]]), np.eye(2)], [np.eye(2), np.eye(3)], gamma=0.1)
    with pytest.raises(ValueError, match=r"G_diag\[1\] \(shape \(1, 1\)\) contains NaN or infinity"):
        kronlin.BlockDiagInverse([np.eye(1), np.eye(1)], [np.eye(1), np.array([[bad]])], gamma=0.1)
    eig = kronlin.Kron(np.eye(1), np.eye(2)).eigh()
    with pytest.raises(ValueError, match=r"A \(shape \(1, 1\)\) contains NaN or infinity"):
        eig.refresh(np.array([[bad]]), np.eye(2), damping=0.1)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shape", [(1, 1), (5, 5), (130, 130), (3, 40, 40)])
def test_check_finite_measured_is_the_finiteness_test_and_the_symmetry_measure(dtype, shape):
    """One pass at construction: the same verdict as check_finite (naming the argument), and where the compiled
    kernel applies exactly the (asym, scale) that asymmetry() measures, so a factorization needs no pass of its own."""
    from kronlin._ext import cpu
    from kronlin._kernels.symmetric import asymmetry
    from kronlin._validate import check_finite_measured

    rng = np.random.default_rng(1)
    S = rng.standard_normal(shape).astype(dtype)
    S[..., 0, -1] += 0.25  # asymmetric where the order allows
    got = check_finite_measured(np, S, "S")
    if cpu() is None:
        assert got is None
    else:
        assert got == asymmetry(np, S)  # exact maxima
        assert got[1] == np.max(np.abs(S))
        if shape[-1] > 1:  # a view that is not C-contiguous: no measure, check_finite's own pass
            assert check_finite_measured(np, np.swapaxes(S, -1, -2), "S") is None
    for bad in (np.nan, np.inf, -np.inf):
        T = S.copy()
        T[..., -1, -1] = bad
        with pytest.raises(ValueError, match=r"^S \(shape .*\) contains NaN or infinity"):
            check_finite_measured(np, T, "S")


@pytest.mark.parametrize("compiled", [True, False])
def test_kron_sum_inverse_decides_from_its_constructors_measure(compiled):
    """KronSumInverse measures A, B, C, D while testing them finite: symmetric SPD factors take "eig", an
    asymmetric one "schur", the overflow check reads max|M| from the measure, and a transpose keeps it.  Without
    the compiled kernels nothing is measured and the same decisions come from the plain tests.  (Kron does not
    measure in its constructor: an operator that is only applied would pay for it; its factorizations decide.)"""
    import contextlib

    from kronlin import kernels
    from kronlin._ext import cpu

    rng = np.random.default_rng(2)
    X = rng.standard_normal((40, 6))
    S = X.T @ X / 40 + 0.1 * np.eye(6)
    N = S + 0.3 * np.triu(np.ones((6, 6)), 1)  # not symmetric, invertible
    V = rng.standard_normal((6, 6))
    with kernels.disabled() if not compiled else contextlib.nullcontext():
        inv = kronlin.KronSumInverse(S, S, np.eye(6), 0.5 * np.eye(6))
        assert inv.method == "eig"
        assert (inv._measured["A"] is not None) == (compiled and cpu() is not None)
        gen = kronlin.KronSumInverse(S, N, np.eye(6), 0.5 * np.eye(6))
        assert gen.method == "schur"
        dense = np.kron(S, N) + 0.5 * np.kron(np.eye(6), np.eye(6))
        np.testing.assert_allclose(dense @ gen.solve(V).flatten("F"), V.flatten("F"), rtol=1e-10, atol=1e-10)
        np.testing.assert_allclose(gen.T.solve(V), kronlin.KronSumInverse(S.T, N.T, np.eye(6), 0.5 * np.eye(6)).solve(V),
                                   rtol=1e-10, atol=1e-12)
        with pytest.raises(ValueError, match=r"^B \(shape \(6, 6\)\) must be symmetric"):
            kronlin.KronSumInverse(S, N, np.eye(6), 0.5 * np.eye(6), method="eig")
        big = np.finfo(np.float64).max
        with pytest.raises(ValueError, match=r"A ⊗ B .* overflows"):
            kronlin.KronSumInverse(S * (big / 4), S * 8.0, np.eye(6), np.eye(6))
        # an operator unpickled from before the constructor measured (no instance attribute) still transposes
        old = kronlin.KronSumInverse(S, N, np.eye(6), 0.5 * np.eye(6))
        del old.__dict__["_measured"]
        np.testing.assert_allclose(old.T.solve(V), gen.T.solve(V), rtol=0, atol=0)
