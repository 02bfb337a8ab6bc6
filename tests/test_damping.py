"""pi_factor and factored_damping against their dense definitions (K-FAC §6.3)."""

from __future__ import annotations

import numpy as np
import pytest

from kronlin import factored_damping, pi_factor
from kronlin.testing import spd

from helpers import DTYPES, on, rel_err, to_np, tol

NORM_ORD = {"trace": "nuc", "fro": "fro", "spectral": 2}


def _dense_pi(A, G, norm):
    """π = sqrt(‖A ⊗ I_q‖ / ‖I_p ⊗ G‖) computed on the dense Kronecker products."""
    p, q = A.shape[0], G.shape[0]
    o = NORM_ORD[norm]
    return np.sqrt(np.linalg.norm(np.kron(A, np.eye(q)), o) / np.linalg.norm(np.kron(np.eye(p), G), o))


@pytest.mark.parametrize("norm", ["trace", "fro", "spectral"])
@pytest.mark.parametrize("p,q", [(1, 1), (1, 6), (5, 3), (7, 11)])
@pytest.mark.parametrize("dtype", DTYPES)
def test_pi_matches_dense_norms(xp, norm, p, q, dtype):
    rng = np.random.default_rng(p + q)
    A, G = 3.0 * spd(rng, p, 50.0), 0.2 * spd(rng, q, 20.0)
    got = pi_factor(*on(xp, A, G, dtype=dtype), norm=norm)
    assert isinstance(got, float)
    assert abs(got - _dense_pi(A, G, norm)) / _dense_pi(A, G, norm) < tol(dtype, 10)


def test_trace_pi_is_ratio_of_average_eigenvalues():
    rng = np.random.default_rng(1)
    A, G = spd(rng, 4, 10.0), spd(rng, 9, 10.0)
    assert abs(pi_factor(A, G) - np.sqrt((np.trace(A) / 4) / (np.trace(G) / 9))) < 1e-14


@pytest.mark.parametrize("norm", ["trace", "fro", "spectral"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_factored_damping_dense(xp, norm, dtype):
    rng = np.random.default_rng(2)
    A, G, gamma = spd(rng, 5, 10.0), 4.0 * spd(rng, 3, 10.0), 0.3
    pi = _dense_pi(A, G, norm)
    K = factored_damping(*on(xp, A, G, dtype=dtype), gamma, pi=norm)
    ref = np.kron(A + pi * gamma * np.eye(5), G + gamma / pi * np.eye(3))
    assert rel_err(K.to_dense(), ref) < tol(dtype, 10)
    # the residual identity of §6.3: K = A⊗G + γ²I + πγ I⊗G + (γ/π) A⊗I
    expanded = (np.kron(A, G) + gamma**2 * np.eye(15) + pi * gamma * np.kron(np.eye(5), G)
                + gamma / pi * np.kron(A, np.eye(3)))
    assert rel_err(K.to_dense(), expanded) < tol(dtype, 10)


def test_explicit_pi_and_zero_gamma():
    rng = np.random.default_rng(3)
    A, G = spd(rng, 3, 5.0), spd(rng, 2, 5.0)
    K = factored_damping(A, G, 0.5, pi=2.0)
    assert rel_err(K.to_dense(), np.kron(A + np.eye(3), G + 0.25 * np.eye(2))) < 1e-14
    assert rel_err(factored_damping(A, G, 0.0).to_dense(), np.kron(A, G)) < 1e-15


def test_batched_pi_and_damping():
    rng = np.random.default_rng(4)
    A, G = spd(rng, 4, 10.0, (3,)), spd(rng, 2, 10.0, (3,))
    pis = to_np(pi_factor(A, G))
    assert pis.shape == (3,)
    K = factored_damping(A, G, 0.1)
    for i in range(3):
        assert abs(pis[i] - pi_factor(A[i], G[i])) < 1e-14
        ref = np.kron(A[i] + pis[i] * 0.1 * np.eye(4), G[i] + 0.1 / pis[i] * np.eye(2))
        assert rel_err(to_np(K.to_dense())[i], ref) < 1e-14


@pytest.mark.parametrize("norm", ["trace", "fro", "spectral"])
def test_zero_or_negative_trace_is_an_error(norm):
    with pytest.raises(ValueError, match=r"^A \(shape \(3, 3\)\) has .* <= 0"):
        pi_factor(np.zeros((3, 3)), np.eye(2), norm=norm)
    with pytest.raises(ValueError, match=r"^G \(shape \(2, 2\)\)"):
        factored_damping(np.eye(3), np.zeros((2, 2)), 0.1, pi=norm)
    if norm == "trace":
        with pytest.raises(ValueError, match="G .* trace"):
            pi_factor(np.eye(3), -np.eye(2))


def test_bad_arguments():
    with pytest.raises(ValueError, match="norm must be one of"):
        pi_factor(np.eye(2), np.eye(2), norm="nuclear")
    with pytest.raises(ValueError, match="gamma must be finite and non-negative"):
        factored_damping(np.eye(2), np.eye(2), -1.0)
    with pytest.raises(ValueError, match="pi must be a finite positive number"):
        factored_damping(np.eye(2), np.eye(2), 0.1, pi=0.0)
    with pytest.raises(ValueError, match="A must be a square matrix"):
        pi_factor(np.ones((2, 3)), np.eye(2))
