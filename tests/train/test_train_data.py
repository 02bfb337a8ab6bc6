"""The offline tasks of kronlin.train: shapes, ranges, architectures and determinism."""

from __future__ import annotations

import numpy as np
import pytest

from kronlin.train import TASKS, Conv2D, load_task, make_curves


@pytest.fixture(scope="module")
def tasks():
    return {name: load_task(name, 0, **({"n": 300} if name == "curves-ae" else {})) for name in TASKS}


def test_digits_tasks(tasks):
    clf, ae = tasks["digits-clf"], tasks["digits-ae"]
    assert clf.X_train.shape == (1797, 64) and clf.Y_train.shape == (1797,)
    assert clf.X_train.min() == 0.0 and clf.X_train.max() == 1.0
    assert set(np.unique(clf.Y_train)) == set(range(10))
    assert clf.loss.name == "softmax_ce" and ae.loss.name == "sigmoid_bce"
    np.testing.assert_array_equal(ae.X_train, ae.Y_train)
    assert tasks["digits-conv"].loss.name == "softmax_ce"


def test_architectures(tasks):
    rng = np.random.default_rng(0)
    shapes = {name: t.net_factory(rng).shapes for name, t in tasks.items()}
    assert [s[0] for s in shapes["digits-clf"]] == [128, 64, 10]
    widths = [64, 128, 64, 32, 8, 32, 64, 128, 64]
    assert shapes["digits-ae"] == [(widths[i + 1], widths[i] + 1) for i in range(8)]
    widths = [784, 200, 100, 50, 25, 12, 6, 12, 25, 50, 100, 200, 784]
    assert shapes["curves-ae"] == [(widths[i + 1], widths[i] + 1) for i in range(12)]
    ae = tasks["digits-ae"].net_factory(rng)
    assert [L.activation for L in ae.layers] == ["tanh"] * 3 + ["linear"] + ["tanh"] * 3 + ["linear"]
    conv = tasks["digits-conv"].net_factory(rng)
    assert isinstance(conv.layers[0], Conv2D) and conv.layers[0].T == 36
    for name, t in tasks.items():
        net = t.net_factory(rng)
        tr = net.forward(t.X_train[:5])
        assert tr.out.shape[0] == 5 and np.isfinite(t.loss.value(tr.out, t.Y_train[:5])), name


def test_curves_images():
    X = make_curves(200, seed=3)
    assert X.shape == (200, 784) and X.min() >= 0.0 and X.max() <= 1.0
    ink = (X > 0.5).mean(axis=1)
    assert np.all(ink > 0.005) and np.all(ink < 0.3)  # every image holds a thin curve
    # the curve passes through its control points: those pixels are bright
    rng = np.random.default_rng(3)
    P = rng.uniform(2.0, 25.0, size=(200, 3, 2))
    img = X.reshape(200, 28, 28)
    r, c = np.rint(P[..., 0]).astype(int), np.rint(P[..., 1]).astype(int)
    vals = img[np.arange(200)[:, None], r, c]
    assert np.median(vals) > 0.4


def test_deterministic_per_seed():
    a, b, c = make_curves(50, seed=1), make_curves(50, seed=1), make_curves(50, seed=2)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    t1, t2 = load_task("curves-ae", 5, n=40), load_task("curves-ae", 5, n=40)
    np.testing.assert_array_equal(t1.X_train, t2.X_train)
    d1, d2 = load_task("digits-clf", 0), load_task("digits-clf", 1)
    np.testing.assert_array_equal(d1.X_train, d2.X_train)  # bundled data: the seed does not matter


def test_batches_come_only_from_the_given_rng(tasks):
    t = tasks["digits-clf"]
    b1 = [t.sample_batch(32, np.random.default_rng(7)) for _ in range(2)]
    np.testing.assert_array_equal(b1[0][0], b1[1][0])
    gen1, gen2 = t.batches(32, np.random.default_rng(9)), t.batches(32, np.random.default_rng(9))
    for _ in range(3):
        (X1, Y1), (X2, Y2) = next(gen1), next(gen2)
        np.testing.assert_array_equal(X1, X2)
        np.testing.assert_array_equal(Y1, Y2)
    X, Y = t.sample_batch(50, np.random.default_rng(0))
    assert X.shape == (50, 64) and Y.shape == (50,)
    rng = np.random.default_rng(0)
    state = rng.bit_generator.state
    Xf, _ = t.sample_batch(10_000, rng)
    assert Xf is t.X_train and rng.bit_generator.state == state
    with pytest.raises(ValueError):
        t.sample_batch(0, rng)


def test_sampled_rows_match_labels(tasks):
    t = tasks["digits-clf"]
    rng = np.random.default_rng(4)
    state = rng.bit_generator.state
    X, Y = t.sample_batch(64, rng)
    rng2 = np.random.default_rng(4)
    rng2.bit_generator.state = state
    idx = rng2.choice(t.n_train, size=64, replace=False)
    assert len(set(idx.tolist())) == 64
    np.testing.assert_array_equal(X, t.X_train[idx])
    np.testing.assert_array_equal(Y, t.Y_train[idx])


def test_unknown_task():
    with pytest.raises(ValueError, match="unknown task"):
        load_task("mnist", 0)


def test_task_options():
    t = load_task("digits-ae", 0, init="sparse", activation="logistic")
    net = t.net_factory(np.random.default_rng(0))
    assert np.all(np.count_nonzero(net.params[0][:, :-1], axis=1) == 15)
    assert net.layers[0].activation == "logistic" and net.layers[3].activation == "linear"
    with pytest.raises(ValueError, match="unknown task option"):
        load_task("digits-clf", 0, width=3)
