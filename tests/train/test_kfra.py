"""KFRA and KFLR (Botev, Ritter & Barber 2017) against the dense Gauss-Newton matrices they approximate.

KFLR's factor is the exact batch pre-activation Gauss-Newton, and at N = 1
both KFLR's and KFRA's blocks are the exact Gauss-Newton blocks; KFRA's
recursion (appendix G, algorithm 1) equals its dense per-example definition;
the step is appendix B.1's factored inverse, re-scaled by B.2's exact
Gauss-Newton quadratic, with B.3's τ/γ adaptation.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from kronlin.train import Conv2D, Dense, Net, get_loss, im2col
from kronlin.train.optim import OPTIMIZERS
from kronlin.train.optim.kfac import levenberg_marquardt
from kronlin.train.optim.kfra import KFLR, KFRA, input_factors, kflr_factors, kfra_factors, mean_output_hessian

from train_helpers import checkpoint_and_resume, train_at_defaults

LOSSES = ("softmax_ce", "sigmoid_bce", "squared")


def mlp(seed=0):
    rng = np.random.default_rng(seed)
    return Net([Dense(4, 5, "tanh"), Dense(5, 4, "logistic"), Dense(4, 3, "linear")], rng, init="gaussian")


def convnet(seed=0):
    rng = np.random.default_rng(seed)
    return Net([Conv2D((1, 6, 6), 2, kernel=3, activation="tanh"), Conv2D((2, 4, 4), 3, kernel=2, stride=2,
                activation="relu"), Dense(12, 3, "linear")], rng, init="gaussian")  # fmt: skip


def inputs(net, n, seed=1):
    return np.random.default_rng(seed).standard_normal((n, net.in_size))


def targets(loss, n, seed=2):
    rng = np.random.default_rng(seed)
    if loss.name == "softmax_ce":
        return rng.integers(0, 3, n)
    return rng.random((n, 3)) if loss.name == "sigmoid_bce" else rng.standard_normal((n, 3))


def gn_block(net, loss, trace, i):
    """The exact Gauss-Newton block of layer ``i``, ``(1/N) Σ_n J_nᵀ H_n J_n``, from ``jvp`` on its unit vectors."""
    shape, cols = net.params[i].shape, []
    for e in np.eye(shape[0] * shape[1]):
        V = [np.zeros(W.shape) for W in net.params]
        V[i] = e.reshape(shape, order="F")
        cols.append(net.jvp(trace, V))
    J = np.stack(cols, axis=2)
    return np.einsum("nkp,nkl,nlq->pq", J, loss.hessian(trace.out), J) / trace.N


def pre_activation_gn(net, loss, trace, i):
    """Exact ``(1/N) Σ_n J_{s,n}ᵀ H_n J_{s,n}`` of a dense layer: ``J_s`` from ``jvp`` along its bias column."""
    cols = []
    for a in range(net.layers[i].d_out):
        V = [np.zeros(W.shape) for W in net.params]
        V[i][a, -1] = 1.0
        cols.append(net.jvp(trace, V))
    J = np.stack(cols, axis=2)
    return np.einsum("nka,nkl,nlb->ab", J, loss.hessian(trace.out), J) / trace.N


def conv_matrix(layer, W):
    """The explicit matrix ``K`` of a layer's linear map from its flat input to its flat pre-activation."""
    E = np.eye(layer.in_size)
    return layer.flatten_out(layer.inputs(E) @ W[:, :-1].T).T


# ----------------------------------------------------------------- curvature
def test_registered():
    assert OPTIMIZERS["kfra"] is KFRA and OPTIMIZERS["kflr"] is KFLR
    opt = KFRA(mlp(), get_loss("softmax_ce"))
    assert opt.omega1 == pytest.approx(0.95**5) and opt.omega2 == pytest.approx(0.95**20)  # B.3
    assert opt.gamma == opt.hparams["lam"]


@pytest.mark.parametrize("loss_name", LOSSES)
def test_blocks_at_batch_size_one_are_exact_gauss_newton(loss_name):
    net, loss = mlp(), get_loss(loss_name)
    tr = net.forward(inputs(net, 1))
    Q = input_factors(tr)
    for G_list in (kflr_factors(net, loss, tr), kfra_factors(net, loss, tr)):
        for i in range(net.n_layers):
            np.testing.assert_allclose(np.kron(Q[i], G_list[i]), gn_block(net, loss, tr, i), rtol=1e-10, atol=1e-13)


@pytest.mark.parametrize("loss_name", LOSSES)
def test_kflr_is_exact_batch_pre_activation_gauss_newton(loss_name):
    net, loss = mlp(), get_loss(loss_name)
    tr = net.forward(inputs(net, 9))
    for i, G in enumerate(kflr_factors(net, loss, tr)):
        np.testing.assert_allclose(G, pre_activation_gn(net, loss, tr, i), rtol=1e-10, atol=1e-14)


def test_kflr_convolution_factor():
    """``G̃ = (1/(N·T)) Σ_n Σ_t J_tᵀ H_n J_t`` with ``J_t`` from one-hot backward passes and explicit ``H_n``."""
    net, loss = convnet(), get_loss("softmax_ce")
    tr = net.forward(inputs(net, 4))
    k = tr.out.shape[1]
    J = [np.stack([net.backward(tr, np.tile(e, (4, 1)))[i] for e in np.eye(k)], axis=-2) for i in range(3)]
    H = loss.hessian(tr.out)
    for i, G in enumerate(kflr_factors(net, loss, tr)):
        Ji = J[i] if J[i].ndim == 4 else J[i][:, None]  # (N, T, k, d)
        want = np.einsum("ntka,nkl,ntlb->ab", Ji, H, Ji) / (Ji.shape[0] * Ji.shape[1])
        np.testing.assert_allclose(G, want, rtol=1e-10, atol=1e-14)


def test_kfra_recursion_equals_dense_definition():
    """``G̃_{λ-1} = (1/N) Σ_n B_n W̄ᵀ G̃_λ W̄ B_n`` from ``G̃_L = E[H_L]`` (Botev appendix G)."""
    net, loss = mlp(), get_loss("softmax_ce")
    tr = net.forward(inputs(net, 7))
    G = np.mean(loss.hessian(tr.out), axis=0)
    np.testing.assert_allclose(mean_output_hessian(loss, tr.out), G, rtol=1e-14)
    got = kfra_factors(net, loss, tr)
    np.testing.assert_allclose(got[2], G, rtol=1e-14)
    for i in (2, 1):
        W = net.params[i][:, :-1]
        G = np.mean([np.diag(b) @ W.T @ G @ W @ np.diag(b) for b in tr.dphi[i - 1]], axis=0)
        np.testing.assert_allclose(got[i - 1], G, rtol=1e-12, atol=1e-16)
    # KFRA averages before propagating: at N > 1 it differs from the exact KFLR factor
    assert not np.allclose(got[0], kflr_factors(net, loss, tr)[0], rtol=1e-3)


def test_kfra_through_convolutions():
    """The recursion through transposed convolutions equals explicit conv matrices, and KFLR at N = 1."""
    net, loss = convnet(), get_loss("sigmoid_bce")
    tr = net.forward(inputs(net, 5))
    got = kfra_factors(net, loss, tr)
    G = np.mean(loss.hessian(tr.out), axis=0)
    for i in (2, 1):
        K = conv_matrix(net.layers[i], net.params[i])
        B = net.layers[i - 1].flatten_out(tr.dphi[i - 1])
        G = np.mean([np.diag(b) @ K.T @ G @ K @ np.diag(b) for b in B], axis=0)
        L = net.layers[i - 1]
        want = np.einsum("atbt->ab", G.reshape(L.d_out, L.T, L.d_out, L.T)) / L.T  # (1/T) Σ_t G_tt
        np.testing.assert_allclose(got[i - 1], want, rtol=1e-10, atol=1e-15)
    tr1 = net.forward(inputs(net, 1))
    for a, b in zip(kfra_factors(net, loss, tr1), kflr_factors(net, loss, tr1)):
        np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-15)
    Q = input_factors(tr)
    P = im2col(inputs(net, 5).reshape(5, 1, 6, 6), 3)
    P = np.concatenate([P, np.ones(P.shape[:2] + (1,))], axis=2)
    np.testing.assert_allclose(Q[0], np.einsum("nti,ntj->ij", P, P) / 5, rtol=1e-12)  # Σ_t, averaged over N


# --------------------------------------------------------------------- step
@pytest.mark.parametrize("name", ["kfra", "kflr"])
def test_step_is_botev_appendix_b(name):
    net, loss = mlp(), get_loss("sigmoid_bce")
    X, Y = inputs(net, 12), targets(loss, 12)
    eta = 1e-3
    opt = OPTIMIZERS[name](net, loss, eta=eta, lam=0.3, gamma=0.05)
    theta = net.copy_params()
    info = opt.step(X, Y)
    _, grads, tr = net.loss_and_grads(X, Y, loss, theta)
    grads = [G + eta * W for G, W in zip(grads, theta)]
    Q = input_factors(tr)
    G = (kfra_factors if name == "kfra" else kflr_factors)(net, loss, tr)
    k = 0.05 + eta  # C̃ = G̃ + (γ + η)I, approximated by factored damping with √k (B.1, eq. 36-38)
    steps = []
    for Qi, Gi, gi in zip(Q, G, grads):
        p, q = Qi.shape[0], Gi.shape[0]
        w = math.sqrt((np.trace(Qi) / p) / (np.trace(Gi) / q))
        M = np.kron(Qi + w * math.sqrt(k) * np.eye(p), Gi + math.sqrt(k) / w * np.eye(q))
        steps.append(-np.linalg.solve(M, gi.reshape(-1, order="F")))
    d, g = np.concatenate(steps), net.flatten(grads)
    np.testing.assert_allclose(net.flatten(opt.precondition(grads)), d, rtol=1e-9)
    # B.2: α* = −δ̃ᵀ∇f / (δ̃ᵀ Ḡ δ̃ + (τ + η)‖δ̃‖²), with the full batch Gauss-Newton Ḡ
    J = np.stack([net.jvp(tr, net.unflatten(e)) for e in np.eye(net.n_params)], axis=2)
    Gbar = np.einsum("nkp,nkl,nlq->pq", J, loss.hessian(tr.out), J) / 12
    alpha = -(g @ d) / (d @ Gbar @ d + (0.3 + eta) * d @ d)
    assert info["alpha"] == pytest.approx(alpha, rel=1e-9) and info["mu"] == 0.0
    np.testing.assert_allclose(net.flatten(net.params), net.flatten(theta) + alpha * d, rtol=1e-10, atol=1e-14)


def test_exact_damping_and_dropped_second_factor():
    net, loss = mlp(), get_loss("softmax_ce")
    X, Y = inputs(net, 10), targets(loss, 10)
    V = [np.random.default_rng(3).standard_normal(W.shape) for W in net.params]
    opt = KFRA(net, loss, damping="exact", gamma=0.2)
    opt.step(X, Y)
    f = opt.factors
    for U, Vi, A, G in zip(opt.precondition(V), V, f["A_diag"], f["G_diag"]):
        M = np.kron(A, G) + (opt.gamma + opt.hparams["eta"]) * np.eye(A.shape[0] * G.shape[0])  # Botev eq. 35
        np.testing.assert_allclose(U.reshape(-1, order="F"), -np.linalg.solve(M, Vi.reshape(-1, order="F")), rtol=1e-9)
    opt = KFLR(mlp(), loss, second_factor=False)  # Benzing D.8: (Q̃ + πs I)⁻¹ ⊗ I, π from the real G̃
    opt.step(X, Y)
    s = opt._strength(opt.gamma)
    for U, Vi, A, G in zip(opt.precondition(V), V, opt.factors["A_diag"], opt.factors["G_diag"]):
        assert not np.array_equal(G, np.eye(G.shape[0]))  # the real G̃ is computed (for π)
        p, q = A.shape[0], G.shape[0]
        pi = np.sqrt((np.trace(A) / p) / (np.trace(G) / q))
        M = np.kron(A + pi * s * np.eye(p), np.eye(q))
        np.testing.assert_allclose(U.reshape(-1, order="F"), -np.linalg.solve(M, Vi.reshape(-1, order="F")),
                                   rtol=1e-9)  # fmt: skip


def test_tau_and_gamma_adaptation():
    net, loss = mlp(), get_loss("softmax_ce")
    opt = KFRA(net, loss, T1=2, T2=3, T3=3)
    lam, rng = opt.lam, np.random.default_rng(0)
    for k in range(1, 10):
        gamma = opt.gamma
        info = opt.step(rng.standard_normal((12, 4)), rng.integers(0, 3, 12))
        assert info["lambda"] == pytest.approx(levenberg_marquardt(lam, info["rho"], 0.95**2) if k % 2 == 0 else lam)
        w = 0.95**3
        allowed = [gamma, w * gamma, gamma / w] if k % 3 == 0 else [gamma]
        assert min(abs(opt.gamma - a) for a in allowed) <= 1e-15 * gamma
        lam = info["lambda"]


def test_refresh_period_reuses_the_inverse():
    net, loss = mlp(), get_loss("softmax_ce")
    opt = KFLR(net, loss, T3=4, T2=4)
    calls = []
    orig = opt._factors
    opt._factors = lambda tr: (calls.append(1), orig(tr))[1]
    rng = np.random.default_rng(0)
    flags = [opt.step(rng.standard_normal((6, 4)), rng.integers(0, 3, 6))["refreshed"] for _ in range(9)]
    assert flags == [True, True, True, True, False, False, False, True, False] and len(calls) == 5


# ------------------------------------------------------------- robustness
@pytest.mark.parametrize("name", ["kfra", "kflr"])
def test_nonfinite_steps_are_rejected(name):
    net, loss = mlp(), get_loss("squared")
    X, Y = inputs(net, 8), targets(loss, 8)
    opt = OPTIMIZERS[name](net, loss)
    opt.step(X, Y)
    before, lam, gamma = net.copy_params(), opt.lam, opt.gamma
    opt._quadratic = lambda *a: (np.array([1e300, 0.0]), -1.0)
    info = opt.step(X, Y)
    assert not info["accepted"] and opt.lam == pytest.approx(lam / opt.omega1)
    assert opt.gamma == pytest.approx(gamma / opt.omega2)
    del opt._quadratic
    Xbad = X.copy()
    Xbad[0, 0] = np.inf
    assert not opt.step(Xbad, Y)["accepted"] and opt.n_rejected == 2
    for a, b in zip(net.params, before):
        np.testing.assert_array_equal(a, b)
    assert opt.step(X, Y)["accepted"]


@pytest.mark.parametrize("name,make", [("kfra", mlp), ("kflr", mlp), ("kfra", convnet), ("kflr", convnet)])
def test_state_dict_round_trip_is_bit_exact(name, make):
    hp = {"T1": 2, "T2": 4, "T3": 2, "momentum": True}
    loss = get_loss("softmax_ce")
    ref, got, net, net2, _, _ = checkpoint_and_resume(lambda n: OPTIMIZERS[name](n, loss, **hp), make, 11, 5)
    assert [r["loss"] for r in got] == [r["loss"] for r in ref]
    for a, b in zip(net2.params, net.params):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("name", ["kfra", "kflr"])
@pytest.mark.parametrize("task", ["digits-clf", "digits-ae", "digits-conv"])
def test_trains_at_defaults(tasks, name, task):
    T = tasks[task]
    before, after, opt, losses = train_at_defaults(T, name, steps=30, batch=128)  # about 0.04 (classifiers) and 0.4 (autoencoder) of before
    assert all(np.isfinite(losses))
    assert opt.n_rejected == 0 and after < (0.6 if task == "digits-ae" else 0.2) * before, (before, after)
