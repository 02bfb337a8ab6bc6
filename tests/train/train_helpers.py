"""Tiny networks, batches and dense Fisher references shared by the optimizer tests."""

from __future__ import annotations

import numpy as np

from kronlin.train import Conv2D, Dense, Net


def tiny_mlp(seed=0, acts=("tanh", "logistic")):
    rng = np.random.default_rng(seed)
    return Net([Dense(4, 5, acts[0]), Dense(5, 4, acts[1]), Dense(4, 3, "linear")], rng, init="gaussian")


def tiny_conv(seed=0):
    rng = np.random.default_rng(seed)
    return Net([Conv2D((1, 5, 5), 3, kernel=3, activation="tanh"), Dense(27, 3, "linear")], rng, init="gaussian")


def batch(net, n, seed=1, classes=3):
    rng = np.random.default_rng(seed)
    return rng.standard_normal((n, net.in_size)), rng.integers(0, classes, n)


def jacobians(net, trace):
    """Per-example ``J_n`` ``(N, k, P)`` from ``jvp`` on every unit vector (materialised)."""
    return np.stack([net.jvp(trace, net.unflatten(e)) for e in np.eye(net.n_params)], axis=2)


def dense_fisher(net, loss, trace):
    """``F = (1/N) Σ_n J_nᵀ H_n J_n`` from ``jvp`` on every unit vector (K-FAC §5 / appendix C)."""
    J = jacobians(net, trace)
    return np.einsum("nkp,nkl,nlq->pq", J, loss.hessian(trace.out), J) / trace.N
