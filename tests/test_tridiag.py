"""Block-diagonal and block-tridiagonal inverse Fisher approximations on statistics of real small networks."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.linalg as sl

from kronlin import BlockDiagInverse, BlockTridiagInverse, FactorEstimator, Kron, batch_factors
from kronlin.testing import damped_tridiag, tanh_mlp, vec

from helpers import on, rel_err, to_np


def mlp_statistics(widths, N=200, seed=0):
    """Activations and sampled back-propagated vectors of a tanh MLP (K-FAC §2, §5; kronlin.testing.tanh_mlp)."""
    return tanh_mlp(np.random.default_rng(seed), widths, N)


NETS = [(4, 3), (3, 5, 2), (6, 4, 5, 3), (2, 7, 3, 4, 2)]


@pytest.mark.parametrize("widths", NETS)
@pytest.mark.parametrize("gamma", [0.0, 0.05, 1.0])
def test_tridiag_inverse_agrees_with_damped_fisher_on_tridiagonal_blocks(widths, gamma):
    acts, grads = mlp_statistics(widths, seed=len(widths))
    f = batch_factors(acts, grads)
    inv = BlockTridiagInverse(f["A_diag"], f["G_diag"], f["A_off"], f["G_off"], gamma=gamma)
    Finv = inv.to_dense()
    Fhat = np.linalg.inv(Finv)
    F, off, _ = damped_tridiag(f, gamma)
    n = len(f["A_diag"])
    for k in range(n):
        for j in range(n):
            sk, sj = slice(off[k], off[k + 1]), slice(off[j], off[j + 1])
            if abs(k - j) <= 1:
                # F̂ agrees with the damped F̃ on every tridiagonal block
                assert rel_err(Fhat[sk, sj], F[sk, sj]) < 1e-8, (k, j)
            else:
                # F̂⁻¹ is block-tridiagonal: exactly zero outside
                assert np.abs(Finv[sk, sj]).max() < 1e-12 * np.abs(Finv).max(), (k, j)
    # apply agrees with the dense inverse on weight-shaped blocks
    rng = np.random.default_rng(1)
    V = [rng.standard_normal(s) for s in inv.shapes]
    U = inv.apply(V)
    ref = Finv @ np.concatenate([vec(v) for v in V])
    assert rel_err(np.concatenate([vec(u) for u in U]), ref) < 1e-10
    # log det F̂
    assert abs(inv.logdet() - np.linalg.slogdet(Fhat)[1]) < 1e-8 * max(1, abs(inv.logdet()))


@pytest.mark.parametrize("widths", NETS)
@pytest.mark.parametrize("gamma", [0.0, 0.1])
def test_block_diag_against_dense(widths, gamma):
    acts, grads = mlp_statistics(widths, seed=3)
    f = batch_factors(acts, grads, tridiagonal=False)
    inv = BlockDiagInverse(f["A_diag"], f["G_diag"], gamma=gamma)
    F, off, _ = damped_tridiag({**f, "A_off": [], "G_off": []}, gamma)
    blocks = [F[off[k]:off[k + 1], off[k]:off[k + 1]] for k in range(len(f["A_diag"]))]
    dense = sl.block_diag(*[np.linalg.inv(B) for B in blocks])
    assert rel_err(inv.to_dense(), dense) < 1e-9
    rng = np.random.default_rng(2)
    V = [rng.standard_normal((3,) + s) for s in inv.shapes]  # batched right-hand sides
    U = inv.apply(V)
    for k, (u, v) in enumerate(zip(U, V)):
        ref = np.stack([np.linalg.solve(blocks[k], vec(x)) for x in v])
        assert rel_err(np.stack([vec(x) for x in u]), ref) < 1e-9
        assert Kron(f["A_diag"][k], f["G_diag"][k]).p == inv.shapes[k][1]
    assert abs(inv.logdet() - sum(np.linalg.slogdet(B)[1] for B in blocks)) < 1e-8


def test_one_layer_reduces_to_block_diagonal():
    acts, grads = mlp_statistics((5, 3), seed=4)
    f = batch_factors(acts, grads)
    tri = BlockTridiagInverse(f["A_diag"], f["G_diag"], [], [], gamma=0.1)
    diag = BlockDiagInverse(f["A_diag"], f["G_diag"], gamma=0.1)
    assert rel_err(tri.to_dense(), diag.to_dense()) < 1e-13


def test_smith_method_matches_eig():
    acts, grads = mlp_statistics((4, 5, 3, 2), seed=5)
    f = batch_factors(acts, grads)
    args = (f["A_diag"], f["G_diag"], f["A_off"], f["G_off"])
    a = BlockTridiagInverse(*args, gamma=0.3).to_dense()
    b = BlockTridiagInverse(*args, gamma=0.3, method="smith").to_dense()
    assert rel_err(b, a) < 1e-10


def test_array_api_strict_and_float32(xp):
    acts, grads = mlp_statistics((3, 4, 2), seed=6)
    f = batch_factors(acts, grads)
    ref = BlockTridiagInverse(f["A_diag"], f["G_diag"], f["A_off"], f["G_off"], gamma=0.2)
    V = [np.random.default_rng(0).standard_normal(s) for s in ref.shapes]
    for dtype, tol in (("float64", 1e-10), ("float32", 1e-3)):
        conv = {k: [on(xp, M, dtype=dtype) for M in v] for k, v in f.items()}
        inv = BlockTridiagInverse(conv["A_diag"], conv["G_diag"], conv["A_off"], conv["G_off"], gamma=0.2)
        U = inv.apply([on(xp, v, dtype=dtype) for v in V])
        assert to_np(U[0]).dtype == np.dtype(dtype)
        for u, r in zip(U, ref.apply(V)):
            assert rel_err(u, r) < tol


def test_inconsistent_statistics_name_the_layer_pair():
    acts, grads = mlp_statistics((3, 4, 2), seed=7)
    f = batch_factors(acts, grads)
    bad_off = [5.0 * f["A_off"][0]]  # a stale cross-layer factor far too large
    with pytest.raises(np.linalg.LinAlgError, match=r"Σ_\{1\|2\} \(layers 0 and 1\) is not positive definite.*increase the damping"):
        BlockTridiagInverse(f["A_diag"], f["G_diag"], bad_off, f["G_off"], gamma=0.0)


def test_validation_messages():
    acts, grads = mlp_statistics((3, 4, 2), seed=8)
    f = batch_factors(acts, grads)
    with pytest.raises(ValueError, match="A_off and G_off must hold 1 cross-layer factors for 2 layers"):
        BlockTridiagInverse(f["A_diag"], f["G_diag"], [], [])
    with pytest.raises(ValueError, match=r"A_off\[0\] must have shape \(4, 5\)"):
        BlockTridiagInverse(f["A_diag"], f["G_diag"], [f["A_off"][0].T], f["G_off"])
    with pytest.raises(ValueError, match="A_diag and G_diag must be non-empty lists of the same length"):
        BlockDiagInverse(f["A_diag"], f["G_diag"][:1])
    with pytest.raises(ValueError, match=r"G_diag\[1\] \(shape \(2, 2\)\) must be symmetric"):
        BlockDiagInverse(f["A_diag"], [f["G_diag"][0], np.array([[1.0, 2.0], [0.0, 1.0]])])
    inv = BlockDiagInverse(f["A_diag"], f["G_diag"], gamma=0.1)
    with pytest.raises(ValueError, match=r"V_list\[1\] must have shape \(\.\.\., d_out, d_in\) = \(\.\.\., 2, 5\)"):
        inv.apply([np.ones((4, 4)), np.ones((5, 2))])
    with pytest.raises(ValueError, match="one array per layer"):
        inv.apply([np.ones((4, 4))])


def test_update_refreshes_statistics():
    acts, grads = mlp_statistics((3, 4, 2), seed=9)
    acts2, grads2 = mlp_statistics((3, 4, 2), seed=10)
    f, f2 = batch_factors(acts, grads), batch_factors(acts2, grads2)
    inv = BlockTridiagInverse(f["A_diag"], f["G_diag"], f["A_off"], f["G_off"], gamma=0.1)
    inv.update(f2["A_diag"], f2["G_diag"], f2["A_off"], f2["G_off"])
    fresh = BlockTridiagInverse(f2["A_diag"], f2["G_diag"], f2["A_off"], f2["G_off"], gamma=0.1)
    assert rel_err(inv.to_dense(), fresh.to_dense()) < 1e-14
    with pytest.raises(ValueError, match="original layer shapes"):
        inv.update(f["A_diag"][:1], f["G_diag"][:1], [], [])


def test_factor_estimator_running_average():
    acts, grads = mlp_statistics((3, 4, 2), seed=11)
    acts2, grads2 = mlp_statistics((3, 4, 2), seed=12)
    acts3, grads3 = mlp_statistics((3, 4, 2), seed=13)
    est = FactorEstimator()
    est.update(acts, grads)  # k = 1: ε = 0, the batch estimate itself
    b1 = batch_factors(acts, grads)
    assert all(rel_err(x, y) == 0 for x, y in zip(est.A_off, b1["A_off"]))
    est.update(acts2, grads2)  # k = 2: ε = 1/2
    est.update(acts3, grads3)  # k = 3: ε = 2/3
    b2, b3 = batch_factors(acts2, grads2), batch_factors(acts3, grads3)
    for key in ("A_diag", "G_diag", "A_off", "G_off"):
        for got, x1, x2, x3 in zip(getattr(est, key), b1[key], b2[key], b3[key]):
            expect = (2 / 3) * (0.5 * x1 + 0.5 * x2) + (1 / 3) * x3
            assert rel_err(got, expect) < 1e-15
    # explicit check of a factor's definition: Ā_{0,0} = E[ā ā ᵀ] with the homogeneous coordinate
    abar = np.concatenate([acts[0], np.ones((len(acts[0]), 1))], axis=1)
    assert rel_err(b1["A_diag"][0], abar.T @ abar / len(abar)) < 1e-15
    assert rel_err(b1["G_off"][0], grads[0].T @ grads[1] / len(abar)) < 1e-15
    for _ in range(30):
        est.update(acts, grads)
    assert est.decay() == 0.95
    clone = FactorEstimator().load_state_dict(est.state_dict())
    assert clone.step == est.step and rel_err(clone.G_diag[1], est.G_diag[1]) == 0
    inv = est.block_tridiag_inverse(gamma=0.1)
    assert len(inv.apply([np.ones(s) for s in inv.shapes])) == 2
    with pytest.raises(ValueError, match="same batch"):
        est.update([acts[0], acts[1][:5]], grads)


# ------------------------------------------------------- assembled from parts made elsewhere (issue 14)
@pytest.mark.parametrize("widths", [(4, 3), (6, 4, 5, 3), (2, 7, 3, 4, 2), (5, 5, 5, 5)])  # last: one stack
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("method", ["eig", "smith"])
def test_from_parts_is_bit_identical_to_the_constructor(widths, dtype, method):
    import pickle

    from kronlin.tridiag import tridiag_parts

    acts, grads = mlp_statistics(widths, seed=7)
    f = {k: [M.astype(dtype) for M in v] for k, v in batch_factors(acts, grads).items()}
    args = (f["A_diag"], f["G_diag"], f["A_off"], f["G_off"])
    ref = BlockTridiagInverse(*args, gamma=0.05, method=method)
    n = len(f["A_diag"])
    # each part made by its own call (as on its own rank), sent through pickle, handed over out of order
    parts = [pickle.loads(pickle.dumps(p)) for i in reversed(range(n))
             for p in tridiag_parts(*args, [i], gamma=0.05, method=method)]  # fmt: skip
    inv = BlockTridiagInverse.from_parts(*args, parts, gamma=0.05, method=method)
    rng = np.random.default_rng(2)
    V = [rng.standard_normal(s).astype(dtype) for s in ref.shapes]
    for U, R in zip(inv.apply(V), ref.apply(V)):
        assert U.dtype == dtype
        np.testing.assert_array_equal(U, R)
    np.testing.assert_array_equal(inv.to_dense(), ref.to_dense())
    if method == "eig":
        assert inv.logdet() == ref.logdet()
    first = min(parts, key=lambda t: t.index)  # snapshot semantics: the parts handed over are not its state
    (first.psi_A if first.psi_A is not None else first.last.Ginv)[...] = 0.0
    np.testing.assert_array_equal(inv.apply(V)[0], ref.apply(V)[0])


def test_from_parts_refuses_missing_or_foreign_parts():
    import dataclasses

    from kronlin.tridiag import tridiag_parts

    acts, grads = mlp_statistics((6, 4, 5, 3), seed=7)
    f = batch_factors(acts, grads)
    args = (f["A_diag"], f["G_diag"], f["A_off"], f["G_off"])
    parts = tridiag_parts(*args, [0, 1, 2], gamma=0.1)
    msg = r"one TridiagPart for each index 0, …, 2 \(3 layers\); got indices \[0, 1\]"
    with pytest.raises(ValueError, match=msg):
        BlockTridiagInverse.from_parts(*args, parts[:2], gamma=0.1)
    with pytest.raises(ValueError, match=r"parts\[0\] is not the set-up of layers 0 and 1"):
        BlockTridiagInverse.from_parts(*args, [dataclasses.replace(parts[1], index=0)] + parts[1:],
                                       gamma=0.1)  # pair 1's set-up labelled as pair 0
    with pytest.raises(ValueError, match=r"part indices must be in \[0, 2\] for 3 layers; got \[3\]"):
        tridiag_parts(*args, [3])
    f32 = {k: [M.astype(np.float32) for M in v] for k, v in f.items()}
    with pytest.raises(ValueError, match=r"parts\[2\] is not the last layer's inverse"):
        BlockTridiagInverse.from_parts(f32["A_diag"], f32["G_diag"], f32["A_off"], f32["G_off"],
                                       tridiag_parts(f32["A_diag"], f32["G_diag"], f32["A_off"], f32["G_off"], [0, 1])
                                       + parts[2:], gamma=0.1)  # fmt: skip


def test_tridiag_parts_raise_what_the_constructor_raises():
    from kronlin.tridiag import tridiag_parts

    acts, grads = mlp_statistics((3, 4, 2), seed=7)
    f = batch_factors(acts, grads)
    f["A_off"][0] = 5.0 * f["A_off"][0]  # a stale cross-layer factor far too large: Σ_{1|2} indefinite
    args = (f["A_diag"], f["G_diag"], f["A_off"], f["G_off"])
    with pytest.raises(np.linalg.LinAlgError, match=r"Σ_\{1\|2\} \(layers 0 and 1\)"):
        BlockTridiagInverse(*args)
    with pytest.raises(np.linalg.LinAlgError, match=r"Σ_\{1\|2\} \(layers 0 and 1\)"):
        tridiag_parts(*args, [0])
    assert tridiag_parts(*args, [1])[0].last is not None  # the last layer alone does not need pair 0
