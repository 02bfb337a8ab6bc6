"""Tests of bench/_repro_progress.py (Benzing 2022 fig. 4C: K-FAC with and without its second factor)."""

import importlib.util
import os

import numpy as np
import pytest

from kronlin.train import get_loss
from kronlin.train.optim.kfac import KFAC

from train_helpers import batch, tiny_mlp

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture(scope="module")
def pr():
    spec = importlib.util.spec_from_file_location("kronlin_bench_repro_progress",
                                                  os.path.join(ROOT, "bench", "_repro_progress.py"))  # fmt: skip
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_first_factor_update_is_dense_and_norm_matched(pr):
    net, loss = tiny_mlp(), get_loss("softmax_ce")
    X, Y = batch(net, 20)
    opt = KFAC(net, loss)
    opt.step(X, Y)
    rng = np.random.default_rng(0)
    grads = [rng.standard_normal(W.shape) for W in net.params]
    like = [rng.standard_normal(W.shape) for W in net.params]
    D = pr.first_factor_update(grads, opt.factors, opt.gamma, like)
    for Dl, V, A, G, d in zip(D, grads, opt.factors["A_diag"], opt.factors["G_diag"], like):
        p, q = A.shape[0], G.shape[0]
        pi = np.sqrt((np.trace(A) / p) / (np.trace(G) / q))  # K-FAC §6.3's trace norm, from the real G
        M = np.kron(A + pi * opt.gamma * np.eye(p), np.eye(q))  # (Ā + πγI) ⊗ I, column-stacking vec
        ref = -np.linalg.solve(M, V.reshape(-1, order="F")).reshape(V.shape, order="F")
        np.testing.assert_allclose(Dl, ref * (np.linalg.norm(d) / np.linalg.norm(ref)), rtol=1e-10)
        assert np.linalg.norm(Dl) == pytest.approx(np.linalg.norm(d), rel=1e-12)


def test_run_progress_follows_kfac(pr):
    rec = pr.run_progress("digits-ae", 1, steps=6, batch=64, every=2)
    assert rec["step"] == [2, 4, 6] and len(rec["kfac"]) == len(rec["no_second_factor"]) == 3
    assert all(np.isfinite(rec["kfac"])) and all(np.isfinite(rec["no_second_factor"]))
    assert max(rec["kfac"]) > 0  # K-FAC makes progress on its own batch
