"""Every validation rule raises before work, naming the argument, its shape and the fix."""

from __future__ import annotations

import numpy as np
import pytest

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
