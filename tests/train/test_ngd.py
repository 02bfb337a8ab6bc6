"""Subsampled natural gradient (Benzing 2022, app. I) against dense ``(λI + F)⁻¹ g``."""

from __future__ import annotations

import numpy as np
import pytest

from kronlin.train import get_loss
from kronlin.train.cli import main as cli_main
from kronlin.train.optim import OPTIMIZERS
from kronlin.train.optim.kfac import levenberg_marquardt
from kronlin.train.optim.ngd import NGD

from train_helpers import batch, checkpoint_and_resume, dense_fisher as exact_fisher, jacobians, tiny_conv, tiny_mlp, train_at_defaults


def dense_fisher(net, loss, trace, labels, samples=1, rng_state=None):
    if labels == "full":
        return exact_fisher(net, loss, trace)
    J = jacobians(net, trace)
    rng = np.random.default_rng()
    rng.bit_generator.state = rng_state
    D = np.stack([loss.grad(trace.out, loss.sample(trace.out, rng)) for _ in range(samples)], axis=1)  # (N, S, k)
    Gc = np.einsum("nkp,nsk->nsp", J, D).reshape(-1, net.n_params)  # materialised per-example gradients
    return Gc.T @ Gc / (trace.N * samples)


def test_registered_and_validated():
    assert OPTIMIZERS["ngd"] is NGD
    net, loss = tiny_mlp(), get_loss("softmax_ce")
    for bad in ({"labels": "emp"}, {"samples": 0}, {"lam": 0.0}, {"T1": 0}, {"lr": -1.0}, {"nope": 1}):
        with pytest.raises(ValueError):
            NGD(net, loss, **bad)


@pytest.mark.parametrize("make", [tiny_mlp, tiny_conv])
@pytest.mark.parametrize("labels,samples,lossname", [
    ("mc", 1, "softmax_ce"), ("mc", 3, "softmax_ce"), ("full", 1, "softmax_ce"),
    ("full", 1, "sigmoid_bce"), ("mc", 2, "squared"),
])  # fmt: skip
def test_step_is_dense_damped_natural_gradient(make, labels, samples, lossname):
    net, loss = make(), get_loss(lossname)
    X, Y = batch(net, 6)
    if lossname != "softmax_ce":
        Y = np.random.default_rng(2).random((6, 3))
    lam, lr = 0.2, 0.7
    opt = NGD(net, loss, lam=lam, lr=lr, labels=labels, samples=samples, seed=3, reject_increase=False)  # the algebra
    state = opt.rng.bit_generator.state
    tr = net.forward(X)
    _, grads, _ = net.loss_and_grads(X, Y, loss)
    F = dense_fisher(net, loss, tr, labels, samples, state)
    g = net.flatten(grads)
    want = -lr * np.linalg.solve(lam * np.eye(net.n_params) + F, g)
    before = net.flatten(net.params)
    info = opt.step(X, Y)
    assert info["accepted"] and info["damping"] == lam
    np.testing.assert_allclose(net.flatten(net.params) - before, want, rtol=1e-8, atol=1e-12)
    assert info["model_decrease"] == pytest.approx(g @ want + 0.5 * want @ (F + lam * np.eye(len(g))) @ want, rel=1e-8)


@pytest.mark.parametrize("make", [tiny_mlp, tiny_conv])
def test_independent_batch_uses_the_other_halfs_gradient(make):
    net, loss = make(), get_loss("softmax_ce")
    X, Y = batch(net, 9)
    lam, lr = 0.3, 1.0
    # reject_increase=False: this checks the step's algebra, which the acceptance test would undo here
    opt = NGD(net, loss, lam=lam, lr=lr, labels="full", independent_batch=True, reject_increase=False)
    trf = net.forward(X[:5])  # the Fisher's half: the first ⌈N/2⌉
    _, g2, _ = net.loss_and_grads(X[5:], Y[5:], loss)  # the gradient's half
    F = dense_fisher(net, loss, trf, "full")
    want = -lr * np.linalg.solve(lam * np.eye(net.n_params) + F, net.flatten(g2))
    before = net.flatten(net.params)
    info = opt.step(X, Y)
    assert info["loss_before"] == pytest.approx(net.loss(X, Y, loss, params=net.unflatten(before)), rel=1e-12)
    np.testing.assert_allclose(net.flatten(net.params) - before, want, rtol=1e-8, atol=1e-12)
    # the same batch for both would give a different step
    net2 = make()
    NGD(net2, loss, lam=lam, lr=lr, labels="full", reject_increase=False).step(X, Y)
    assert not np.allclose(net.flatten(net2.params) - before, want, rtol=1e-3)


def test_levenberg_marquardt_every_T1_and_fixed():
    net, loss = tiny_mlp(), get_loss("softmax_ce")
    opt = NGD(net, loss, T1=2, lam=0.5)
    rng = np.random.default_rng(0)
    lam = opt.lam
    for k in range(1, 7):
        info = opt.step(rng.standard_normal((12, 4)), rng.integers(0, 3, 12))
        want = levenberg_marquardt(lam, info["rho"], opt.omega1) if k % 2 == 0 else lam
        assert info["lambda"] == pytest.approx(want, rel=1e-15)
        lam = info["lambda"]
    opt = NGD(tiny_mlp(), loss, adapt=False, lam=0.5)
    for _ in range(3):
        assert opt.step(rng.standard_normal((12, 4)), rng.integers(0, 3, 12))["lambda"] == 0.5


def test_state_dict_round_trip_is_bit_exact():
    loss = get_loss("softmax_ce")
    for make, hp in ((tiny_mlp, {"samples": 2}), (tiny_conv, {"independent_batch": True}), (tiny_mlp, {"labels": "full"})):
        hp = {"T1": 2, **hp}
        ref, got, net, net2, _, _ = checkpoint_and_resume(lambda n: NGD(n, loss, seed=7, **hp), make, 9, 4)
        assert [r["loss"] for r in got] == [r["loss"] for r in ref]
        assert [r["lambda"] for r in got] == [r["lambda"] for r in ref]
        for a, b in zip(net2.params, net.params):
            np.testing.assert_array_equal(a, b)


def test_non_finite_step_is_rejected():
    net, loss = tiny_mlp(), get_loss("squared")
    rng = np.random.default_rng(0)
    X, Y = rng.standard_normal((8, 4)), rng.standard_normal((8, 3))
    opt = NGD(net, loss)
    opt.step(X, Y)
    before, lam = net.copy_params(), opt.lam
    opt.hparams["lr"] = 1e308  # the update overflows
    info = opt.step(X, Y)
    assert not info["accepted"] and opt.n_rejected == 1 and opt.lam == pytest.approx(lam / opt.omega1)
    for a, b in zip(net.params, before):
        np.testing.assert_array_equal(a, b)
    assert info["loss"] == net.loss(X, Y, loss)
    opt.hparams["lr"] = 1.0
    Xbad = X.copy()
    Xbad[0, 0] = np.nan
    assert not opt.step(Xbad, Y)["accepted"] and opt.n_rejected == 2
    for a, b in zip(net.params, before):
        np.testing.assert_array_equal(a, b)
    assert opt.step(X, Y)["accepted"]


def test_step_that_raises_the_objective_is_rejected():
    net, loss = tiny_mlp(), get_loss("squared")
    rng = np.random.default_rng(0)
    X, Y = rng.standard_normal((8, 4)), rng.standard_normal((8, 3))
    for reject in (True, False):
        net.set_params(tiny_mlp().params)
        opt = NGD(net, loss, lr=30.0, lam=1e-3, adapt=False, reject_increase=reject)  # a far overshoot
        before = net.copy_params()
        info = opt.step(X, Y)
        assert np.isfinite(info.get("rejected_loss", info["loss"]))
        if reject:
            assert not info["accepted"] and opt.n_rejected == 1 and opt.lam == pytest.approx(1e-3 / opt.omega1)
            assert info["rejected_loss"] > info["loss"] == net.loss(X, Y, loss)
            for a, b in zip(net.params, before):
                np.testing.assert_array_equal(a, b)
        else:
            assert info["accepted"] and info["loss"] > info["loss_before"] and opt.n_rejected == 0


def test_no_late_blow_up_on_the_classifier_at_defaults():
    """digits-clf, defaults, batch 256: without the increase test the weight norm went 20 -> 1100 at iteration ~185."""
    from kronlin.train.cli import setup, make_config

    task, net, data_rng, opt = setup(make_config("digits-clf", "ngd", seed=0, batch=256, steps=260))
    for _ in range(260):
        opt.step(*task.sample_batch(256, data_rng))
    assert net.loss(task.X_train, task.Y_train, task.loss) < 0.05
    assert np.sqrt(sum(float(np.sum(W * W)) for W in net.params)) < 50


@pytest.mark.parametrize("task,factor", [("digits-clf", 0.3), ("digits-ae", 0.8)])
def test_trains_at_defaults(tasks, task, factor):
    T = tasks[task]
    before, after, opt, losses = train_at_defaults(T, "ngd", steps=30, batch=128)
    assert all(np.isfinite(losses))
    # steps that raise their batch's objective are rejected by design (reject_increase); all others are finite
    assert after < factor * before, (before, after)


def test_cli(tmp_path):
    out = tmp_path / "run.json"
    rc = cli_main(["--task", "digits-clf", "--opt", "ngd", "--steps", "5", "--batch", "64", "--out", str(out),
                   "--hp", "labels=full", "--quiet"])  # fmt: skip
    assert rc == 0 and out.exists()


def test_independent_batch_draws_a_second_batch_in_the_training_loop():
    """Benzing I.5: the Fisher and the gradient come from two independently drawn batches of --batch
    examples each (not the two halves of one batch); the loop passes them concatenated."""
    from kronlin.train.cli import draw_batches, setup, make_config, run_training

    cfg = make_config("digits-clf", "ngd", steps=1, batch=32, hp={"independent_batch": True})
    task, net, data_rng, opt = setup(cfg)
    assert opt.batches_per_step == 2 and OPTIMIZERS["ngd"](net, opt.loss).batches_per_step == 1
    rng = np.random.default_rng()
    rng.bit_generator.state = data_rng.bit_generator.state
    (X1, Y1), (X2, Y2) = task.sample_batch(32, rng), task.sample_batch(32, rng)  # two successive draws
    X, Y = draw_batches(task, 32, data_rng, 2)
    np.testing.assert_array_equal(X, np.vstack([X1, X2]))
    np.testing.assert_array_equal(Y, np.concatenate([Y1, Y2]))
    info = opt.step(X, Y)
    assert opt.fisher.n_columns == 32  # the Fisher saw the first batch only (S = 1 label per input)
    assert run_training(cfg)["loss"] == [info["loss"]]
