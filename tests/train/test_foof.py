"""FOOF (Benzing 2022, algorithm 1) against the dense ``(λI + AAᵀ)⁻¹ ⊗ I`` it applies."""

from __future__ import annotations

import numpy as np
import pytest

from kronlin.train import get_loss
from kronlin.train.cli import main as cli_main
from kronlin.train.optim import OPTIMIZERS
from kronlin.train.optim.foof import FOOF

from train_helpers import batch, checkpoint_and_resume, tiny_conv, tiny_mlp, train_at_defaults


def vec(M):
    return M.reshape(-1, order="F")


def sigma_of(trace):
    """``E_n[Σ_t ā āᵀ]`` per layer by einsum."""
    out = []
    for a in trace.a:
        a = a[:, None, :] if a.ndim == 2 else a
        out.append(np.einsum("nti,ntj->ij", a, a) / a.shape[0])
    return out


def test_registered_and_validated():
    assert OPTIMIZERS["foof"] is FOOF
    net, loss = tiny_mlp(), get_loss("softmax_ce")
    for bad in ({"T": 0}, {"T": 2, "S": 3}, {"damping": 0.0}, {"momentum": 1.0}, {"nope": 1}):
        with pytest.raises(ValueError):
            FOOF(net, loss, **bad)


@pytest.mark.parametrize("make", [tiny_mlp, tiny_conv])
def test_first_step_is_dense_preconditioned_gradient(make):
    net, loss = make(), get_loss("softmax_ce")
    X, Y = batch(net, 9)
    lam, lr = 0.3, 0.05
    opt = FOOF(net, loss, damping=lam, lr=lr)
    before = net.copy_params()
    _, grads, tr = net.loss_and_grads(X, Y, loss)
    info = opt.step(X, Y)
    assert info["accepted"]
    for S, G, W0, W1 in zip(sigma_of(tr), grads, before, net.params):
        P = np.linalg.inv(lam * np.eye(S.shape[0]) + S)
        want = -lr * np.kron(P, np.eye(G.shape[0])) @ vec(G)  # vec(∇W P) = (P ⊗ I) vec(∇W)
        np.testing.assert_allclose(vec(W1 - W0), want, rtol=1e-10, atol=1e-14)
    for S, Sopt in zip(sigma_of(tr), opt.sigma):
        np.testing.assert_allclose(Sopt, S, rtol=1e-12)


def test_schedule_T_and_S_and_momentum():
    """Algorithm 1: P refreshed when t mod T = 0, Σ folded for the S steps before; heavy-ball momentum."""
    net, loss = tiny_mlp(), get_loss("softmax_ce")
    lam, lr, mu, m = 0.5, 0.02, 0.9, 0.8
    opt = FOOF(net, loss, damping=lam, lr=lr, momentum=mu, decay=m, T=3, S=2)
    rng = np.random.default_rng(3)
    sig, P, v, j = None, None, None, 0
    for t in range(8):
        X, Y = rng.standard_normal((7, 4)), rng.integers(0, 3, 7)
        _, grads, tr = net.loss_and_grads(X, Y, loss)
        batch_sig = sigma_of(tr)
        if t == 0:  # appendix K: first batch folded and inverted before the update
            sig, j = batch_sig, 1
            P = [np.linalg.inv(S + lam * np.eye(len(S))) for S in sig]
        pre = [G @ Pi for G, Pi in zip(grads, P)]
        v = pre if v is None else [mu * vi + d for vi, d in zip(v, pre)]
        want = [W - lr * vi for W, vi in zip(net.params, v)]
        info = opt.step(X, Y)
        for a, b in zip(net.params, want):
            np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-13)
        if t > 0 and t % 3 == 0:
            P = [np.linalg.inv(S + lam * np.eye(len(S))) for S in sig]
            assert info["refreshed"]
        if t > 0 and (t + 2) % 3 < 2:
            j += 1
            eps = min(1 - 1 / j, m)
            sig = [eps * s + (1 - eps) * b for s, b in zip(sig, batch_sig)]


def test_state_dict_round_trip_is_bit_exact():
    loss = get_loss("softmax_ce")
    for make in (tiny_mlp, tiny_conv):
        hp = {"T": 3, "S": 2, "lr": 0.05}
        ref, got, net, net2, _, _ = checkpoint_and_resume(lambda n: FOOF(n, loss, seed=7, **hp), make, 11, 5)
        assert [r["loss"] for r in got] == [r["loss"] for r in ref]
        for a, b in zip(net2.params, net.params):
            np.testing.assert_array_equal(a, b)


def test_non_finite_step_is_rejected():
    net, loss = tiny_mlp(), get_loss("squared")
    rng = np.random.default_rng(0)
    X, Y = rng.standard_normal((8, 4)), rng.standard_normal((8, 3))
    opt = FOOF(net, loss)
    opt.step(X, Y)
    state = opt.state_dict()
    before = net.copy_params()
    opt.hparams["lr"] = 1e308  # a "huge learning rate": the update overflows
    info = opt.step(X, Y)
    assert not info["accepted"] and opt.n_rejected == 1 and opt.lr_scale == 0.5
    for a, b in zip(net.params, before):
        np.testing.assert_array_equal(a, b)
    assert info["loss"] == net.loss(X, Y, loss)
    for a, b in zip(opt.velocity, state["extra"]["velocity"]):
        np.testing.assert_array_equal(a, b)
    Xbad = X.copy()
    Xbad[0, 0] = np.nan
    assert not opt.step(Xbad, Y)["accepted"]
    for a, b in zip(net.params, before):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("task,factor", [("digits-clf", 0.3), ("digits-ae", 0.8)])
def test_trains_at_defaults(tasks, task, factor):
    T = tasks[task]
    before, after, opt, losses = train_at_defaults(T, "foof", steps=30, batch=128)
    assert all(np.isfinite(losses))
    assert opt.n_rejected == 0 and after < factor * before, (before, after)


def test_cli(tmp_path):
    out = tmp_path / "run.json"
    rc = cli_main(["--task", "digits-clf", "--opt", "foof", "--steps", "5", "--batch", "64", "--out", str(out),
                   "--hp", "T=2"])  # fmt: skip
    assert rc == 0 and out.exists()


@pytest.mark.parametrize("make", [tiny_mlp, tiny_conv])
def test_sum_convention_is_the_papers_sigma(make):
    """stats="sum": Σ = N·E_n[Σ_t ā āᵀ], eq. (6)'s A Aᵀ summed over the batch; with a fixed batch size it is
    the mean convention with (λ/N, η/N): the same trajectory to rounding."""
    loss = get_loss("softmax_ce")
    N, lam, lr = 12, 30.0, 1.2
    net0 = make()
    batches = [batch(net0, N, seed=s) for s in range(5)]
    a, b = make(), make()
    opt_s = FOOF(a, loss, stats="sum", damping=lam, lr=lr)
    opt_m = FOOF(b, loss, stats="mean", damping=lam / N, lr=lr / N)
    X0, Y0 = batches[0]
    tr = a.forward(X0)
    opt_s.step(X0, Y0)
    for S, ref in zip(opt_s.sigma, sigma_of(tr)):
        np.testing.assert_allclose(S, N * ref, rtol=1e-12)
    opt_m.step(X0, Y0)
    for X, Y in batches[1:]:
        opt_s.step(X, Y)
        opt_m.step(X, Y)
    for Wa, Wb in zip(a.params, b.params):
        np.testing.assert_allclose(Wa, Wb, rtol=1e-9, atol=1e-12)


def test_init_batches_fold_before_training():
    """Appendix K: line 11 on init_batches mini-batches before training, then line 8; with the normalised
    average (decay min(1 − 1/j, m)) three folds give the plain mean of the three batches' Σ."""
    loss = get_loss("softmax_ce")
    net = tiny_mlp()
    X_train, _ = batch(net, 40, seed=7)
    opt = FOOF(net, loss, init_batches=3, seed=5)
    assert opt.prepare(X_train, 16)
    rng = np.random.default_rng(5)  # the optimizer's generator, replayed
    draws = [X_train[rng.choice(40, size=16, replace=False)] for _ in range(3)]
    ref = [sum(S) / 3 for S in zip(*(sigma_of(net.forward(X)) for X in draws))]
    for S, R in zip(opt.sigma, ref):
        np.testing.assert_allclose(S, R, rtol=1e-12)
    X, Y = batch(net, 16)
    info = opt.step(X, Y)
    assert info["accepted"]
    assert not FOOF(tiny_mlp(), loss).prepare(X_train, 16)  # init_batches=1: the first step does it


def test_an_overflowing_preconditioned_gradient_is_rejected_not_raised(monkeypatch):
    """kronlin refuses a non-finite ∇W P from finite input (FloatingPointError, issue 17): FOOF rejects the
    step (weights, momentum and Σ unchanged; the step size scaled by reject_factor) instead of raising."""
    net, loss = tiny_mlp(), get_loss("softmax_ce")
    X, Y = batch(net, 9)
    opt = FOOF(net, loss)
    opt.step(X, Y)
    theta, vel, lr_scale = net.copy_params(), [v.copy() for v in opt.velocity], opt.lr_scale

    def overflow(grads):
        raise FloatingPointError("the result of Kron.solve is not finite")

    monkeypatch.setattr(opt, "precondition", overflow)
    info = opt.step(X, Y)
    assert not info["accepted"] and opt.n_rejected == 1 and opt.lr_scale == lr_scale * 0.5
    assert all(np.array_equal(W, T) for W, T in zip(net.params, theta))
    assert all(np.array_equal(v, w) for v, w in zip(opt.velocity, vel))


def _split_per_layer(est_state):
    """One estimator's state as the per-layer states checkpoints held before the estimator was shared."""
    st = est_state["stats"]
    return [{**est_state, "stats": {"A_diag": [A], "G_diag": [G], "A_off": [], "G_off": []}}
            for A, G in zip(st["A_diag"], st["G_diag"])]


@pytest.mark.parametrize("name", ["foof", "kfac"])
def test_checkpoints_with_one_estimator_per_layer_still_resume(name):
    """FOOF (like K-FAC before it) keeps one FactorEstimator for all layers; a checkpoint written with one
    per layer resumes to the same steps, bit for bit, as one written now."""
    from kronlin.train.checkpoint import decode_tree, encode_tree

    loss = get_loss("softmax_ce")
    rng = np.random.default_rng(3)
    for make in (tiny_mlp, tiny_conv):
        net = make()
        batches = [(rng.standard_normal((10, net.in_size)), rng.integers(0, 3, 10)) for _ in range(7)]
        opt = OPTIMIZERS[name](net, loss, seed=5)
        for X, Y in batches[:4]:
            opt.step(X, Y)
        state = decode_tree(*encode_tree(opt.state_dict()))
        old = decode_tree(*encode_tree(opt.state_dict()))
        key = "estimators" if name == "foof" else "curvature"
        assert len(old["extra"][key]) == 1
        old["extra"][key] = _split_per_layer(old["extra"][key][0])
        runs = []
        for st in (state, old):
            net2 = make(seed=99)
            net2.set_params(net.copy_params())
            opt2 = OPTIMIZERS[name](net2, loss, seed=5)
            opt2.load_state_dict(st)
            runs.append([opt2.step(X, Y)["loss"] for X, Y in batches[4:]])
        assert runs[0] == runs[1]
