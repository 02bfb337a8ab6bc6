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


def checkpoint_and_resume(make_opt, make_net, n_batches, n_before, rng_seed=4):
    """Train on random batches, checkpoint after ``n_before``, resume elsewhere; both runs' later step records.

    ``make_opt(net)`` builds the optimizer.  The state goes through
    ``encode_tree``/``decode_tree`` (what a checkpoint stores); the resumed run
    gets a fresh network (other initial weights, then the saved ones) and a
    fresh optimizer.  Returns ``(ref, got, net, net2, opt, opt2)``: the records
    of the original and the resumed run on batches ``n_before:``.
    """
    from kronlin.train.checkpoint import decode_tree, encode_tree

    rng = np.random.default_rng(rng_seed)
    net = make_net()
    batches = [(rng.standard_normal((10, net.in_size)), rng.integers(0, 3, 10)) for _ in range(n_batches)]
    opt = make_opt(net)
    for X, Y in batches[:n_before]:
        opt.step(X, Y)
    text, arrays = encode_tree(opt.state_dict())
    state, params = decode_tree(text, arrays), net.copy_params()
    ref = [opt.step(X, Y) for X, Y in batches[n_before:]]
    net2 = make_net(seed=99)
    net2.set_params(params)
    opt2 = make_opt(net2)
    opt2.load_state_dict(state)
    got = [opt2.step(X, Y) for X, Y in batches[n_before:]]
    return ref, got, net, net2, opt, opt2


def train_at_defaults(T, name, steps=30, batch=128):
    """Optimizer ``name`` at its defaults on task ``T`` (initial weights and batches seeded).

    Returns ``(before, after, opt, losses)``: the full-training-set loss before
    and after ``steps`` iterations, the optimizer and each step's reported loss.
    """
    from kronlin.train.optim import OPTIMIZERS

    net = T.net_factory(np.random.default_rng(0))
    before = net.loss(T.X_train, T.Y_train, T.loss)
    opt = OPTIMIZERS[name](net, T.loss, seed=0)
    rng = np.random.default_rng(1)
    losses = [opt.step(*T.sample_batch(batch, rng))["loss"] for _ in range(steps)]
    return before, net.loss(T.X_train, T.Y_train, T.loss), opt, losses
