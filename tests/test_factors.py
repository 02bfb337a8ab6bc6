"""Factor estimates for weight-sharing layers: ``(N, T, d)`` inputs give KFC's ``Ā`` (Σ_t) and ``G`` ((1/T) Σ_t)."""

from __future__ import annotations

import numpy as np
import pytest

from kronlin import BlockDiagInverse, FactorEstimator, batch_factors

from helpers import on, rel_err, to_np


def _conv_batch(rng, N=6, T=5, d_in=4, d_out=3):
    return rng.standard_normal((N, T, d_in)), rng.standard_normal((N, T, d_out))


def _kfc(a, g, append_one):
    """Dense reference: Ā = (1/N) Σ_n Σ_t ā ā ᵀ, G = (1/(N T)) Σ_n Σ_t g gᵀ."""
    N, T = a.shape[:2]
    if append_one:
        a = np.concatenate([a, np.ones((N, T, 1))], axis=-1)
    A = sum(np.outer(a[n, t], a[n, t]) for n in range(N) for t in range(T)) / N
    G = sum(np.outer(g[n, t], g[n, t]) for n in range(N) for t in range(T)) / (N * T)
    return A, G


@pytest.mark.parametrize("append_one", [True, False])
def test_weight_sharing_layer_gives_kfc_factors(xp, append_one):
    rng = np.random.default_rng(0)
    (a, g), (x, e) = _conv_batch(rng), (rng.standard_normal((6, 7)), rng.standard_normal((6, 2)))
    f = batch_factors(on(xp, a, x), on(xp, g, e), append_one=append_one, tridiagonal=False)
    A_ref, G_ref = _kfc(a, g, append_one)
    assert rel_err(to_np(f["A_diag"][0]), A_ref) < 1e-13 and rel_err(to_np(f["G_diag"][0]), G_ref) < 1e-13
    xb = np.concatenate([x, np.ones((6, 1))], axis=1) if append_one else x
    assert rel_err(to_np(f["A_diag"][1]), xb.T @ xb / 6) < 1e-13  # the dense layer next to it is unchanged
    assert rel_err(to_np(f["G_diag"][1]), e.T @ e / 6) < 1e-13
    # the factors feed the block-diagonal inverse like any others
    V = [rng.standard_normal((3, 5 if append_one else 4)), rng.standard_normal((2, 8 if append_one else 7))]
    U = BlockDiagInverse(f["A_diag"], f["G_diag"], gamma=0.1).apply(on(xp, *V))
    assert all(np.all(np.isfinite(to_np(u))) for u in U)


def test_one_position_equals_the_dense_layer():
    rng = np.random.default_rng(1)
    a, g = _conv_batch(rng, T=1)
    f3 = batch_factors([a], [g], tridiagonal=False)
    f2 = batch_factors([a[:, 0]], [g[:, 0]], tridiagonal=False)
    for key in ("A_diag", "G_diag"):
        np.testing.assert_allclose(f3[key][0], f2[key][0], rtol=1e-15, atol=0)


def test_estimator_averages_weight_sharing_batches():
    rng = np.random.default_rng(2)
    batches = [_conv_batch(rng) for _ in range(3)]
    est = FactorEstimator(max_decay=0.5, tridiagonal=False)
    want = None
    for k, (a, g) in enumerate(batches):
        est.update([a], [g])
        b = batch_factors([a], [g], tridiagonal=False)
        eps = min(1 - 1 / (k + 1), 0.5)
        want = b if want is None else {key: [eps * w + (1 - eps) * n for w, n in zip(want[key], b[key])] for key in b}
    for key in ("A_diag", "G_diag"):
        assert rel_err(getattr(est, key)[0], want[key][0]) < 1e-14


def test_weight_sharing_validation():
    rng = np.random.default_rng(3)
    a, g = _conv_batch(rng)
    with pytest.raises(ValueError, match=r"acts\[0\].*tridiagonal=False"):
        batch_factors([a], [g])  # tridiagonal=True by default: no cross-layer factors for a conv layer
    with pytest.raises(ValueError, match=r"acts\[0\].*tridiagonal=False"):
        FactorEstimator().update([a], [g])
    with pytest.raises(ValueError, match=r"same number of positions"):
        batch_factors([a], [g[:, :4]], tridiagonal=False)
    with pytest.raises(ValueError, match=r"both be \(N, d\) or both \(N, T, d\)"):
        batch_factors([a], [g[:, 0]], tridiagonal=False)
    with pytest.raises(ValueError, match=r"\(N, T, d\)"):
        batch_factors([a[..., None]], [g], tridiagonal=False)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("layout", ["C", "F", "strided", "patches"])
def test_diagonal_factors_are_exactly_symmetric(dtype, layout):
    """NumPy's ``X.T @ X`` is taken as it comes for contiguous X (BLAS syrk); anything else is symmetrised."""
    rng = np.random.default_rng(4)
    for N, d in ((7, 5), (256, 129), (300, 257)):
        a = rng.standard_normal((N, 2 * d)).astype(dtype)
        a = {"C": np.ascontiguousarray(a[:, :d]), "F": np.asfortranarray(a[:, :d]), "strided": a[:, ::2],
             "patches": a.reshape(N, 2, d)}[layout]  # fmt: skip
        g = rng.standard_normal(a.shape[:-1] + (3,)).astype(dtype)
        for append_one in (False, True):
            f = batch_factors([a], [g], append_one=append_one, tridiagonal=False)
            for M in (f["A_diag"][0], f["G_diag"][0]):
                assert M.dtype == dtype and np.array_equal(M, M.T)
        rows = a.reshape(-1, a.shape[-1])
        ref = rows.astype(np.float64).T @ rows.astype(np.float64) / N
        tol = 1e-5 if dtype == "float32" else 1e-12  # float32 GEMM: eps·(accumulation) over N·T rows
        assert rel_err(batch_factors([a], [g], append_one=False, tridiagonal=False)["A_diag"][0], ref) < tol
