"""K-BFGS / K-BFGS(L) (Ren, Bahamou & Goldfarb 2021, algorithms 1 and 2) on tiny networks.

BFGS secant condition and positive definiteness of the *stored* factors, the
compact L-BFGS form against the two-loop recursion and the explicit BFGS
matrix, D_P D_LM on a non-convex pair, the Kronecker step against np.kron,
the Hessian-action pair, the λ_A/λ_G split, rejection, bit-exact resume,
training on the digits tasks and the command line.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from kronlin.train import cli, get_loss
from kronlin.train.checkpoint import decode_tree, encode_tree
from kronlin.train.optim import OPTIMIZERS
from kronlin.train.optim.kbfgs import (
    KBFGS,
    KBFGSL,
    bfgs_update,
    double_damping,
    lbfgs_apply,
    lbfgs_two_loop,
)

from train_helpers import batch, checkpoint_and_resume, tiny_conv, tiny_mlp, train_at_defaults


# ----------------------------------------------------------------- helpers
def random_spd(d, seed=0):
    rng = np.random.default_rng(seed)
    B = rng.standard_normal((d, d))
    return B @ B.T + d * np.eye(d)


def is_spd(H):
    return np.array_equal(H, H.T) and np.linalg.eigvalsh(H).min() > 0


# ------------------------------------------------------------- registry
def test_registered_and_validated():
    assert OPTIMIZERS["kbfgs"] is KBFGS and OPTIMIZERS["kbfgs-l"] is KBFGSL
    net, loss = tiny_mlp(), get_loss("softmax_ce")
    assert KBFGS(net, loss).hparams == {"lr": 0.03, "damping": 0.3, "T": 1, "beta": 0.9, "mu1": 0.2,
                                        "warm_start": False}
    assert KBFGSL(net, loss).hparams["memory"] == 100
    for bad in ({"T": 0}, {"lr": -1.0}, {"damping": 0.0}, {"mu1": 1.0}, {"beta": 1.0}, {"warm_start": "yes"}):
        with pytest.raises(ValueError):
            KBFGS(net, loss, **bad)
    with pytest.raises(ValueError):
        KBFGS(net, loss, memory=5)  # only K-BFGS(L) has a memory
    with pytest.raises(ValueError):
        KBFGSL(net, loss, memory=0)


# -------------------------------------------------------- BFGS primitives
def test_bfgs_update_secant_spd_and_formula():
    d = 6
    H = random_spd(d, 3) / 10
    rng = np.random.default_rng(4)
    s = rng.standard_normal(d)
    y = random_spd(d, 5) @ s
    Hn = bfgs_update(H, s, y)
    np.testing.assert_allclose(Hn @ y, s, rtol=1e-10, atol=1e-12)  # secant H⁺ y = s
    assert is_spd(Hn) and not np.allclose(Hn, H)
    rho = 1 / (s @ y)
    V = np.eye(d) - rho * np.outer(y, s)
    np.testing.assert_allclose(Hn, V.T @ H @ V + rho * np.outer(s, s), rtol=1e-10, atol=1e-12)  # eq. 11
    with pytest.raises(ValueError):
        bfgs_update(H, s, -y)


def test_double_damping_on_nonconvex_pair():
    d = 5
    H = random_spd(d, 7) / 5
    rng = np.random.default_rng(8)
    s = rng.standard_normal(d)
    y = -2.0 * s + 0.1 * rng.standard_normal(d)  # negative curvature: sᵀy < 0
    assert s @ y < 0
    mu1, mu2 = 0.2, 0.5
    s_t, y_t, theta = double_damping(s, y, H @ y, mu1, mu2)
    assert 0 < theta < 1
    assert s_t @ y >= mu1 * (y @ H @ y) * (1 - 1e-12)  # Powell: s̃ᵀy ≥ μ₁ yᵀHy
    assert s_t @ y_t >= mu2 * (s_t @ s_t) * (1 - 1e-12) > 0  # LM: s̃ᵀỹ ≥ μ₂ ‖s̃‖²
    Hn = bfgs_update(H, s_t, y_t)  # the damped pair is usable, and the secant holds for it
    np.testing.assert_allclose(Hn @ y_t, s_t, rtol=1e-10, atol=1e-12)
    assert is_spd(Hn)
    # a pair that already has enough curvature is only LM-damped (θ₁ = 1)
    s2 = rng.standard_normal(d)
    y2 = s2 + 0.1 * rng.standard_normal(d)
    H2 = 0.5 * np.eye(d)
    s_t, y_t, theta = double_damping(s2, y2, H2 @ y2, mu1, mu2)
    assert theta == 1.0 and np.array_equal(s_t, s2)
    np.testing.assert_allclose(y_t, y2 + mu2 * s2)


@pytest.mark.parametrize("m", [0, 1, 4, 9])
def test_compact_lbfgs_matches_two_loop_and_dense_bfgs(m):
    d, gamma = 7, 0.8
    rng = np.random.default_rng(m)
    B = random_spd(d, 11)
    S = rng.standard_normal((m, d))
    Y = S @ B
    H = gamma * np.eye(d)  # explicit BFGS matrix from the same pairs, oldest first
    for s, y in zip(S, Y):
        H = bfgs_update(H, s, y)
    M = rng.standard_normal((d, 3))
    got = lbfgs_apply(S, Y, gamma, M)
    np.testing.assert_allclose(got, H @ M, rtol=1e-9, atol=1e-11)
    for j in range(3):
        np.testing.assert_allclose(got[:, j], lbfgs_two_loop(S, Y, gamma, M[:, j]), rtol=1e-9, atol=1e-11)
    np.testing.assert_allclose(lbfgs_apply(S, Y, gamma, M[:, 0]), got[:, 0], rtol=1e-12, atol=1e-14)
    if m:  # secant condition for the newest pair
        np.testing.assert_allclose(lbfgs_apply(S, Y, gamma, Y[-1]), S[-1], rtol=1e-9, atol=1e-11)


# ------------------------------------------------------------- the optimizer
def _opt_after(cls, make, steps=1, **hp):
    net, loss = make(), get_loss("softmax_ce")
    opt = cls(net, loss, seed=0, **hp)
    X, Y = batch(net, 12)
    for _ in range(steps):
        opt.step(X, Y)
    return net, loss, opt, X, Y


def test_initial_factors_and_damping_split():
    net, loss = tiny_conv(), get_loss("softmax_ce")
    lam = 0.7
    opt = KBFGS(net, loss, damping=lam, T=1000)  # no curvature update: the initial factors stay
    X, Y = batch(net, 6)
    tr = net.forward(X)
    opt.step(X, Y)
    T = net.layers[0].T
    assert opt.lambdas(0) == pytest.approx((math.sqrt(T * lam), math.sqrt(lam / T)))
    assert opt.lambdas(1) == pytest.approx((math.sqrt(lam), math.sqrt(lam)))
    for i, a in enumerate(tr.a):
        r = a.reshape(-1, a.shape[-1])
        A = r.T @ r / 6  # E_n[Σ_t ā āᵀ]
        lam_A, lam_G = opt.lambdas(i)
        np.testing.assert_allclose(opt.H_A[i], np.linalg.inv(A + lam_A * np.eye(len(A))), rtol=1e-10)
        np.testing.assert_allclose(opt.H_G[i], np.eye(net.layers[i].d_out) / lam_G)


@pytest.mark.parametrize("cls", [KBFGS, KBFGSL])
@pytest.mark.parametrize("make", [tiny_mlp, tiny_conv])
def test_warm_start_builds_H_A_from_the_whole_training_set(cls, make):
    """§4's warm start: ``H_A = (A + λ_A I)⁻¹`` with ``A = E_n[Σ_t ā āᵀ]`` over the whole training set,
    accumulated in chunks (7 examples here, so 50 examples take 8 forward passes), before step 1; the first
    step then uses it instead of the first mini-batch's."""
    net, loss = make(), get_loss("softmax_ce")
    X_train, _ = batch(net, 50, seed=3)
    opt = cls(net, loss, damping=0.4, T=1000, warm_start=True)
    assert opt.prepare(X_train, 32, chunk=7)
    tr = net.forward(X_train)  # one pass over the whole set: the reference A, per example and position
    for i, a in enumerate(tr.a):
        a = a if a.ndim == 3 else a[:, None, :]
        A = np.einsum("nti,ntj->ij", a, a) / 50
        lam_A = opt.lambdas(i)[0]
        np.testing.assert_allclose(opt.H_A[i], np.linalg.inv(A + lam_A * np.eye(len(A))), rtol=1e-10)
    warm = [H.copy() for H in opt.H_A]
    X, Y = batch(net, 6)
    opt.step(X, Y)  # T = 1000: no curvature update, the warm factors stay
    for H, W in zip(opt.H_A, warm):
        np.testing.assert_array_equal(H, W)
    cold = cls(make(), loss, damping=0.4, T=1000)
    assert not cold.prepare(X_train, 32)  # warm_start=False: a no-op, the first batch builds H_A
    assert cold.H_A is None


def test_warm_start_in_the_training_loop(tmp_path):
    """The CLI's fresh run calls prepare(); its time is recorded apart from the step times."""
    out_w, out_c = tmp_path / "w.json", tmp_path / "c.json"
    base = ["--task", "digits-clf", "--opt", "kbfgs", "--steps", "3", "--batch", "32", "--quiet"]
    assert cli.main(base + ["--hp", "warm_start=true", "--out", str(out_w)]) == 0
    assert cli.main(base + ["--out", str(out_c)]) == 0
    w, c = json.loads(out_w.read_text()), json.loads(out_c.read_text())
    assert w["config"]["hparams"]["warm_start"] is True and w["prepare_seconds"] > 0 and "prepare_seconds" not in c
    assert w["loss"][0] != c["loss"][0]  # the first step used the whole-set H_A


@pytest.mark.parametrize("cls", [KBFGS, KBFGSL])
def test_step_is_kron_preconditioned_momentum(cls):
    net, loss = tiny_mlp(), get_loss("softmax_ce")
    opt = cls(net, loss, lr=0.05, T=1)
    batches = [batch(net, 10, seed=s) for s in (1, 2, 3)]
    mom = None
    for X, Y in batches:
        W0 = net.copy_params()
        _, grads, _ = net.loss_and_grads(X, Y, loss)
        mom = grads if mom is None else [0.9 * m + g for m, g in zip(mom, grads)]
        HA = [H.copy() for H in opt.H_A] if opt.H_A is not None else None
        HG = [opt.dense_HG(i) for i in range(net.n_layers)] if HA is not None else None
        opt.step(X, Y)
        if HA is None:
            continue
        for i, (W, Wn, M) in enumerate(zip(W0, net.params, mom)):
            vec = np.kron(HA[i], HG[i]) @ M.reshape(-1, order="F")  # (H_A ⊗ H_G) vec(∇W)
            np.testing.assert_allclose(Wn, W - 0.05 * vec.reshape(M.shape, order="F"), rtol=1e-10, atol=1e-13)


@pytest.mark.parametrize("make", [tiny_mlp, tiny_conv])
def test_stored_factors_change_stay_spd_and_satisfy_secant(make):
    net, loss = make(), get_loss("softmax_ce")
    opt = KBFGS(net, loss, T=1)
    X, Y = batch(net, 12)
    opt.step(X, Y)  # k = 1: initial factors H_A = (A + λ_A I)⁻¹, then one update
    X, Y = batch(net, 12, seed=2)  # a new batch: A changes, so the Hessian-action pair is informative
    HA0, HG0 = [H.copy() for H in opt.H_A], [H.copy() for H in opt.H_G]
    ids = [id(H) for H in opt.H_A]
    sG0, yG0 = [v.copy() for v in opt.s_G], [v.copy() for v in opt.y_G]
    _, _, trace = net.loss_and_grads(X, Y, loss)
    tr = trace
    info = opt.step(X, Y)
    assert info["accepted"] and info["updated"]
    _, _, trace_new = net.loss_and_grads(X, Y, loss)
    for i, L in enumerate(net.layers):
        HA, HG = opt.H_A[i], opt.H_G[i]
        assert is_spd(HA) and is_spd(HG)
        assert not np.allclose(HA, HA0[i]) and not np.allclose(HG, HG0[i])  # written back, not lost
        # Hessian-action pair (eq. 14, 15) from this batch's activations: secant for H_A
        r = tr.a[i].reshape(-1, tr.a[i].shape[-1])
        s_A = HA0[i] @ r.mean(axis=0)
        y_A = r.T @ (r @ s_A) / 12 + opt.lambdas(i)[0] * s_A
        np.testing.assert_allclose(HA @ y_A, s_A, rtol=1e-8, atol=1e-12)
        # (s_G, y_G): moving averages of Δ mean pre-activation / gradient, then D_P D_LM
        ds = trace_new.s[i].reshape(-1, L.d_out).mean(0) - trace.s[i].reshape(-1, L.d_out).mean(0)
        dg = trace_new.g[i].reshape(-1, L.d_out).mean(0) - trace.g[i].reshape(-1, L.d_out).mean(0)
        sG, yG = 0.9 * sG0[i] + 0.1 * ds, 0.9 * yG0[i] + 0.1 * dg
        np.testing.assert_allclose(opt.s_G[i], sG, rtol=1e-12, atol=1e-15)
        np.testing.assert_allclose(opt.y_G[i], yG, rtol=1e-12, atol=1e-15)
        s_t, y_t, _ = double_damping(sG, yG, HG0[i] @ yG, 0.2, opt.lambdas(i)[1])
        np.testing.assert_allclose(HG @ y_t, s_t, rtol=1e-8, atol=1e-12)
    assert all(id(H) != j for H, j in zip(opt.H_A, ids))  # new arrays stored in the optimizer's lists


def test_lbfgs_variant_stores_pairs_and_matches_bfgs_within_memory():
    a = _opt_after(KBFGS, tiny_mlp, steps=5)
    b = _opt_after(KBFGSL, tiny_mlp, steps=5)
    for i in range(a[0].n_layers):
        S = b[2].pairs[i][0]
        assert S.shape[0] == 5  # one pair per curvature update (T = 1)
        np.testing.assert_allclose(b[2].dense_HG(i), a[2].H_G[i], rtol=1e-8, atol=1e-10)
        np.testing.assert_allclose(b[0].params[i], a[0].params[i], rtol=1e-8, atol=1e-10)
    c = _opt_after(KBFGSL, tiny_mlp, steps=5, memory=2)
    assert all(S.shape[0] == 2 for S, _ in c[2].pairs)
    for i in range(c[0].n_layers):  # H_G stays SPD with a truncated memory
        H = c[2].dense_HG(i)
        assert np.linalg.eigvalsh(0.5 * (H + H.T)).min() > 0


def test_curvature_update_period():
    _, _, opt, X, Y = _opt_after(KBFGS, tiny_mlp, steps=0, T=3)
    flags = [opt.step(X, Y)["updated"] for _ in range(6)]
    assert flags == [False, False, True, False, False, True]


# ------------------------------------------------------------ rejection
@pytest.mark.parametrize("cls", [KBFGS, KBFGSL])
def test_non_finite_step_is_rejected(cls):
    net, loss, opt, X, Y = _opt_after(cls, tiny_mlp, steps=2)
    before = net.copy_params()
    state = opt.state_dict()
    opt.hparams["lr"] = 1e308  # overflowing step
    info = opt.step(X, Y)
    assert not info["accepted"] and opt.n_rejected == 1 and opt.lr_scale == 0.5
    for a, b in zip(net.params, before):
        np.testing.assert_array_equal(a, b)
    assert info["loss"] == net.loss(X, Y, loss) and np.isfinite(info["loss"])
    after = opt.state_dict()["extra"]  # momentum and curvature untouched
    for key in ("H_A", "momentum", "s_G", "y_G"):
        for u, v in zip(after[key], state["extra"][key]):
            np.testing.assert_array_equal(u, v)
    opt.hparams["lr"] = 0.03
    Xbad = X.copy()
    Xbad[0, 0] = np.nan
    info = opt.step(Xbad, Y)
    assert not info["accepted"] and opt.n_rejected == 2
    for a, b in zip(net.params, before):
        np.testing.assert_array_equal(a, b)
    info = opt.step(X, Y)
    assert info["accepted"] and info["loss"] < info["loss_before"]


# --------------------------------------------------------------- resume
@pytest.mark.parametrize("name,make,hp", [
    ("kbfgs", tiny_mlp, {}),
    ("kbfgs", tiny_conv, {"T": 2}),
    ("kbfgs-l", tiny_mlp, {"memory": 3}),
    ("kbfgs-l", tiny_conv, {}),
])  # fmt: skip
def test_state_dict_round_trip_is_bit_exact(name, make, hp):
    loss = get_loss("softmax_ce")
    ref, got, net, net2, opt, opt2 = checkpoint_and_resume(lambda n: OPTIMIZERS[name](n, loss, seed=7, **hp), make, 11, 5)
    assert [r["loss"] for r in got] == [r["loss"] for r in ref]
    for a, b in zip(net2.params, net.params):
        np.testing.assert_array_equal(a, b)
    for a, b in zip(opt2.H_A, opt.H_A):
        np.testing.assert_array_equal(a, b)


def test_fresh_state_round_trip():
    net, loss = tiny_mlp(), get_loss("softmax_ce")
    text, arrays = encode_tree(KBFGSL(net, loss).state_dict())
    opt = KBFGSL(net, loss)
    opt.load_state_dict(decode_tree(text, arrays))
    X, Y = batch(net, 8)
    assert opt.step(X, Y)["accepted"]


# ------------------------------------------------------------- training
@pytest.mark.parametrize("name", ["kbfgs", "kbfgs-l"])
@pytest.mark.parametrize("task", ["digits-clf", "digits-ae", "digits-conv"])
def test_trains_at_defaults(tasks, name, task):
    T = tasks[task]
    before, after, opt, losses = train_at_defaults(T, name, steps=30, batch=128)
    assert all(np.isfinite(losses))
    assert opt.n_rejected == 0 and after < (0.6 if task == "digits-ae" else 0.4) * before, (before, after)


@pytest.mark.parametrize("name", ["kbfgs", "kbfgs-l"])
def test_cli_runs(tmp_path, name):
    out = tmp_path / "run.json"
    rc = cli.main(["--task", "digits-clf", "--opt", name, "--steps", "5", "--batch", "32", "--seed", "0",
                   "--quiet", "--out", str(out)])  # fmt: skip
    assert rc == 0
    rec = json.loads(out.read_text())
    assert rec["opt"] == name and len(rec["loss"]) == 5 and all(np.isfinite(rec["loss"]))
    assert rec["loss"][-1] < rec["loss"][0]


def test_cli_checkpoint_resume_is_bit_exact(tmp_path):
    base = ["--task", "digits-conv", "--opt", "kbfgs-l", "--hp", "T=3", "--batch", "32", "--seed", "2", "--quiet"]
    full, part, ck = tmp_path / "full.json", tmp_path / "part.json", tmp_path / "ck.npz"
    assert cli.main(base + ["--steps", "7", "--out", str(full)]) == 0
    assert cli.main(base + ["--steps", "4", "--checkpoint", str(ck), "--out", str(part)]) == 0
    assert cli.main(base + ["--steps", "7", "--resume", str(ck), "--out", str(part)]) == 0
    assert json.loads(part.read_text())["loss"] == json.loads(full.read_text())["loss"]
