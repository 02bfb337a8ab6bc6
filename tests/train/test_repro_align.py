"""Tests of bench/_repro_align.py (Botev et al. 2017 F.2 alignment experiment) on tiny networks."""

import importlib.util
import json
import os

import numpy as np
import pytest
from train_helpers import batch, tiny_conv, tiny_mlp

from kronlin.train import Dense, Net
from kronlin.train.losses import SigmoidBinaryCrossEntropy, SoftmaxCrossEntropy
from kronlin.train.optim.kfra import input_factors

pytest.importorskip("threadpoolctl")

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture(scope="module")
def al():
    spec = importlib.util.spec_from_file_location(
        "kronlin_bench_repro_align", os.path.join(ROOT, "bench", "_repro_align.py")
    )
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _bce_targets(net, n, seed=2):
    return np.random.default_rng(seed).random((n, net.out_size))


def _problem(loss_name, n, seed=0):
    """A tiny tanh/logistic MLP with a batch for softmax CE (labels) or sigmoid BCE (targets in [0, 1])."""
    net = tiny_mlp(seed)
    X, Y = batch(net, n, seed=seed + 1)
    if loss_name == "bce":
        return net, SigmoidBinaryCrossEntropy(), X, _bce_targets(net, n, seed + 2)
    return net, SoftmaxCrossEntropy(), X, Y


def _block_by_columns(net, trace, loss, layer):
    """The reference: column ``j`` is ``gn_vp`` of the ``j``-th unit weight (row-major)."""
    V = [np.zeros_like(W) for W in net.params]
    cols = []
    for j in range(net.params[layer].size):
        V[layer].flat[j] = 1.0
        cols.append(net.gn_vp(trace, loss, V)[layer].ravel())
        V[layer].flat[j] = 0.0
    return np.stack(cols, axis=1)


@pytest.mark.parametrize("loss_name", ["bce", "ce"])
def test_dense_gn_block_matches_gn_vp_columns(al, loss_name, monkeypatch):
    net, loss, X, _ = _problem(loss_name, 7)
    trace = net.forward(X)
    monkeypatch.setattr(al, "CHUNK_ENTRIES", 80)  # several example chunks (the last one short)
    for layer in (1, 2):
        G = al.dense_gn_block(net, trace, loss, layer)
        ref = _block_by_columns(net, trace, loss, layer)
        d = net.params[layer].size
        assert G.shape == (d, d)
        np.testing.assert_array_equal(G, G.T)
        assert np.linalg.norm(G - ref) <= 1e-10 * np.linalg.norm(ref)
        assert np.linalg.eigvalsh(G).min() > -1e-12 * np.linalg.norm(ref)


def test_dense_gn_block_rejects_conv(al):
    net = tiny_conv()
    trace = net.forward(np.random.default_rng(0).standard_normal((3, net.in_size)))
    with pytest.raises(ValueError, match="Dense"):
        al.dense_gn_block(net, trace, SoftmaxCrossEntropy(), 0)
    al.dense_gn_block(net, trace, SoftmaxCrossEntropy(), 1)  # the dense layer after it is fine


def test_kfac_probe_factor_conventions(al):
    net, loss, X, _ = _problem("ce", 9)
    trace = net.forward(X)
    f = al.probe_factors(net, loss, trace, np.random.default_rng(3))
    assert set(f) == {"kfac", "kfra", "kflr"}
    for i, Q in enumerate(input_factors(trace)):
        np.testing.assert_allclose(f["kfac"][i][0], Q, rtol=1e-12, atol=1e-14)
        assert f["kfra"][i][0] is not None and np.array_equal(f["kfra"][i][0], Q)
        for m in f:
            assert f[m][i][1].shape == (net.layers[i].d_out,) * 2
    # K-FAC's G is the sampled statistic: a different draw gives a different G, the same draw the same one
    g0 = al.probe_factors(net, loss, trace, np.random.default_rng(3), methods=("kfac",))["kfac"][0][1]
    g1 = al.probe_factors(net, loss, trace, np.random.default_rng(4), methods=("kfac",))["kfac"][0][1]
    np.testing.assert_array_equal(g0, f["kfac"][0][1])
    assert not np.allclose(g0, g1)
    with pytest.raises(ValueError, match="unknown methods"):
        al.probe_factors(net, loss, trace, np.random.default_rng(3), methods=("kfac", "ekfac"))


@pytest.mark.parametrize("loss_name", ["bce", "ce"])
def test_single_example_kflr_and_kfra_are_exact(al, loss_name):
    """At N = 1 the GN block is ``M ⊗ ā āᵀ`` (row-major) = KFLR's and KFRA's ``Q̃ ⊗ G̃`` (Botev C.4).

    So their exactly damped updates must equal the dense solve: this pins down the
    Kronecker ordering and flattening conventions between the dense block and kronlin.
    """
    net, loss, X, Y = _problem(loss_name, 1)
    layers = [0, 1, 2]
    res = al.alignment(net, loss, X, Y, k=1e-3, eta=1e-5, layers=layers, rng=np.random.default_rng(0),
                       return_updates=True)  # fmt: skip
    ups = res["updates"]
    for m in ("kflr", "kfra"):
        assert all(c > 1 - 1e-8 for c in res["cosine"][m])
        for u, e in zip(ups[m], ups["exact"]):
            assert np.linalg.norm(u - e) <= 1e-8 * np.linalg.norm(e)
    # the factored inversion (eq. 36) and a sampled K-FAC factor are genuinely different models
    assert any(c < 1 - 1e-6 for c in res["cosine"]["kflr*"])
    assert set(res["cosine"]) == {"sgd", "kfac", "kfac*", "kfra", "kfra*", "kflr", "kflr*"}


def test_alignment_general_batch(al):
    net, loss, X, Y = _problem("bce", 20, seed=5)
    k, eta, layers = 0.05, 1e-3, [2, 0]
    res = al.alignment(net, loss, X, Y, k=k, eta=eta, layers=layers, rng=np.random.default_rng(1), return_updates=True)
    for v, cos in res["cosine"].items():
        assert len(cos) == len(layers) and all(-1 - 1e-12 <= c <= 1 + 1e-12 for c in cos), v
    # the reference really solves (G + kI) x = -(∇ℓ + ηθ), layer by layer, in the weights' shape
    _, grads, trace = net.loss_and_grads(X, Y, loss)
    for j, li in enumerate(layers):
        g = grads[li] + eta * net.params[li]
        e = res["updates"]["exact"][j]
        V = [np.zeros_like(W) for W in net.params]
        V[li] = e
        np.testing.assert_allclose(net.gn_vp(trace, loss, V)[li] + k * e, -g, rtol=1e-9, atol=1e-12)
        assert res["grad_norm"][j] == pytest.approx(np.linalg.norm(g))
        assert res["cosine"]["sgd"][j] > 0  # gᵀ(G + kI)⁻¹g > 0
    # at N > 1 KFLR's Kronecker product is an approximation of the block, not the block
    assert min(res["cosine"]["kflr"]) < 1 - 1e-6
    # "*" is Botev eq. (36) with the trace-norm ω of eq. (38): −(G̃ + ω⁻¹√k I)⁻¹ ∇ (Q̃ + ω√k I)⁻¹
    f = al.probe_factors(net, loss, trace, np.random.default_rng(0), methods=("kfra",))["kfra"]
    for j, li in enumerate(layers):
        Q, G = f[li]
        w = np.sqrt((np.trace(Q) / len(Q)) / (np.trace(G) / len(G)))
        g = grads[li] + eta * net.params[li]
        ref = -np.linalg.solve(G + np.sqrt(k) / w * np.eye(len(G)), g) @ np.linalg.inv(
            Q + w * np.sqrt(k) * np.eye(len(Q))
        )
        np.testing.assert_allclose(res["updates"]["kfra*"][j], ref, rtol=1e-9, atol=1e-12)


def test_run_alignment_end_to_end(al, tmp_path):
    path = tmp_path / "align.json"
    rec = al.run_alignment("digits-ae", 0, steps=3, batch=64, probe_batch=64, at=(0, 3), max_params=300,
                           out_path=str(path))  # fmt: skip
    disk = json.loads(path.read_text())
    assert disk["layers"] == rec["layers"] == [3, 4]
    assert {"task", "seed", "trajectory", "steps", "batch", "probe_batch", "methods", "layers", "layer_shapes",
            "checkpoints"} <= set(disk)  # fmt: skip
    assert disk["trajectory"] == "kfra" and disk["layer_shapes"] == [[8, 33], [32, 9]]
    assert [c["iteration"] for c in disk["checkpoints"]] == [0, 3]
    for c in disk["checkpoints"]:
        assert {"iteration", "damping", "gamma", "seconds", "cosine"} <= set(c)
        assert c["damping"] == pytest.approx(c["gamma"] + 1e-5)
        assert set(c["cosine"]) == {"sgd", "kfac", "kfac*", "kfra", "kfra*", "kflr", "kflr*"}
        assert all(len(v) == 2 and all(-1 - 1e-9 <= x <= 1 + 1e-9 for x in v) for v in c["cosine"].values())
    with pytest.raises(ValueError, match="checkpoints"):
        al.run_alignment("digits-ae", 0, steps=1, batch=8, at=(2,), max_params=300)


def test_single_layer_net_is_exact_for_kflr(al):
    """A one-layer network (the output layer only): KFLR's factor is the mean output Hessian."""
    net = Net([Dense(3, 4, "linear")], np.random.default_rng(0), init="gaussian")
    X, Y = np.random.default_rng(1).standard_normal((1, 3)), np.array([2])
    res = al.alignment(net, SoftmaxCrossEntropy(), X, Y, k=1e-2, eta=0.0, layers=[0], rng=np.random.default_rng(0))
    assert res["cosine"]["kflr"][0] == pytest.approx(1.0, abs=1e-12)
