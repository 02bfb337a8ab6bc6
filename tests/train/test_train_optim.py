"""The optimizer interface, SGD with Nesterov momentum, Adam and non-finite step rejection."""

from __future__ import annotations

import numpy as np
import pytest

from kronlin.train import Dense, Net, get_loss, load_task
from kronlin.train.optim import OPTIMIZERS, SGD, Adam, Optimizer, get_optimizer, register

from train_helpers import train_at_defaults


@pytest.fixture(scope="module")
def digits():
    return load_task("digits-clf", 0)


def _full_loss(task, net):
    return net.loss(task.X_train, task.Y_train, task.loss)


@pytest.mark.parametrize("name", ["sgd", "adam"])
def test_decreases_loss_on_digits_clf(digits, name):
    net = digits.net_factory(np.random.default_rng(0))
    opt = OPTIMIZERS[name](net, digits.loss, seed=0)
    before = _full_loss(digits, net)
    rng = np.random.default_rng(1)
    for _ in range(150):
        info = opt.step(*digits.sample_batch(128, rng))
        assert info["accepted"] and np.isfinite(info["loss"])
    after = _full_loss(digits, net)
    assert after < 0.25 * before, (before, after)
    assert opt.iteration == 150 and opt.n_rejected == 0


def test_step_reports_loss_at_new_parameters(digits):
    net = digits.net_factory(np.random.default_rng(0))
    opt = SGD(net, digits.loss)
    X, Y = digits.sample_batch(64, np.random.default_rng(2))
    before = net.loss(X, Y, digits.loss)
    info = opt.step(X, Y)
    assert info["loss_before"] == before
    assert info["loss"] == net.loss(X, Y, digits.loss)
    assert info["loss"] < before


def test_nesterov_update_by_hand():
    rng = np.random.default_rng(3)
    net = Net([Dense(4, 3, "tanh"), Dense(3, 2, "linear")], rng, init="gaussian")
    loss = get_loss("squared")
    X, Y = rng.standard_normal((8, 4)), rng.standard_normal((8, 2))
    opt = SGD(net, loss, lr=0.1, momentum=0.5)
    W, v = net.copy_params(), [np.zeros_like(w) for w in net.params]
    for _ in range(3):
        _, g, _ = net.loss_and_grads(X, Y, loss, W)
        v = [0.5 * a + b for a, b in zip(v, g)]
        W = [w - 0.1 * (b + 0.5 * a) for w, a, b in zip(W, v, g)]
        opt.step(X, Y)
    for a, b in zip(net.params, W):
        np.testing.assert_allclose(a, b, rtol=1e-14, atol=1e-15)


def test_adam_update_by_hand():
    rng = np.random.default_rng(4)
    net = Net([Dense(4, 3, "tanh"), Dense(3, 2, "linear")], rng, init="gaussian")
    loss = get_loss("squared")
    X, Y = rng.standard_normal((8, 4)), rng.standard_normal((8, 2))
    opt = Adam(net, loss, lr=0.01)
    W = net.copy_params()
    m = [np.zeros_like(w) for w in W]
    s = [np.zeros_like(w) for w in W]
    for t in range(1, 4):
        _, g, _ = net.loss_and_grads(X, Y, loss, W)
        m = [0.9 * a + 0.1 * b for a, b in zip(m, g)]
        s = [0.999 * a + 0.001 * b * b for a, b in zip(s, g)]
        W = [w - 0.01 * (a / (1 - 0.9**t)) / (np.sqrt(c / (1 - 0.999**t)) + 1e-8) for w, a, c in zip(W, m, s)]
        opt.step(X, Y)
    for a, b in zip(net.params, W):
        np.testing.assert_allclose(a, b, rtol=1e-13, atol=1e-15)


@pytest.mark.parametrize("name", ["sgd", "adam"])
def test_state_dict_resume_is_bit_exact(digits, name):
    def make():
        net = digits.net_factory(np.random.default_rng(0))
        return net, OPTIMIZERS[name](net, digits.loss, seed=5)

    net_a, opt_a = make()
    rng = np.random.default_rng(6)
    batches = [digits.sample_batch(64, rng) for _ in range(20)]
    for X, Y in batches[:10]:
        opt_a.step(X, Y)
    state, params = opt_a.state_dict(), net_a.copy_params()
    assert "rng" in state and state["iteration"] == 10
    net_b, opt_b = make()
    net_b.set_params(params)
    opt_b.load_state_dict(state)
    assert opt_b.rng.bit_generator.state == opt_a.rng.bit_generator.state
    for X, Y in batches[10:]:
        la, lb = opt_a.step(X, Y)["loss"], opt_b.step(X, Y)["loss"]
        assert la == lb
    for a, b in zip(net_a.params, net_b.params):
        np.testing.assert_array_equal(a, b)
    # the state is a snapshot: stepping does not change a state taken earlier
    assert state["iteration"] == 10
    with pytest.raises(ValueError, match="optimizer"):
        OPTIMIZERS["adam" if name == "sgd" else "sgd"](net_b, digits.loss).load_state_dict(state)


def test_hparams_and_unknown_keys(digits):
    net = digits.net_factory(np.random.default_rng(0))
    opt = SGD(net, digits.loss, lr=0.3)
    assert opt.hparams["lr"] == 0.3 and opt.hparams["momentum"] == SGD.defaults["momentum"]
    assert SGD.name == "sgd" and Adam.name == "adam"
    with pytest.raises(ValueError, match="unknown hyper-parameter"):
        SGD(net, digits.loss, damping=1.0)


def test_registry():
    assert OPTIMIZERS["sgd"] is SGD and OPTIMIZERS["adam"] is Adam
    assert get_optimizer("sgd") is SGD
    with pytest.raises(ValueError, match="unknown optimizer"):
        get_optimizer("lbfgs")
    with pytest.raises(TypeError):
        register("bad", object)

    class Mine(SGD):
        name = "mine"

    try:
        register("mine", Mine)
        assert get_optimizer("mine") is Mine
    finally:
        OPTIMIZERS.pop("mine", None)


# ----------------------------------------------------------------- rejection
def _linear_problem(seed=7):
    rng = np.random.default_rng(seed)
    net = Net([Dense(6, 5, "linear"), Dense(5, 3, "linear")], rng, init="gaussian")
    X, Y = rng.standard_normal((16, 6)), rng.standard_normal((16, 3))
    return net, get_loss("squared"), X, Y


@pytest.mark.parametrize("name", ["sgd", "adam"])
def test_nonfinite_step_is_rejected(name):
    net, loss, X, Y = _linear_problem()
    # a step so large that the squared error overflows to inf
    lr = 1e300 if name == "sgd" else 1e160
    opt = OPTIMIZERS[name](net, loss, lr=lr)
    before = net.copy_params()
    state = opt.state_dict()
    info = opt.step(X, Y)
    assert info["accepted"] is False
    assert info["loss"] == info["loss_before"] == net.loss(X, Y, loss)
    for a, b in zip(net.params, before):
        np.testing.assert_array_equal(a, b)
    after = opt.state_dict()
    assert after["n_rejected"] == 1 and after["extra"]["lr_scale"] == 0.5
    for key in ("velocity",) if name == "sgd" else ("m", "v"):
        for a, b in zip(after["extra"][key], state["extra"][key]):
            np.testing.assert_array_equal(a, b)
    if name == "adam":
        assert after["extra"]["t"] == 0
    # the step size keeps halving until steps are finite; the weights never see inf/nan
    for _ in range(600):
        opt.step(X, Y)
        assert all(np.all(np.isfinite(W)) for W in net.params)
        if opt.n_rejected and opt.state_dict()["extra"]["lr_scale"] < 1e-200:
            break
    assert np.isfinite(net.loss(X, Y, loss))


def test_accept_or_reject_and_apply_update():
    net, loss, X, Y = _linear_problem(8)
    opt = SGD(net, loss)
    before = net.copy_params()
    ok, value = opt.apply_update([np.full_like(W, np.inf) for W in net.params], X, Y)
    assert not ok and np.isnan(value) and opt.n_rejected == 1
    for a, b in zip(net.params, before):
        np.testing.assert_array_equal(a, b)
    small = [1e-3 * np.ones_like(W) for W in net.params]
    ok, value = opt.apply_update(small, X, Y)
    assert ok and value == net.loss(X, Y, loss)
    for a, b, d in zip(net.params, before, small):
        np.testing.assert_array_equal(a, b + d)
    # accept_or_reject on a step already written into the weights
    backup = net.copy_params()
    net.params = [W * 2 for W in net.params]
    assert opt.accept_or_reject(float("nan"), backup) is False
    for a, b in zip(net.params, backup):
        np.testing.assert_array_equal(a, b)
    assert opt.accept_or_reject(1.0, backup) is True
    assert opt.n_rejected == 2
    # return_trace: the forward pass at the new weights that gave the loss (None when rejected)
    ok, value, trace = opt.apply_update(small, X, Y, return_trace=True)
    assert ok and value == loss.value(trace.out, Y) == net.loss(X, Y, loss)
    np.testing.assert_array_equal(trace.out, net.forward(X).out)
    ok, value, trace = opt.apply_update([np.full_like(W, np.inf) for W in net.params], X, Y, return_trace=True)
    assert not ok and np.isnan(value) and trace is None


def test_base_class_is_abstract(digits):
    net = digits.net_factory(np.random.default_rng(0))
    with pytest.raises(NotImplementedError):
        Optimizer(net, digits.loss).step(digits.X_train[:2], digits.Y_train[:2])


@pytest.mark.parametrize("task_name", ["digits-clf", "digits-ae", "curves-ae", "digits-conv"])
@pytest.mark.parametrize("name", ["sgd", "adam"])
def test_trains_every_task_at_defaults(task_name, name):
    """Documented defaults, default batch 256: no rejected step, full-data loss clearly down after 40 steps."""
    T = load_task(task_name, 0, **({"n": 600} if task_name == "curves-ae" else {}))
    before, after, opt, losses = train_at_defaults(T, name, steps=40, batch=256)
    assert all(np.isfinite(losses))
    assert opt.n_rejected == 0 and after < 0.7 * before, (before, after)


def test_sgd_polyak_average_and_its_state(digits):
    """SGD's ``polyak=ξ`` (K-FAC §13's baseline) keeps θ̂ ← ξθ̂ + (1 − ξ)θ after each accepted step, never
    feeds it back (same trajectory as without), and a state_dict round trip carries it bit-exactly."""
    task = digits
    rng = np.random.default_rng(0)
    nets = [task.net_factory(np.random.default_rng(1)) for _ in range(3)]
    with_avg, plain = SGD(nets[0], task.loss, polyak=0.8), SGD(nets[1], task.loss)
    assert with_avg.averaged_params is None
    avg = None
    for _ in range(5):
        idx = rng.choice(task.n_train, 32, replace=False)
        X, Y = task.X_train[idx], task.Y_train[idx]
        assert with_avg.step(X, Y)["accepted"] and plain.step(X, Y)["accepted"]
        avg = [W.copy() for W in nets[0].params] if avg is None else [0.8 * a + (1 - 0.8) * w for a, w in zip(avg, nets[0].params)]
    for a, b, w, v in zip(with_avg.averaged_params, avg, nets[0].params, nets[1].params):
        np.testing.assert_allclose(a, b, rtol=1e-14)
        np.testing.assert_array_equal(w, v)
    again = SGD(nets[2], task.loss, polyak=0.8)
    again.load_state_dict(with_avg.state_dict())
    for a, b in zip(again.averaged_params, with_avg.averaged_params):
        np.testing.assert_array_equal(a, b)
