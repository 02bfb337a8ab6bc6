"""Losses of kronlin.train against finite differences, dense Hessians and Monte Carlo.

Tolerances (float64): central differences with step 1e-5 agree to 1e-7
relative; the Hessian factor, Hessian-vector product and the one-hot/int
label paths agree to 1e-12.  Sample statistics use 40,000 draws at a fixed
seed and allow 5 standard errors.
"""

from __future__ import annotations

import numpy as np
import pytest

from kronlin.train.losses import LOSSES, SigmoidBinaryCrossEntropy, SoftmaxCrossEntropy, SquaredError, get_loss

N, K = 5, 4


def _targets(name, rng, out):
    if name == "softmax_ce":
        return rng.integers(0, out.shape[1], size=out.shape[0])
    if name == "sigmoid_bce":
        return rng.random(out.shape)
    return rng.standard_normal(out.shape)


@pytest.fixture(params=sorted(LOSSES))
def loss_name(request):
    return request.param


def test_get_loss(loss_name):
    loss = get_loss(loss_name)
    assert loss.name == loss_name
    with pytest.raises(ValueError, match="unknown loss"):
        get_loss("hinge")


def test_grad_matches_finite_differences(loss_name):
    rng = np.random.default_rng(0)
    loss = get_loss(loss_name)
    out = 2 * rng.standard_normal((N, K))
    Y = _targets(loss_name, rng, out)
    G = loss.grad(out, Y)
    h = 1e-5
    fd = np.zeros_like(out)
    for n in range(N):
        for k in range(K):
            E = np.zeros_like(out)
            E[n, k] = h
            # value is the mean over examples: the per-example derivative is N times that of the mean
            fd[n, k] = N * (loss.value(out + E, Y) - loss.value(out - E, Y)) / (2 * h)
    assert np.max(np.abs(G - fd)) <= 1e-7 * max(1.0, np.max(np.abs(G)))


def test_hessian_matches_finite_differences_of_grad(loss_name):
    rng = np.random.default_rng(1)
    loss = get_loss(loss_name)
    out = 2 * rng.standard_normal((N, K))
    Y = _targets(loss_name, rng, out)
    H = loss.hessian(out)
    assert H.shape == (N, K, K)
    h = 1e-5
    for k in range(K):
        E = np.zeros_like(out)
        E[:, k] = h
        col = (loss.grad(out + E, Y) - loss.grad(out - E, Y)) / (2 * h)
        assert np.max(np.abs(H[:, :, k] - col)) <= 1e-8
    np.testing.assert_allclose(H, np.swapaxes(H, 1, 2), atol=1e-15)


def test_hessian_factor_and_hvp(loss_name):
    rng = np.random.default_rng(2)
    loss = get_loss(loss_name)
    out = 3 * rng.standard_normal((N, K))
    H = loss.hessian(out)
    C = loss.hessian_factor(out)
    assert C.shape[:2] == (N, K)
    np.testing.assert_allclose(C @ np.swapaxes(C, 1, 2), H, atol=1e-12, rtol=0)
    V = rng.standard_normal((N, K))
    np.testing.assert_allclose(loss.hvp(out, V), np.einsum("nij,nj->ni", H, V), atol=1e-12, rtol=0)
    # the Hessian is PSD (canonical link): eigenvalues >= -eps
    assert np.min(np.linalg.eigvalsh(H)) >= -1e-14


def test_softmax_factor_is_square_and_closed_form():
    rng = np.random.default_rng(3)
    out = rng.standard_normal((N, K))
    p = np.exp(out) / np.exp(out).sum(axis=1, keepdims=True)
    C = SoftmaxCrossEntropy().hessian_factor(out)
    ref = np.stack([np.diag(np.sqrt(q)) - np.outer(q, np.sqrt(q)) for q in p])
    np.testing.assert_allclose(C, ref, atol=1e-15)
    s = SigmoidBinaryCrossEntropy().hessian_factor(out)
    sig = 1 / (1 + np.exp(-out))
    np.testing.assert_allclose(s, np.stack([np.diag(np.sqrt(q * (1 - q))) for q in sig]), atol=1e-15)
    np.testing.assert_array_equal(SquaredError().hessian_factor(out), np.broadcast_to(np.eye(K), (N, K, K)))


def test_softmax_int_labels_equal_one_hot():
    rng = np.random.default_rng(4)
    out = rng.standard_normal((N, K))
    y = rng.integers(0, K, size=N)
    T = np.eye(K)[y]
    loss = SoftmaxCrossEntropy()
    assert abs(loss.value(out, y) - loss.value(out, T)) <= 1e-14
    np.testing.assert_allclose(loss.grad(out, y), loss.grad(out, T), atol=1e-15)
    ref = -np.mean(np.log(np.exp(out[np.arange(N), y]) / np.exp(out).sum(axis=1)))
    assert abs(loss.value(out, y) - ref) <= 1e-13
    with pytest.raises(ValueError, match="class labels"):
        loss.value(out, np.full(N, K))


def test_values_closed_form_and_stable():
    out = np.array([[800.0, -800.0], [0.0, 1.0]])
    Y = np.array([[1.0, 0.0], [0.5, 0.25]])
    bce = SigmoidBinaryCrossEntropy().value(out, Y)
    s = 1 / (1 + np.exp(-out[1]))
    ref1 = -np.sum(Y[1] * np.log(s) + (1 - Y[1]) * np.log(1 - s))
    assert np.isfinite(bce) and abs(bce - (0.0 + ref1) / 2) <= 1e-12
    ce = SoftmaxCrossEntropy().value(np.array([[1000.0, 0.0]]), np.array([1]))
    assert abs(ce - 1000.0) <= 1e-9
    assert SquaredError().value(np.array([[1.0, 2.0]]), np.array([[0.0, 0.0]])) == 2.5


def test_sample_statistics_softmax():
    rng = np.random.default_rng(5)
    logits = np.array([0.3, -1.0, 1.2, 0.0])
    p = np.exp(logits) / np.exp(logits).sum()
    M = 40_000
    loss = SoftmaxCrossEntropy()
    y = loss.sample(np.tile(logits, (M, 1)), rng)
    assert y.shape == (M,) and y.dtype.kind == "i" and y.min() >= 0 and y.max() < 4
    freq = np.bincount(y, minlength=4) / M
    assert np.all(np.abs(freq - p) <= 5 * np.sqrt(p * (1 - p) / M))
    # E[grad grad^T] over sampled targets is the Fisher = the Hessian (K-FAC §5)
    out = np.tile(logits, (M, 1))
    g = loss.grad(out, y)
    F = g.T @ g / M
    np.testing.assert_allclose(F, loss.hessian(logits[None])[0], atol=0.01)


def test_sample_statistics_bernoulli_and_gaussian():
    rng = np.random.default_rng(6)
    M = 40_000
    logits = np.array([-2.0, 0.0, 1.5])
    p = 1 / (1 + np.exp(-logits))
    y = SigmoidBinaryCrossEntropy().sample(np.tile(logits, (M, 1)), rng)
    assert set(np.unique(y)) <= {0.0, 1.0}
    assert np.all(np.abs(y.mean(axis=0) - p) <= 5 * np.sqrt(p * (1 - p) / M))
    mean = np.array([1.0, -2.0, 0.5])
    z = SquaredError().sample(np.tile(mean, (M, 1)), rng)
    assert np.all(np.abs(z.mean(axis=0) - mean) <= 5 / np.sqrt(M))
    np.testing.assert_allclose(np.cov(z.T), np.eye(3), atol=0.03)


def test_sample_is_deterministic_per_seed(loss_name):
    loss = get_loss(loss_name)
    out = np.random.default_rng(7).standard_normal((6, K))
    a = loss.sample(out, np.random.default_rng(11))
    b = loss.sample(out, np.random.default_rng(11))
    np.testing.assert_array_equal(a, b)
    loss.grad(out, a)  # the sampled format is accepted by grad


def test_shape_errors():
    with pytest.raises(ValueError, match="shape"):
        SquaredError().value(np.zeros((2, 3)), np.zeros((2, 4)))
    with pytest.raises(ValueError, match=r"\(N, k\)"):
        SigmoidBinaryCrossEntropy().hessian(np.zeros(3))
