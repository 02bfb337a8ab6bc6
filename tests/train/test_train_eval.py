"""Evaluation at fixed points (issue 15): the whole training set's objective, a held-out split, errors."""

from __future__ import annotations

import json

import numpy as np
import pytest

from kronlin.train import cli
from kronlin.train.cli import evaluate, make_config, run_training
from kronlin.train.data import load_task


def test_holdout_split_is_a_seeded_partition():
    full = load_task("digits-clf")
    a, b = load_task("digits-clf", seed=1, holdout=0.2), load_task("digits-clf", seed=2, holdout=0.2)
    assert full.X_test is None and full.n_train == 1797
    assert a.n_train + a.X_test.shape[0] == 1797 and a.X_test.shape[0] == round(0.2 * 1797)
    # a partition of the examples (digits rows are distinct up to a few duplicates: compare by content+label)
    rows = {(x.tobytes(), int(y)) for x, y in zip(full.X_train, full.Y_train)}
    got = {(x.tobytes(), int(y)) for x, y in zip(np.vstack([a.X_train, a.X_test]), np.concatenate([a.Y_train, a.Y_test]))}
    assert got == rows
    assert not np.array_equal(a.X_test, b.X_test)  # the seed chooses the split
    again = load_task("digits-clf", seed=1, holdout=0.2)
    np.testing.assert_array_equal(again.X_test, a.X_test)
    ae = load_task("digits-ae", seed=1, holdout=0.2)
    np.testing.assert_array_equal(ae.X_test, ae.Y_test)  # autoencoders reconstruct their inputs
    for bad in (1.0, -0.1, "0.2", True):
        with pytest.raises(ValueError, match="holdout"):
            load_task("digits-clf", holdout=bad)


def test_evaluate_against_per_example_loops():
    task = load_task("digits-clf", seed=3, holdout=0.25)
    net = task.net_factory(np.random.default_rng(0))
    ev = evaluate(task, net)
    for part, X, Y in (("train", task.X_train, task.Y_train), ("test", task.X_test, task.Y_test)):
        losses, wrong = [], 0
        for x, y in zip(X, Y):  # one example at a time: log-sum-exp by hand
            z = net.forward(x[None, :]).out[0]
            losses.append(np.log(np.sum(np.exp(z - z.max()))) + z.max() - z[y])
            wrong += int(np.argmax(z) != y)
        assert ev[f"{part}_loss"] == pytest.approx(np.mean(losses), rel=1e-12)
        assert ev[f"{part}_error"] == wrong / len(Y)
    ae = load_task("digits-ae")
    assert set(evaluate(ae, ae.net_factory(np.random.default_rng(0)))) == {"train_loss"}  # no split, no error


def test_eval_points_and_resume(tmp_path):
    cfg = make_config("digits-clf", "kfac", steps=7, batch=64, data={"holdout": 0.2})
    full = run_training(cfg, eval_every=3)
    ev = full["eval"]
    assert ev["every"] == 3 and ev["step"] == [0, 3, 6, 7]
    assert set(ev) == {"every", "step", "train_loss", "test_loss", "train_error", "test_error"}
    assert all(len(ev[k]) == 4 for k in ev if k not in ("every", "step"))
    task = load_task("digits-clf", holdout=0.2)
    fresh = task.net_factory(np.random.default_rng(np.random.SeedSequence(0).spawn(3)[0]))
    assert ev["train_loss"][0] == evaluate(task, fresh)["train_loss"]  # before the first step
    assert ev["train_loss"][-1] < ev["train_loss"][0]
    # a run checkpointed after 4 steps and resumed evaluates at the same points, to the bit
    ck = tmp_path / "ck.npz"
    part = run_training(make_config("digits-clf", "kfac", steps=4, batch=64, data={"holdout": 0.2}),
                        checkpoint=str(ck), eval_every=3)  # fmt: skip
    assert part["eval"]["step"] == [0, 3, 4]
    resumed = run_training(cfg, resume=str(ck), eval_every=3)
    assert resumed["loss"] == full["loss"]
    assert resumed["eval"]["step"] == [0, 3, 4, 6, 7]  # 4: where the first run stopped
    for k in ("train_loss", "test_error"):
        got = dict(zip(resumed["eval"]["step"], resumed["eval"][k]))
        assert [got[s] for s in ev["step"]] == ev[k]


def test_cli_eval_every(tmp_path):
    out = tmp_path / "r.json"
    assert cli.main(["--task", "digits-ae", "--opt", "sgd", "--steps", "4", "--eval-every", "2", "--quiet",
                     "--out", str(out)]) == 0  # fmt: skip
    assert json.loads(out.read_text())["eval"]["step"] == [0, 2, 4]
    with pytest.raises(SystemExit) as exc:
        cli.main(["--task", "digits-ae", "--opt", "sgd", "--steps", "4", "--eval-every", "-1", "--quiet"])
    assert exc.value.code == 2


def test_exponential_batch_schedule():
    """K-FAC §13: m_k = min(m₁ exp((k−1)/b), n) with m_K = n; the loop draws m_k examples at iteration k."""
    from kronlin.train.cli import batch_size_at

    n, m1, K = 5000, 100, 50
    sizes = [batch_size_at(k, m1, n, K) for k in range(1, 60)]
    assert sizes[0] == m1 and sizes[K - 1] == n and sizes[-1] == n
    b = (K - 1) / np.log(n / m1)
    assert sizes[9] == round(m1 * np.exp(9 / b))  # k = 10
    assert all(x <= y for x, y in zip(sizes, sizes[1:]))
    assert batch_size_at(7, 64, 1797) == 64  # no schedule: fixed
    cfg = make_config("digits-clf", "sgd", steps=6, batch=50, batch_full_at=5)
    rec = run_training(cfg)
    assert rec["batch_sizes"] == [batch_size_at(k, 50, 1797, 5) for k in range(1, 7)]
    assert rec["batch_sizes"][4:] == [1797, 1797] and rec["config"]["batch_full_at"] == 5
    for bad in (1, 2.5, True):
        with pytest.raises(ValueError, match="full-batch iteration"):
            make_config("digits-clf", "sgd", batch_full_at=bad)


def test_batch_schedule_resumes_and_must_match(tmp_path):
    from kronlin.train.resume import CheckpointError

    ck = tmp_path / "ck.npz"
    cfg = make_config("digits-clf", "kfac", steps=5, batch=40, batch_full_at=4)
    full = run_training(cfg)
    run_training(make_config("digits-clf", "kfac", steps=2, batch=40, batch_full_at=4), checkpoint=str(ck))
    resumed = run_training(cfg, resume=str(ck))
    assert resumed["loss"] == full["loss"] and resumed["batch_sizes"] == full["batch_sizes"]
    with pytest.raises(CheckpointError, match="batch_full_at"):
        run_training(make_config("digits-clf", "kfac", steps=5, batch=40), resume=str(ck))


def test_averaged_iterate_is_evaluated():
    """K-FAC §13 reports the lower of the current and the Polyak-averaged iterate's training objective."""
    cfg = make_config("digits-ae", "kfac", steps=4, batch=64, hp={"polyak": 0.9})
    ev = run_training(cfg, eval_every=2)["eval"]
    assert ev["step"] == [0, 2, 4]
    assert ev["train_loss_averaged"][0] is None and all(v is not None for v in ev["train_loss_averaged"][1:])
    # the reference: the same run by hand, its average evaluated with the whole-set objective
    from kronlin.train.cli import draw_batches, setup

    task, net, rng, opt = setup(cfg)
    for _ in range(4):
        opt.step(*draw_batches(task, 64, rng, 1))
    assert ev["train_loss_averaged"][-1] == task.loss.value(net.forward(task.X_train, opt.averaged_params).out,
                                                            task.Y_train)  # fmt: skip
    assert ev["train_loss"][-1] == task.loss.value(net.forward(task.X_train).out, task.Y_train)
    plain = run_training(make_config("digits-ae", "kfac", steps=2, batch=64), eval_every=1)["eval"]
    assert not any(k.endswith("_averaged") for k in plain)
