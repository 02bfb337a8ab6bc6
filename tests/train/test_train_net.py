"""The kronlin.train network against finite differences and dense Jacobians.

References are built here from first principles: central finite differences
of the loss and of the network output (step 1e-6, agreement to 1e-6
relative — the truncation error is O(h²)·|third derivative| and the round-off
O(eps/h) ≈ 1e-10), the dense per-example Jacobian ``J`` ``(N, k, P)`` formed
column by column from ``jvp`` on unit vectors and checked against finite
differences and against the backward pass (``Σ_n J_nᵀ u_n``), and the dense
Gauss-Newton matrix ``(1/N) Σ_n J_nᵀ H_n J_n`` with ``H_n`` from
``loss.hessian``.  Exact-algebra identities agree to 1e-10 relative.
"""

from __future__ import annotations

import numpy as np
import pytest

from kronlin.train import ACTIVATIONS, Conv2D, Dense, Net, col2im, get_loss, im2col

LOSS_NAMES = ("softmax_ce", "sigmoid_bce", "squared")


def _targets(name, rng, N, k):
    if name == "softmax_ce":
        return rng.integers(0, k, size=N)
    if name == "sigmoid_bce":
        return rng.random((N, k))
    return rng.standard_normal((N, k))


def mlp_net(act, seed=0, widths=(5, 4, 3, 3)):
    layers = [Dense(widths[i], widths[i + 1], act if i < len(widths) - 2 else "linear") for i in range(len(widths) - 1)]
    net = Net(layers, np.random.default_rng(seed), init="gaussian", scale=1.5)
    rng = np.random.default_rng(seed + 100)
    for W in net.params:  # non-zero biases so the homogeneous column is exercised
        W[:, -1] = 0.3 * rng.standard_normal(W.shape[0])
    return net


def conv_net(act="tanh", seed=0):
    layers = [
        Conv2D((2, 6, 5), 3, kernel=(3, 2), stride=1, padding=1, activation=act),  # -> (3, 6, 6)
        Conv2D((3, 6, 6), 4, kernel=3, stride=2, padding=0, activation=act),  # -> (4, 2, 2)
        Dense(16, 5, act),
        Dense(5, 3, "linear"),
    ]
    net = Net(layers, np.random.default_rng(seed), init="gaussian", scale=1.2)
    rng = np.random.default_rng(seed + 100)
    for W in net.params:
        W[:, -1] = 0.3 * rng.standard_normal(W.shape[0])
    return net


def rel(a, b):
    return np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-300)


def fd_grad(net, X, Y, loss, h=1e-6):
    theta = net.flatten(net.params)
    g = np.zeros_like(theta)
    for p in range(theta.size):
        e = np.zeros_like(theta)
        e[p] = h
        fp = net.loss(X, Y, loss, net.unflatten(theta + e))
        fm = net.loss(X, Y, loss, net.unflatten(theta - e))
        g[p] = (fp - fm) / (2 * h)
    return g


def dense_jacobian(net, trace):
    P = net.n_params
    J = np.zeros(trace.out.shape + (P,))
    for p in range(P):
        e = np.zeros(P)
        e[p] = 1.0
        J[:, :, p] = net.jvp(trace, net.unflatten(e))
    return J


# ----------------------------------------------------------------- structure
def test_shapes_and_trace_layout():
    net = conv_net()
    assert net.shapes == [(3, 13), (4, 28), (5, 17), (3, 6)]
    assert net.n_params == sum(a * b for a, b in net.shapes)
    X = np.random.default_rng(0).random((7, 60))
    tr = net.forward(X)
    assert [a.shape for a in tr.a] == [(7, 36, 13), (7, 4, 28), (7, 17), (7, 6)]
    assert [s.shape for s in tr.s] == [(7, 36, 3), (7, 4, 4), (7, 5), (7, 3)]
    assert tr.out is tr.s[-1] and tr.out.shape == (7, 3)
    for a in tr.a:  # homogeneous coordinate last
        np.testing.assert_array_equal(a[..., -1], 1.0)
    # the image form (N, C, H, W) is accepted too
    np.testing.assert_array_equal(net.forward(X.reshape(7, 2, 6, 5)).out, tr.out)


def test_dense_forward_by_hand():
    net = mlp_net("tanh")
    X = np.random.default_rng(1).random((3, 5))
    W0, W1, W2 = net.params
    h1 = np.tanh(X @ W0[:, :-1].T + W0[:, -1])
    h2 = np.tanh(h1 @ W1[:, :-1].T + W1[:, -1])
    out = h2 @ W2[:, :-1].T + W2[:, -1]
    tr = net.forward(X)
    np.testing.assert_allclose(tr.out, out, rtol=1e-14, atol=1e-14)
    np.testing.assert_allclose(tr.a[1][:, :-1], h1, rtol=1e-14, atol=1e-14)


def test_layer_validation():
    rng = np.random.default_rng(0)
    with pytest.raises(ValueError, match="takes 5 inputs"):
        Net([Dense(3, 4), Dense(5, 2, "linear")], rng)
    with pytest.raises(ValueError, match="must be 'linear'"):
        Net([Dense(3, 4), Dense(4, 2, "tanh")], rng)
    with pytest.raises(ValueError, match="conv layers come first"):
        Net([Dense(3, 4), Conv2D((1, 2, 2), 1, kernel=1), Dense(4, 2, "linear")], rng)
    with pytest.raises(ValueError, match="unknown activation"):
        Dense(3, 4, "softplus")
    with pytest.raises(ValueError, match="does not fit"):
        Conv2D((1, 2, 2), 1, kernel=3)
    net = Net([Dense(3, 2, "linear")], rng)
    with pytest.raises(ValueError, match="features"):
        net.forward(np.zeros((2, 4)))


def test_initialisations():
    rng = np.random.default_rng(0)
    sparse = Net([Dense(40, 30), Dense(30, 6, "linear")], rng, init="sparse")
    W = sparse.params[0]
    assert np.all(np.count_nonzero(W[:, :-1], axis=1) == 15) and np.all(W[:, -1] == 0)
    assert np.all(np.count_nonzero(sparse.params[1][:, :-1], axis=1) == 15)
    small = Net([Dense(4, 3, "linear")], rng, init="sparse")
    assert np.all(np.count_nonzero(small.params[0][:, :-1], axis=1) == 4)
    gauss = Net([Dense(400, 300, "linear")], np.random.default_rng(1), init="gaussian", scale=2.0)
    assert abs(np.std(gauss.params[0][:, :-1]) - 2.0 / np.sqrt(400)) < 0.01 * 2.0 / np.sqrt(400) * 5
    a = Net([Dense(8, 5), Dense(5, 2, "linear")], np.random.default_rng(3))
    b = Net([Dense(8, 5), Dense(5, 2, "linear")], np.random.default_rng(3))
    for x, y in zip(a.params, b.params):
        np.testing.assert_array_equal(x, y)


def test_flatten_is_column_stacking():
    net = mlp_net("tanh")
    V = [np.arange(np.prod(s), dtype=float).reshape(s) for s in net.shapes]
    v = net.flatten(V)
    n0 = V[0].size
    np.testing.assert_array_equal(v[:n0], V[0].flatten("F"))
    back = net.unflatten(v)
    for x, y in zip(back, V):
        np.testing.assert_array_equal(x, y)


def test_copy_and_set_params():
    net = mlp_net("relu")
    c = net.copy_params()
    c[0][0, 0] += 1.0
    assert net.params[0][0, 0] != c[0][0, 0]
    net.set_params(c)
    c[0][0, 0] += 1.0
    assert net.params[0][0, 0] != c[0][0, 0]


# ------------------------------------------------------------------ gradients
@pytest.mark.parametrize("act", ACTIVATIONS)
@pytest.mark.parametrize("loss_name", LOSS_NAMES)
def test_gradient_matches_finite_differences(act, loss_name):
    rng = np.random.default_rng(10)
    net = mlp_net(act)
    loss = get_loss(loss_name)
    X = rng.standard_normal((6, 5))
    Y = _targets(loss_name, rng, 6, 3)
    value, grads, trace = net.loss_and_grads(X, Y, loss)
    assert value == net.loss(X, Y, loss)
    assert [G.shape for G in grads] == net.shapes
    assert rel(net.flatten(grads), fd_grad(net, X, Y, loss)) <= 1e-6
    assert trace.g is not None and [g.shape for g in trace.g] == [s.shape for s in trace.s]


@pytest.mark.parametrize("loss_name", LOSS_NAMES)
@pytest.mark.parametrize("act", ("tanh", "relu"))
def test_conv_gradient_matches_finite_differences(loss_name, act):
    rng = np.random.default_rng(11)
    net = conv_net(act)
    loss = get_loss(loss_name)
    X = rng.standard_normal((4, 60))
    Y = _targets(loss_name, rng, 4, 3)
    _, grads, _ = net.loss_and_grads(X, Y, loss)
    assert rel(net.flatten(grads), fd_grad(net, X, Y, loss)) <= 1e-6


def test_weight_grads_are_sums_of_outer_products():
    rng = np.random.default_rng(12)
    net = conv_net()
    X = rng.standard_normal((3, 60))
    tr = net.forward(X)
    g = net.backward(tr, rng.standard_normal((3, 3)))
    WG = net.weight_grads(tr, g)
    for a, gi, G in zip(tr.a, g, WG):
        if a.ndim == 3:
            ref = sum(np.outer(gi[n, t], a[n, t]) for n in range(a.shape[0]) for t in range(a.shape[1]))
        else:
            ref = sum(np.outer(gi[n], a[n]) for n in range(a.shape[0]))
        np.testing.assert_allclose(G, ref, rtol=1e-12, atol=1e-12)


def test_backward_with_sampled_targets():
    rng = np.random.default_rng(13)
    net = mlp_net("tanh")
    loss = get_loss("softmax_ce")
    X = rng.standard_normal((8, 5))
    tr = net.forward(X)
    y = loss.sample(tr.out, np.random.default_rng(1))
    g = net.backward(tr, loss.grad(tr.out, y))
    _, grads, _ = net.loss_and_grads(X, y, loss)
    for G, ref in zip(net.weight_grads(tr, g), grads):
        np.testing.assert_allclose(G / 8, ref, rtol=1e-13, atol=1e-15)
    for a, b in zip(net.backward_sampled(tr, loss, np.random.default_rng(1)), g):
        np.testing.assert_array_equal(a, b)


# ---------------------------------------------------------- Jacobian products
@pytest.mark.parametrize("make", [lambda: mlp_net("tanh"), lambda: mlp_net("logistic"), lambda: mlp_net("relu"),
                                  lambda: mlp_net("linear"), lambda: conv_net("tanh")],
                         ids=["tanh", "logistic", "relu", "linear", "conv"])  # fmt: skip
def test_jvp_against_finite_differences_and_backward(make):
    net = make()
    rng = np.random.default_rng(14)
    N = 4
    X = rng.standard_normal((N, net.in_size))
    tr = net.forward(X)
    V = [rng.standard_normal(s) for s in net.shapes]
    Jv = net.jvp(tr, V)
    h = 1e-6
    Pp = [W + h * D for W, D in zip(net.params, V)]
    Pm = [W - h * D for W, D in zip(net.params, V)]
    fd = (net.forward(X, Pp).out - net.forward(X, Pm).out) / (2 * h)
    assert rel(Jv, fd) <= 1e-6
    # dense J from jvp on unit vectors: J v and Σ_n J_nᵀ u_n (the backward pass)
    J = dense_jacobian(net, tr)
    np.testing.assert_allclose(np.einsum("nkp,p->nk", J, net.flatten(V)), Jv, rtol=1e-10, atol=1e-12)
    U = rng.standard_normal(tr.out.shape)
    JTu = net.flatten(net.weight_grads(tr, net.backward(tr, U)))
    assert rel(JTu, np.einsum("nkp,nk->p", J, U)) <= 1e-10
    # per-example rows: the backward pass with dout = e_k at example n only is J_nᵀ e_k
    n, k = 2, 1
    E = np.zeros_like(U)
    E[n, k] = 1.0
    assert rel(net.flatten(net.weight_grads(tr, net.backward(tr, E))), J[n, k]) <= 1e-10


@pytest.mark.parametrize("loss_name", LOSS_NAMES)
@pytest.mark.parametrize("kind", ["mlp", "conv"])
def test_gn_vp_and_quad_against_dense_gauss_newton(loss_name, kind):
    net = mlp_net("tanh") if kind == "mlp" else conv_net("tanh")
    loss = get_loss(loss_name)
    rng = np.random.default_rng(15)
    N = 5
    X = rng.standard_normal((N, net.in_size))
    tr = net.forward(X)
    J = dense_jacobian(net, tr)
    H = loss.hessian(tr.out)
    GN = np.einsum("nkp,nkl,nlq->pq", J, H, J) / N
    V = [rng.standard_normal(s) for s in net.shapes]
    W = [rng.standard_normal(s) for s in net.shapes]
    v, w = net.flatten(V), net.flatten(W)
    assert rel(net.flatten(net.gn_vp(tr, loss, V)), GN @ v) <= 1e-10
    assert abs(net.quad(tr, loss, V) - v @ GN @ v) <= 1e-10 * abs(v @ GN @ v)
    assert abs(net.quad(tr, loss, V, W) - v @ GN @ w) <= 1e-10 * np.sqrt(abs(v @ GN @ v) * abs(w @ GN @ w))
    # the Fisher with sampled targets: E[grad grad^T] = GN (Monte Carlo, loose)
    if loss_name == "softmax_ce" and kind == "mlp":
        M = 20_000
        Xr = np.repeat(X, M // N, axis=0)
        trr = net.forward(Xr)
        y = loss.sample(trr.out, np.random.default_rng(0))
        g = net.backward(trr, loss.grad(trr.out, y))
        # per-example gradients (J_nᵀ grad_n) dotted with v: their mean square is vᵀ F v
        Jv = net.jvp(trr, V)
        s = np.sum(Jv * loss.grad(trr.out, y), axis=1)
        assert abs(np.mean(s * s) - v @ GN @ v) <= 0.05 * (v @ GN @ v)
        assert len(g) == net.n_layers


def test_gn_is_hessian_for_linear_net_squared_loss():
    # a linear network with squared error: the loss is quadratic in the last layer alone
    rng = np.random.default_rng(16)
    net = Net([Dense(4, 3, "linear")], rng, init="gaussian")
    loss = get_loss("squared")
    X = rng.standard_normal((6, 4))
    tr = net.forward(X)
    V = [rng.standard_normal((3, 5))]
    Xb = np.hstack([X, np.ones((6, 1))])
    ref = V[0] @ (Xb.T @ Xb) / 6
    np.testing.assert_allclose(net.gn_vp(tr, loss, V)[0], ref, rtol=1e-12, atol=1e-12)


# ----------------------------------------------------------------- convolution
def direct_conv(x, W, kernel, stride, padding):
    """s[n, t, o] = bias[o] + Σ_{c,i,j} W[o, (c,i,j)] x_pad[n, c, r*sh+i, q*sw+j] by explicit loops."""
    (kh, kw), (sh, sw), (ph, pw) = kernel, stride, padding
    N, C, H, Wd = x.shape
    xp = np.pad(x, ((0, 0), (0, 0), (ph, ph), (pw, pw)))
    Ho, Wo = (H + 2 * ph - kh) // sh + 1, (Wd + 2 * pw - kw) // sw + 1
    O = W.shape[0]
    Wk = W[:, :-1].reshape(O, C, kh, kw)
    s = np.zeros((N, Ho * Wo, O))
    for n in range(N):
        for r in range(Ho):
            for q in range(Wo):
                for o in range(O):
                    acc = W[o, -1]
                    for c in range(C):
                        for i in range(kh):
                            for j in range(kw):
                                acc += Wk[o, c, i, j] * xp[n, c, r * sh + i, q * sw + j]
                    s[n, r * Wo + q, o] = acc
    return s


@pytest.mark.parametrize("kernel,stride,padding", [((3, 3), (1, 1), (0, 0)), ((3, 2), (2, 1), (1, 0)),
                                                   ((2, 2), (2, 2), (1, 1)), ((1, 1), (1, 1), (0, 0))])  # fmt: skip
def test_conv_matches_direct_loop(kernel, stride, padding):
    rng = np.random.default_rng(17)
    x = rng.standard_normal((2, 3, 7, 6))
    layer = Conv2D((3, 7, 6), 4, kernel=kernel, stride=stride, padding=padding, activation="linear")
    net = Net([layer, Dense(layer.out_size, 2, "linear")], rng, init="gaussian")
    net.params[0][:, -1] = rng.standard_normal(4)
    tr = net.forward(x)
    ref = direct_conv(x, net.params[0], kernel, stride, padding)
    np.testing.assert_allclose(tr.s[0], ref, rtol=1e-12, atol=1e-12)
    assert tr.a[0].shape == (2, layer.T, 3 * kernel[0] * kernel[1] + 1)
    # the dense layer after the conv sees the (C_out, H_out, W_out) C-order flattening
    Ho, Wo = layer.out_shape[1:]
    img = ref.reshape(2, Ho, Wo, 4).transpose(0, 3, 1, 2)
    np.testing.assert_allclose(tr.a[1][:, :-1], img.reshape(2, -1), rtol=1e-12, atol=1e-12)


def test_col2im_is_adjoint_of_im2col():
    rng = np.random.default_rng(18)
    x = rng.standard_normal((2, 3, 7, 6))
    for kernel, stride, padding in [((3, 3), 1, 0), ((3, 2), (2, 1), (1, 0)), ((2, 2), 2, 1)]:
        P = im2col(x, kernel, stride, padding)
        Q = rng.standard_normal(P.shape)
        lhs = np.sum(P * Q)
        rhs = np.sum(x * col2im(Q, (3, 7, 6), kernel, stride, padding))
        assert abs(lhs - rhs) <= 1e-12 * abs(lhs) + 1e-12


@pytest.mark.parametrize("kind", ["mlp", "conv"])
def test_backward_of_a_stack_equals_columnwise(kind):
    net = mlp_net("tanh") if kind == "mlp" else conv_net("relu")
    rng = np.random.default_rng(19)
    tr = net.forward(rng.standard_normal((4, net.in_size)))
    C = get_loss("softmax_ce").hessian_factor(tr.out)  # (N, k, r)
    stack = net.backward(tr, np.moveaxis(C, 2, 0))
    for j in range(C.shape[2]):
        single = net.backward(tr, C[:, :, j])
        for a, b in zip(stack, single):
            np.testing.assert_allclose(a[j], b, rtol=1e-14, atol=1e-15)
    with pytest.raises(ValueError, match="dout"):
        net.backward(tr, np.zeros((4, 2)))
