"""BlockDiagInverse groups equal-shaped layers into stacks (issue 13 item 3): same results as layer by layer.

References: the dense ``(A + πγI)⁻¹ ⊗ (G + γ/π I)⁻¹`` per layer (``np.kron``, ``scipy.linalg.inv``) and the
one-layer operator (which has nothing to group).
"""

from __future__ import annotations

import numpy as np
import pytest
import scipy.linalg as sl

from kronlin import BlockDiagInverse, pi_factor
from kronlin._kernels.symmetric import asymmetry_reference

from badinput import layout
from helpers import DTYPES, on, rel_err, to_np, tol
from kronlin.testing import spd, unvec, vec

# three layers of one shape (a stack), one pair of another, one alone
SHAPES = [(6, 8), (6, 8), (4, 5), (6, 8), (4, 5), (3, 3)]  # (q, p)


def _layers(rng, cond=30.0):
    return [spd(rng, p, cond) for q, p in SHAPES], [spd(rng, q, cond) for q, p in SHAPES]


def _dense_layer(A, G, gamma, pi):
    p, q = A.shape[0], G.shape[0]
    pv = float(pi_factor(A, G, pi)) if isinstance(pi, str) else pi
    Ad, Gd = A + pv * gamma * np.eye(p), G + gamma / pv * np.eye(q)
    return np.kron(sl.inv(Ad), sl.inv(Gd)), np.linalg.slogdet(np.kron(Ad, Gd))[1]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("gamma,pi", [(0.0, "trace"), (0.1, "trace"), (0.1, "fro"), (0.3, 2.0)])
def test_grouped_against_dense_and_per_layer(xp, dtype, gamma, pi):
    rng = np.random.default_rng(0)
    As, Gs = _layers(rng)
    Vs = [rng.standard_normal(s) for s in SHAPES]
    op = BlockDiagInverse(on(xp, *As, dtype=dtype), on(xp, *Gs, dtype=dtype), gamma=gamma, pi=pi)
    got = op.apply(on(xp, *Vs, dtype=dtype))
    ld = 0.0
    for k, (A, G, V) in enumerate(zip(As, Gs, Vs)):
        D, l = _dense_layer(A, G, gamma, pi)
        ld += l
        assert to_np(got[k]).dtype == np.dtype(dtype)
        assert rel_err(got[k], unvec(D @ vec(V), *SHAPES[k])) < tol(dtype, 30.0**2)
        one = BlockDiagInverse([on(xp, A, dtype=dtype)],
                               [on(xp, G, dtype=dtype)], gamma=gamma, pi=pi)  # fmt: skip
        # identical to the layer alone up to rounding (stacked LAPACK calls are the same per matrix)
        assert rel_err(got[k], one.apply([on(xp, V, dtype=dtype)])[0]) < tol(dtype, 30.0)
    assert abs(float(op.logdet()) - ld) <= tol(dtype, 30.0) * abs(ld) + tol(dtype)


def test_stack_with_an_indefinite_factor_falls_back_per_layer():
    """A stack whose damped factor is not positive definite is factorized layer by layer (LU), as before."""
    rng = np.random.default_rng(1)
    As, Gs = _layers(rng)
    As[3] = As[3] - 2.0 * np.eye(8) * np.abs(np.linalg.eigvalsh(As[3])).max()  # negative definite, invertible
    Vs = [rng.standard_normal(s) for s in SHAPES]
    got = BlockDiagInverse(As, Gs).apply(Vs)
    for k in range(len(SHAPES)):
        ref = unvec(np.kron(sl.inv(As[k]), sl.inv(Gs[k])) @ vec(Vs[k]), *SHAPES[k])
        assert rel_err(got[k], ref) < tol("float64", 1e3)
    # det(A ⊗ G) = det(A)^q det(G)^p > 0 here (q = 6 is even): the layer-by-layer LU log-determinant
    ld = sum(np.linalg.slogdet(np.kron(A, G))[1] for A, G in zip(As, Gs))
    assert abs(float(BlockDiagInverse(As, Gs).logdet()) - ld) < 1e-10 * abs(ld)


@pytest.mark.parametrize("case", ["indefinite", "doubtful pivots", "singular"])
@pytest.mark.parametrize("k", [3, 5])
def test_factors_factorized_in_place_are_rebuilt_from_the_inputs(case, k):
    """Damped factors are factorized in their own memory: a stack (layer 3 is in one) or a lone layer's pair
    (layer 5) whose Cholesky fails (indefinite), whose pivot ratio is below sqrt(eps) (judged again with the
    condition estimate), or that is singular, is damped again from the inputs: the same results and errors
    as the layer alone, the inputs untouched, and no reference to them kept."""
    rng = np.random.default_rng(4)
    As, Gs = _layers(rng)
    p = As[k].shape[0]
    if case == "indefinite":
        As[k] = As[k] - 2.0 * np.eye(p) * np.abs(np.linalg.eigvalsh(As[k])).max()
    elif case == "doubtful pivots":  # PD, condition 1e9: pivot ratio ~1e-9 < sqrt(eps), above the singular tolerance
        Q, _ = np.linalg.qr(rng.standard_normal((p, p)))
        As[k] = (Q * np.logspace(0, -9, p)) @ Q.T
        As[k] = (As[k] + As[k].T) / 2
    else:  # rank p - 1, undamped: singular
        X = rng.standard_normal((p - 1, p))
        As[k] = X.T @ X
    kept = [M.copy() for M in As + Gs]
    Vs = [rng.standard_normal(s) for s in SHAPES]
    if case == "singular":
        with pytest.raises(np.linalg.LinAlgError, match=rf"A_diag\[{k}\]"):
            BlockDiagInverse(As, Gs)
    else:
        op = BlockDiagInverse(As, Gs)
        got = op.apply(Vs)
        for j in range(len(SHAPES)):
            ref = unvec(np.kron(sl.inv(As[j]), sl.inv(Gs[j])) @ vec(Vs[j]), *SHAPES[j])
            assert rel_err(got[j], ref) < tol("float64", 1e9 if j == k else 1e3)
            one = BlockDiagInverse([As[j]], [Gs[j]]).apply([Vs[j]])[0]
            assert rel_err(got[j], one) < tol("float64", 1e9 if j == k else 30.0)
        assert not hasattr(op, "_sources")
    assert all(np.array_equal(a, b) for a, b in zip(As + Gs, kept))


@pytest.mark.parametrize("bad,match", [("nan", r"A_diag\[3\].*NaN"), ("asym", r"G_diag\[3\].*symmetric")])
def test_errors_in_a_stack_name_the_layer(bad, match):
    rng = np.random.default_rng(2)
    As, Gs = _layers(rng)
    if bad == "nan":
        As[3] = As[3].copy()
        As[3][1, 2] = np.nan
    else:
        Gs[3] = Gs[3] + np.triu(np.ones((6, 6)), 1)
    with pytest.raises(ValueError, match=match):
        BlockDiagInverse(As, Gs, gamma=0.1)


def test_update_keeps_grouping_and_matches_fresh():
    rng = np.random.default_rng(3)
    As, Gs = _layers(rng)
    op = BlockDiagInverse(As, Gs, gamma=0.1)
    As2, Gs2 = _layers(rng)
    Vs = [rng.standard_normal(s) for s in SHAPES]
    fresh = BlockDiagInverse(As2, Gs2, gamma=0.1).apply(Vs)
    for a, b in zip(op.update(As2, Gs2).apply(Vs), fresh):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("lead,v_dtype", [((), "float32"), ((), "float64"), ((2,), "float32"), ((3, 1), "float64")])
def test_stacked_apply_matches_the_layers_for_batched_and_mixed_rhs(lead, v_dtype):
    """Equal-shaped layers with 2-D blocks of the operator's dtype go through one batched product per
    group; batched blocks (leading dims) and other dtypes take the per-layer products: all agree."""
    rng = np.random.default_rng(3)
    As, Gs = _layers(rng)
    op = BlockDiagInverse([A.astype(np.float32) for A in As], [G.astype(np.float32) for G in Gs], gamma=0.1)
    Vs = [rng.standard_normal(lead + s).astype(v_dtype) for s in SHAPES]
    got = op.apply(Vs)
    for k, (A, G, V) in enumerate(zip(As, Gs, Vs)):
        one = BlockDiagInverse([A.astype(np.float32)], [G.astype(np.float32)], gamma=0.1).apply([V])[0]
        assert got[k].shape == V.shape and got[k].dtype == one.dtype
        assert rel_err(got[k], one) < tol("float32", 30.0)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("k", [1, 3, 4])  # in the stack of three, in the pair
def test_stacked_apply_names_a_nonfinite_block(xp, bad, k):
    """The stacked groups check their results only (SPD inverses carry a NaN or infinity of a block
    into the result); the error still names the block, as the per-layer check does.  Off NumPy all results
    are tested in one reduction at the end (one synchronisation on CuPy)."""
    rng = np.random.default_rng(4)
    As, Gs = _layers(rng)
    op = BlockDiagInverse([on(xp, A) for A in As], [on(xp, G) for G in Gs], gamma=0.1)
    Vs = [rng.standard_normal(s) for s in SHAPES]
    Vs[k][1, 2] = bad
    with pytest.raises(ValueError, match=rf"^V_list\[{k}\] \(shape \({SHAPES[k][0]}, {SHAPES[k][1]}\)\) contains NaN"):
        op.apply([on(xp, V) for V in Vs])


def test_stacked_apply_overflow_is_a_floating_point_error(xp):
    rng = np.random.default_rng(5)
    As, Gs = _layers(rng)
    As, Gs = [1e-3 * A for A in As], [1e-3 * G for G in Gs]  # small factors: the inverse amplifies by ~1e6
    op = BlockDiagInverse([on(xp, A, dtype="float32") for A in As], [on(xp, G, dtype="float32") for G in Gs],
                          gamma=1e-3)
    Vs = [rng.standard_normal(s) for s in SHAPES]
    # scale block 0 so that G⁻¹ V A⁻ᵀ reaches 1e39 (computed in float64) while V stays finite in float32
    ref = BlockDiagInverse(As[:1], Gs[:1], gamma=1e-3).apply(Vs[:1])[0]
    Vs[0] *= 1e39 / np.abs(ref).max()
    assert np.abs(Vs[0]).max() < np.finfo(np.float32).max
    with pytest.raises(FloatingPointError, match=r"BlockDiagInverse\.apply\(\) is not finite"):
        op.apply([on(xp, V, dtype="float32") for V in Vs])


def test_a_groups_two_stacks_share_one_allocation():
    """NumPy: the damped A and G stacks of a group are views of one buffer (what glibc keeps for the next
    refresh; two halves freed together were trimmed and page-faulted in again), equal to np.stack."""
    from kronlin.tridiag import _stack_pair

    rng = np.random.default_rng(6)
    As = [rng.standard_normal((4, 4)) for _ in range(3)]
    Gs = [rng.standard_normal((2, 2)) for _ in range(3)]
    SA, SG, measured = _stack_pair(np, As, Gs)
    assert np.array_equal(SA, np.stack(As)) and np.array_equal(SG, np.stack(Gs))
    assert SA.base is not None and SA.base is SG.base and SA.flags.c_contiguous and SG.flags.c_contiguous
    # each stack's symmetry measured while it was copied in: what the symmetry test of the stack gives
    assert measured == (asymmetry_reference(np, SA), asymmetry_reference(np, SG))
    SA2, SG2, measured2 = _stack_pair(np, As, [G.astype(np.float32) for G in Gs])  # two dtypes: two stacks
    assert SA2.dtype == np.float64 and SG2.dtype == np.float32 and np.array_equal(SG2, np.stack(Gs).astype(np.float32))
    assert measured2 is None


def test_stacked_apply_results_are_independent_arrays():
    """A group's results are rows of one result stack: writing into one leaves the other layers' results and
    the operator alone, and every call returns new arrays (nothing is reused across calls)."""
    rng = np.random.default_rng(6)
    As, Gs = _layers(rng)
    op = BlockDiagInverse(As, Gs, gamma=0.1)
    Vs = [rng.standard_normal(s) for s in SHAPES]
    first = op.apply(Vs)
    kept = [y.copy() for y in first]
    second = op.apply(Vs)
    for y in first:
        y[...] = np.nan  # the caller owns its results
    for k, (y, ref) in enumerate(zip(second, kept)):
        np.testing.assert_array_equal(y, ref)
        assert not any(np.shares_memory(y, z) for z in first)
        assert y.shape == SHAPES[k] and y.flags.writeable
    np.testing.assert_array_equal(op.apply(Vs)[0], kept[0])


STACKED = [(6, 8), (6, 8), (4, 5), (6, 8), (4, 5)]  # every layer in a stack: two groups


@pytest.mark.parametrize("shapes", [STACKED, [(6, 8)] * 4])
@pytest.mark.parametrize("dtype", DTYPES)
def test_all_stacked_apply_takes_the_blocks_as_they_come(monkeypatch, shapes, dtype):
    """Where every layer is in a stack, apply hands the blocks to the compiled loop unvalidated; the loop
    judges them (NumPy ndarray, aligned, C-contiguous, the operator's dtype and the layer's shape) and refuses
    the rest to the general way: every kind of block gives the per-layer dense answer (or the general way's
    error), with the kernel or without it."""
    from kronlin import kernels
    from kronlin import tridiag

    calls = []
    real = tridiag.block_apply_compiled
    monkeypatch.setattr(tridiag, "block_apply_compiled", lambda *a: calls.append(1) or real(*a))
    rng = np.random.default_rng(7)
    As, Gs = [spd(rng, p, 30.0) for q, p in shapes], [spd(rng, q, 30.0) for q, p in shapes]
    op = BlockDiagInverse([A.astype(dtype) for A in As], [G.astype(dtype) for G in Gs], gamma=0.1)
    Vs = [rng.standard_normal(s).astype(dtype) for s in shapes]
    dense = [_dense_layer(A, G, 0.1, "trace")[0] for A, G in zip(As, Gs)]
    other = np.float32 if np.dtype(dtype) == np.float64 else np.float64
    kinds = {"as they come": Vs, "a tuple": tuple(Vs),
             **{how: [layout(how, V) for V in Vs] for how in ("fortran", "byteswap", "unaligned", "subclass")},
             "another dtype": [V.astype(other) for V in Vs],
             "batched": [V[None] for V in Vs],
             "nested lists": [V.tolist() for V in Vs]}  # fmt: skip
    for name, Vx in kinds.items():
        calls.clear()
        got = op.apply(Vx)
        with kernels.disabled():
            plain = op.apply(Vx)
        for k, (D, V, y) in enumerate(zip(dense, Vs, got)):
            ref = unvec(D @ vec(V.astype(np.float64)), *shapes[k])
            assert np.shape(y) == np.shape(Vx[k]), name
            # the less precise of the operator's and the block's dtypes bounds the rounding
            low = min(np.dtype(dtype), np.asarray(Vx[k]).dtype, key=lambda d: d.itemsize)
            assert np.asarray(y).dtype == np.result_type(dtype, np.asarray(Vx[k]).dtype.newbyteorder("=")), name
            assert rel_err(np.reshape(y, shapes[k]), ref) < tol(low, 30.0**2), name
            assert rel_err(np.reshape(plain[k], shapes[k]), ref) < tol(low, 30.0**2), name
        assert calls, name  # the compiled loop was asked first, and ...
        if name in ("as they come", "a tuple") and kernels.compiled(np) is not None:
            assert got[0].base is not None and got[0].base is got[shapes.index(shapes[0], 1)].base  # ... served them
    # one non-finite block: the general way names it
    Vs[2] = Vs[2].copy()
    Vs[2][1, 1] = np.nan
    with pytest.raises(ValueError, match=rf"^V_list\[2\] \(shape \({shapes[2][0]}, {shapes[2][1]}\)\) contains NaN"):
        op.apply(Vs)
    with pytest.raises(ValueError, match="one array per layer"):
        op.apply(Vs[:-1])
    # finite blocks whose result overflows: the general way's FloatingPointError (small factors: the inverse
    # amplifies by ~1e6, so a finite block reaches 4x the dtype's largest number)
    small = BlockDiagInverse([1e-3 * A.astype(dtype) for A in As], [1e-3 * G.astype(dtype) for G in Gs], gamma=1e-3)
    Vs = [np.ones(s, dtype=dtype) for s in shapes]
    r = max(float(np.abs(y).max()) for y in small.apply(Vs))
    Vs[2] = np.full(shapes[2], 4 * (float(np.finfo(dtype).max) / r), dtype=dtype)
    assert np.all(np.isfinite(Vs[2]))
    with pytest.raises(FloatingPointError, match=r"BlockDiagInverse\.apply\(\) is not finite"):
        small.apply(Vs)


@pytest.mark.parametrize("how", ["unaligned", "fortran", "byteswap", "readonly", "strided", "subclass"])
def test_stacked_factors_of_any_layout(how):
    """A stack's factors are copied in by the compiled kernel where it reads them in place, by NumPy where it
    does not (an unaligned factor was refused with an error by the kernel's check for one session): the
    operator and its results are those of C-ordered factors, bit for bit."""
    rng = np.random.default_rng(8)
    As, Gs = _layers(rng)
    Vs = [rng.standard_normal(s) for s in SHAPES]
    As2, Gs2 = [layout(how, A) for A in As], [layout(how, G) for G in Gs]
    if how == "unaligned":
        assert not any(M.flags.aligned for M in As2 + Gs2)
    ref = BlockDiagInverse(As, Gs, gamma=0.1)
    op = BlockDiagInverse(As2, Gs2, gamma=0.1)
    for a, b in zip(op.apply(Vs), ref.apply(Vs)):
        np.testing.assert_array_equal(a, b)
    assert float(op.logdet()) == float(ref.logdet())
