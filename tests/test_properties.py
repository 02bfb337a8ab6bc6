"""Hypothesis properties: transpose rules, inverse of inverse, solve∘matmul = id, method agreement."""

from __future__ import annotations

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kronlin import Kron
from kronlin.testing import spd

from helpers import rel_err

SETTINGS = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@st.composite
def problems(draw, symmetric=True):
    p = draw(st.integers(1, 9))
    q = draw(st.integers(1, 9))
    batch = draw(st.sampled_from([(), (2,), (1, 3)]))
    seed = draw(st.integers(0, 2**32 - 1))
    logcond = draw(st.floats(0.0, 3.0))
    rng = np.random.default_rng(seed)
    if symmetric:
        A, G = spd(rng, p, 10**logcond), spd(rng, q, 10**logcond)
    else:
        A = rng.standard_normal((p, p)) + 3 * np.sqrt(p) * np.eye(p)
        G = rng.standard_normal((q, q)) + 3 * np.sqrt(q) * np.eye(q)
    X = rng.standard_normal(batch + (q, p))
    Y = rng.standard_normal(batch + (q, p))
    return A, G, X, Y, 10**logcond


@SETTINGS
@given(problems(symmetric=False))
def test_transpose_rule(prob):
    """⟨Y, K X⟩ = ⟨Kᵀ Y, X⟩ and (Aᵀ ⊗ Gᵀ) = (A ⊗ G)ᵀ."""
    A, G, X, Y, _ = prob
    K = Kron(A, G)
    lhs = np.sum(Y * (K @ X), axis=(-2, -1))
    rhs = np.sum((K.T @ Y) * X, axis=(-2, -1))
    assert rel_err(lhs, rhs) < 1e-11
    assert rel_err(K.T.to_dense(), K.to_dense().T) == 0.0


@SETTINGS
@given(problems(symmetric=False))
def test_solve_inverts_matmul(prob):
    A, G, X, _, _ = prob
    K = Kron(A, G)
    assert rel_err(K.solve(K @ X), X) < 1e-10
    assert rel_err(K @ K.solve(X), X) < 1e-10


@SETTINGS
@given(problems())
def test_inverse_of_inverse(prob):
    A, G, X, _, cond = prob
    K = Kron(A, G)
    assert rel_err(K.inv().inv() @ X, K @ X) < 1e-14 * cond**2 * 100


@SETTINGS
@given(problems(), st.floats(0.0, 10.0))
def test_eigh_solve_agrees_with_cholesky_solve(prob, damping):
    A, G, X, _, cond = prob
    K = Kron(A, G)
    E = K.eigh()
    assert rel_err(E.solve(X, 0.0), K.solve(X)) < 1e-14 * cond**2 * 100
    # the damped solve inverts the damped operator
    U = E.solve(X, damping)
    assert rel_err(K @ U + damping * U, X) < 1e-12 * cond * 100


@SETTINGS
@given(problems(), st.floats(0.01, 2.0))
def test_inverse_root_squared_is_inverse(prob, damping):
    A, G, X, _, _ = prob
    E = Kron(A, G).eigh()
    Z = E.power(E.power(X, -0.5, damping), -0.5, damping)
    assert rel_err(Z, E.solve(X, damping)) < 1e-12
