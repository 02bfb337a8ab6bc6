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


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_running_average_is_the_decayed_mean_of_the_batches(xp, dtype):
    """K-FAC §5: after batches b_1..b_k, ε_j = min(1 − 1/j, max_decay); the update folds (1 − ε) into the
    second moment's scaling and adds ε·old in one pass (BLAS axpy on NumPy), so check it against the
    plain recursion in float64, with cross-layer factors, and that the averages stay exactly symmetric."""
    rng = np.random.default_rng(11)
    est = FactorEstimator(max_decay=0.9, tridiagonal=True, append_one=True)
    ref = None
    for j in range(1, 5):
        acts = [rng.standard_normal((9, 4)), rng.standard_normal((9, 3))]
        grads = [rng.standard_normal((9, 3)), rng.standard_normal((9, 2))]
        est.update([on(xp, a, dtype=dtype) for a in acts], [on(xp, g, dtype=dtype) for g in grads])
        a1 = [np.concatenate([a, np.ones((9, 1))], axis=1) for a in acts]
        batch = {"A_diag": [a.T @ a / 9 for a in a1], "G_diag": [g.T @ g / 9 for g in grads],
                 "A_off": [a1[0].T @ a1[1] / 9], "G_off": [grads[0].T @ grads[1] / 9]}  # fmt: skip
        eps = min(1 - 1 / j, 0.9)
        ref = batch if ref is None else {k: [eps * o + (1 - eps) * b for o, b in zip(ref[k], batch[k])] for k in ref}
    tol = 1e-6 if dtype == "float32" else 1e-14  # a few roundings of O(1) sums of 9 products per update
    for key in ("A_diag", "G_diag", "A_off", "G_off"):
        for got, want in zip(getattr(est, key), ref[key]):
            assert rel_err(got, want) < tol, key
    for M in est.A_diag + est.G_diag:
        assert np.array_equal(to_np(M), to_np(M).T)


def test_nonfinite_input_is_named_although_only_the_diagonals_are_checked():
    """The estimates' diagonals decide (a NaN or inf in an input column reaches its diagonal entry);
    the error still names the input, and the averages stay as they were."""
    rng = np.random.default_rng(2)
    acts, grads = [rng.standard_normal((5, 3)), rng.standard_normal((5, 4))], [rng.standard_normal((5, 4)),
                                                                              rng.standard_normal((5, 2))]
    est = FactorEstimator(tridiagonal=True).update(acts, grads)
    before = [M.copy() for M in est.A_diag + est.G_diag]
    for k, (what, bad) in enumerate((("grads", np.nan), ("acts", np.inf))):
        arrs = {"acts": [a.copy() for a in acts], "grads": [g.copy() for g in grads]}
        arrs[what][1][3, 1] = bad
        with pytest.raises(ValueError, match=rf"^{what}\[1\] \(shape .*\) contains NaN or infinity"):
            est.update(arrs["acts"], arrs["grads"])
        with pytest.raises(ValueError, match=rf"^{what}\[1\] "):
            batch_factors(arrs["acts"], arrs["grads"])
    assert est.step == 1
    for M, B in zip(est.A_diag + est.G_diag, before):
        assert np.array_equal(M, B)


def test_copy_is_a_snapshot_without_array_copies():
    """copy.copy(estimator) keeps the averages it was taken with: update() never writes into them."""
    import copy

    rng = np.random.default_rng(5)

    def batch():
        return [rng.standard_normal((6, 3))], [rng.standard_normal((6, 2))]

    est = FactorEstimator(tridiagonal=False).update(*batch())
    snap = copy.copy(est)
    kept = [M.copy() for M in est.A_diag + est.G_diag]
    est.update(*batch())
    est.update(*batch())
    assert snap.step == 1 and est.step == 3
    for M, K in zip(snap.A_diag + snap.G_diag, kept):
        assert np.array_equal(M, K)
    snap.update(*batch())  # the snapshot goes on independently
    assert snap.step == 2 and est.step == 3
    assert not np.array_equal(snap.A_diag[0], est.A_diag[0])


def test_fold_of_batch_factors_equals_update():
    """fold(batch_factors(...)) — the path of statistics reduced across processes — gives update's
    averages to round-off (the scaling by (1 − ε)/N is one multiplication there, two here)."""
    rng = np.random.default_rng(8)
    a, b = FactorEstimator(tridiagonal=True), FactorEstimator(tridiagonal=True)
    for _ in range(4):
        acts = [rng.standard_normal((7, 3)), rng.standard_normal((7, 4))]
        grads = [rng.standard_normal((7, 4)), rng.standard_normal((7, 2))]
        a.update(acts, grads)
        b.fold(batch_factors(acts, grads))
    assert a.step == b.step == 4
    for key in ("A_diag", "G_diag", "A_off", "G_off"):
        for x, y in zip(getattr(a, key), getattr(b, key)):
            assert rel_err(y, x) < 1e-14


def test_fold_refuses_a_malformed_batch_and_changes_nothing():
    rng = np.random.default_rng(9)
    acts, grads = [rng.standard_normal((6, 3))], [rng.standard_normal((6, 2))]
    est = FactorEstimator(tridiagonal=False).update(acts, grads)
    kept = [M.copy() for M in est.A_diag + est.G_diag]
    good = batch_factors(acts, grads, tridiagonal=False)
    nan = {**good, "G_diag": [np.full((2, 2), np.nan)]}
    cases = [
        ({k: v for k, v in good.items() if k != "G_off"}, r"batch is missing 'G_off'"),
        ({**good, "A_diag": [np.eye(5)]}, r"batch\['A_diag'\] has shapes \[\(5, 5\)\] but the running averages have \[\(4, 4\)\]"),
        ({**good, "A_diag": [np.ones((4, 3))]}, r"batch\['A_diag'\]\[0\] \(A_diag\[0\]\) has shape \(4, 3\); expected \(4, 4\)"),
        (nan, r"batch\['G_diag'\]\[0\] \(G_diag\[0\]\) \(shape \(2, 2\)\) contains NaN"),
        ({**good, "A_off": [np.eye(4)]}, r"batch\['A_off'\] must hold 0 matrices"),
    ]
    for batch, match in cases:
        with pytest.raises(ValueError, match=r"^FactorEstimator\.fold: " + match):
            est.fold(batch)
    assert est.step == 1
    for M, K in zip(est.A_diag + est.G_diag, kept):
        assert np.array_equal(M, K)


@pytest.mark.parametrize("what", ["acts", "grads"])
def test_nonfinite_input_is_named_on_every_backend(xp, what):
    """Other libraries than NumPy test all the factors' diagonals in one reduction (one device-to-host
    synchronisation on CuPy); the error names the same input, for every layer position."""
    rng = np.random.default_rng(3)
    acts = [rng.standard_normal((6, d)) for d in (3, 4, 2)]
    grads = [rng.standard_normal((6, d)) for d in (4, 2, 5)]
    for k in range(3):
        arrs = {"acts": [a.copy() for a in acts], "grads": [g.copy() for g in grads]}
        arrs[what][k][2, 0] = np.inf
        est = FactorEstimator(tridiagonal=False)
        with pytest.raises(ValueError, match=rf"^{what}\[{k}\] \(shape .*\) contains NaN or infinity"):
            est.update([on(xp, a) for a in arrs["acts"]], [on(xp, g) for g in arrs["grads"]])
        assert est.step == 0
    huge = [a * 1e200 for a in acts]  # finite inputs whose second moments overflow: the statistics are named
    with pytest.raises(FloatingPointError, match=r"A_diag\[0\] \(the second moment of acts\[0\]\)"):
        FactorEstimator().update([on(xp, a) for a in huge], [on(xp, g) for g in grads])
