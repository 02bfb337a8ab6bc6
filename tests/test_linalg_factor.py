"""kronlin._linalg.Factor.inv: the explicit inverses behind Kron.inv() and the block inverses."""

from __future__ import annotations

import numpy as np
import pytest

from kronlin._linalg import Factor
from kronlin.testing import spd

from helpers import on, rel_err, to_np


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("n", [1, 7, 130])
def test_cholesky_inverse_is_exact_symmetric_and_accurate(xp, dtype, n):
    rng = np.random.default_rng(n)
    M = spd(rng, n, cond=1e3)
    f = Factor(xp, on(xp, M, dtype=dtype), "M")
    assert f.kind == "cholesky"
    Minv = to_np(f.inv())
    assert Minv.dtype == dtype and np.array_equal(Minv, Minv.T)
    # backward error of the defining equation, scaled by cond: eps·cond·n-ish in each dtype
    tol = 2e-3 if dtype == "float32" else 1e-10
    assert rel_err(Minv, np.linalg.inv(M)) < tol
    assert np.linalg.norm(M @ Minv.astype(np.float64) - np.eye(n)) / np.sqrt(n) < tol


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("B, n", [(3, 6), (2, 260)])
def test_stacked_cholesky_inverse_on_each_route(xp, dtype, B, n):
    # n = 260 is above CUPY_TRSM_LOOP_MIN_N: on CuPy the triangular solves loop over the stack
    rng = np.random.default_rng(n)
    S = np.stack([spd(rng, n, cond=1e2) for _ in range(B)])
    f = Factor(xp, on(xp, S, dtype=dtype), "S")
    assert f.kind == "cholesky" and f.batched
    Sinv = to_np(f.inv())
    assert Sinv.dtype == dtype and np.array_equal(Sinv, np.swapaxes(Sinv, -1, -2))
    tol = 1e-4 if dtype == "float32" else 1e-12  # eps · cond · modest n in each dtype
    assert rel_err(Sinv, np.linalg.inv(S)) < tol
    X = rng.standard_normal((B, n, 3))
    assert rel_err(to_np(f.solve(on(xp, X, dtype=dtype))), np.linalg.solve(S, X)) < tol


@pytest.mark.parametrize("trans", [False, True])
def test_tri_solve_loop_broadcasts_like_the_batched_solve(trans):
    import scipy.linalg

    from kronlin._linalg import _tri_solve_loop

    rng = np.random.default_rng(0)
    L = np.tril(rng.standard_normal((2, 1, 5, 5))) + 4 * np.eye(5)
    Bm = rng.standard_normal((3, 5, 2))
    got = _tri_solve_loop(np, scipy.linalg, L, Bm, trans)
    Lb = np.broadcast_to(L, (2, 3, 5, 5))
    want = np.linalg.solve(np.swapaxes(Lb, -1, -2) if trans else Lb, np.broadcast_to(Bm, (2, 3, 5, 2)))
    assert got.shape == (2, 3, 5, 2) and rel_err(got, want) < 1e-13


def test_eigh_loop_equals_the_stacked_call():
    from kronlin._linalg import _eigh_loop

    rng = np.random.default_rng(1)
    M = np.stack([spd(rng, 7) for _ in range(6)]).reshape(2, 3, 7, 7)
    w, Q = _eigh_loop(np, M)
    w0, _ = np.linalg.eigh(M)
    assert w.shape == (2, 3, 7) and Q.shape == M.shape and rel_err(w, w0) < 1e-13
    assert rel_err((Q * w[..., None, :]) @ np.swapaxes(Q, -1, -2), M) < 1e-13


def test_cupy_stacked_eigh_rule_follows_the_measurements():
    from kronlin._linalg import cupy_stacks_eigh

    # bench/results/gpu-eigh-routes.md: stacked syevj wins for many small matrices, the syevd loop for
    # few or large ones (2 x 2049², K-FAC's two hidden layers of a 2048-wide MLP: 398 against 26 ms)
    assert cupy_stacks_eigh(200, 64, np.float32) and cupy_stacks_eigh(2, 64, np.float64)
    assert cupy_stacks_eigh(16, 128, np.float32) and not cupy_stacks_eigh(2, 128, np.float32)
    assert not cupy_stacks_eigh(16, 256, np.float32) and not cupy_stacks_eigh(2, 2049, np.float32)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_a_stacked_eigh_result_outside_the_bound_is_recomputed(dtype):
    from kronlin._linalg import EIGH_STACK_TOL, _eigh_stack_checked

    rng = np.random.default_rng(2)
    n = 9
    M = np.stack([spd(rng, n) for _ in range(6)]).astype(dtype).reshape(2, 3, n, n)
    eps = np.finfo(dtype).eps
    calls = []

    def sloppy(S):  # an unconverged batched solver: [0, 1] off by 30 n eps, [1, 2] non-finite
        w, Q = np.linalg.eigh(S)
        w[0, 1] *= 1 + 30 * n * eps
        w[1, 2, 0] = np.nan
        return w, Q

    def single(S):
        calls.append(S.copy())
        return np.linalg.eigh(S)

    w, Q = _eigh_stack_checked(np, M, sloppy, single)
    assert len(calls) == 2 and np.array_equal(calls[0], M[0, 1]) and np.array_equal(calls[1], M[1, 2])
    w0, Q0 = np.linalg.eigh(M)
    assert np.array_equal(w, w0) and np.array_equal(Q, Q0)  # the kept ones untouched, the others redone
    # the bound is the one stated: a result just inside it is kept
    calls.clear()

    def close(S):
        w, Q = np.linalg.eigh(S)
        return w * (1 + EIGH_STACK_TOL * n * eps / 4), Q

    _eigh_stack_checked(np, M, close, single)
    assert calls == []
    # entries whose squares overflow (float32 beyond 1e19): the check works in units of the largest entry
    big = M * np.asarray(1e30 if dtype == "float32" else 1e200, dtype)
    w, Q = _eigh_stack_checked(np, big, sloppy, single)
    assert len(calls) == 2 and np.all(np.isfinite(w))


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("B, n", [(3, 40), (2, 130), (20, 100)])
def test_stacked_eigh_on_each_route(xp, dtype, B, n):
    # on CuPy (3, 40) and (20, 100) take the checked stacked call, (2, 130) the per-matrix loop; the
    # guarantee is the check's: backward error and orthogonality within EIGH_STACK_TOL · n · eps
    from kronlin._linalg import EIGH_STACK_TOL, eigh

    rng = np.random.default_rng(B * n)
    S = np.stack([spd(rng, n, cond=1e2) for _ in range(B)])
    w, Q = (to_np(a).astype(np.float64) for a in eigh(xp, on(xp, S, dtype=dtype), "S"))
    assert w.shape == (B, n) and Q.shape == S.shape
    tau = EIGH_STACK_TOL * n * np.finfo(dtype).eps
    Sd = S.astype(dtype).astype(np.float64)  # the matrices as the decomposition saw them
    fro = np.linalg.norm(Sd, axis=(1, 2))
    assert np.all(np.linalg.norm((Q * w[:, None, :]) @ np.swapaxes(Q, -1, -2) - Sd, axis=(1, 2)) <= tau * fro)
    assert np.all(np.linalg.norm(np.swapaxes(Q, -1, -2) @ Q - np.eye(n), axis=(1, 2)) <= tau * np.sqrt(n))
    # Weyl: each eigenvalue within the backward error (plus the orthogonality defect's share)
    assert np.all(np.abs(w - np.linalg.eigh(Sd)[0]) <= 3 * tau * fro[:, None])


def test_batched_and_lu_inverses():
    rng = np.random.default_rng(3)
    S = np.stack([spd(rng, 6) for _ in range(3)])
    Sinv = Factor(np, S, "S").inv()
    assert np.array_equal(Sinv, np.swapaxes(Sinv, -1, -2))
    assert rel_err(Sinv, np.linalg.inv(S)) < 1e-12
    N = rng.standard_normal((5, 5)) + 5 * np.eye(5)  # not symmetric: LU
    f = Factor(np, N, "N")
    assert f.kind == "lu" and rel_err(f.inv(), np.linalg.inv(N)) < 1e-12


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("order", ["C", "F"])
@pytest.mark.parametrize("shape", [(7, 130), (3, 200), (1, 128), (256, 129)])
def test_scaled_gram_is_c_xtx_exactly_symmetric(dtype, order, shape):
    """One ?syrk with alpha = c and the compiled mirror: c·XᵀX to rounding, exactly symmetric, no copy of X."""
    from kronlin._linalg import scaled_gram

    rng = np.random.default_rng(sum(shape))
    X = np.asarray(rng.standard_normal(shape), dtype=dtype, order=order)
    M = scaled_gram(np, X, 0.3)
    ref = 0.3 * X.astype(np.float64).T @ X.astype(np.float64)
    assert M.dtype == np.dtype(dtype) and M.shape == (shape[1], shape[1])
    assert np.array_equal(M, M.T)
    assert np.max(np.abs(M - ref)) <= 10 * shape[0] * np.finfo(dtype).eps * np.max(np.abs(ref))


def test_scaled_gram_leaves_other_inputs_to_the_caller():
    from kronlin._linalg import scaled_gram

    X = np.ones((6, 200))
    assert scaled_gram(np, X[::2], 1.0) is None  # not contiguous
    assert scaled_gram(np, np.ones((2, 3, 200)), 1.0) is None  # a stack
    assert scaled_gram(np, np.ones((0, 200)), 1.0) is None  # no rows
    assert scaled_gram(np, X.astype(np.float16), 1.0) is None
    assert scaled_gram(np, np.ones((6, 127)), 1.0) is None  # narrow: NumPy's product is faster


def test_singular_one_batch_factors_are_refused_whatever_their_rounding():
    """Undamped K-FAC factors of fewer examples than their order are singular; their last pivot is rounding
    noise, which the pivot-ratio test alone let through in 12 of these 600 random layer pairs (the bad-input
    matrix found one; the "inverses" were noise of size 1/eps).  The condition estimate decides there: every
    one is refused, on the Cholesky route and, where rounding makes a factor indefinite, the LU route."""
    from numpy.linalg import LinAlgError

    import kronlin

    refused = 0
    for seed in range(600):
        rng = np.random.default_rng(seed)
        N = int(rng.integers(1, 6))
        d0, d1, d2 = (int(x) for x in rng.integers(1, 6, 3))
        acts = [rng.standard_normal((N, d0)), rng.standard_normal((N, d1))]
        grads = [rng.standard_normal((N, d1)), rng.standard_normal((N, d2))]
        est = kronlin.FactorEstimator(tridiagonal=False).update(acts, grads)
        if max(np.linalg.cond(M) for M in est.A_diag + est.G_diag) < 1e15:
            continue  # regular to working precision (enough examples for every factor)
        with pytest.raises(LinAlgError, match="singular"):
            est.block_diag_inverse(gamma=0.0)
        refused += 1
    assert refused > 100


def test_ill_conditioned_but_regular_factors_are_kept():
    """The condition estimate runs where the pivot ratio is below sqrt(eps) and refuses only rcond <= 10·eps."""
    rng = np.random.default_rng(13)
    Q = np.linalg.qr(rng.standard_normal((8, 8)))[0]
    M = (Q * np.logspace(0, -12, 8)) @ Q.T  # cond 1e12 < 1/(10·eps): regular in float64
    f = Factor(np, (M + M.T) / 2, "M")
    assert f.kind == "cholesky"
    assert rel_err(f.solve(np.eye(8)) @ M, np.eye(8)) < 1e-3


def _rank_deficient(rng, n, r, dtype):
    """``B Bᵀ`` of rank ``r < n``: PSD and singular; its Cholesky's last pivots are rounding noise."""
    B = rng.standard_normal((n, r))
    return (B @ B.T).astype(dtype)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_inverse_verdict_refuses_what_the_condition_estimate_refuses(dtype, monkeypatch):
    """``Kron.inv()`` judges a doubtful pivot ratio by the inverse it computes (``judge_by_inverse``): every
    rank-deficient matrix whose pivots pass the ratio test is refused there, as ``solve`` (``?pocon``)
    refuses it, and the verdict stands for every later call on the factor."""
    from numpy.linalg import LinAlgError

    import kronlin
    from kronlin import _linalg

    verdicts = []
    spy = _linalg._inverse_singular
    monkeypatch.setattr(_linalg, "_inverse_singular", lambda *a: verdicts.append(spy(*a)) or verdicts[-1])
    for seed in range(200):
        rng = np.random.default_rng(seed)
        n = int(rng.integers(3, 40))
        M = _rank_deficient(rng, n, int(rng.integers(1, n)), dtype)
        try:
            Factor(np, M, "M")  # the condition estimate's verdict
        except LinAlgError:
            pocon_refuses = True
        else:
            pocon_refuses = False
        calls = len(verdicts)
        with pytest.raises(LinAlgError, match="A .*singular to working precision"):
            kronlin.Kron(M, np.ones((1, 1), dtype)).inv()
        f = Factor(np, M, "M", judge_by_inverse=True) if len(verdicts) > calls else None
        if f is not None:  # the pivots left a doubt: the inverse decided, and a solve agrees afterwards
            assert pocon_refuses
            with pytest.raises(LinAlgError, match="singular"):
                f.inv()
            with pytest.raises(LinAlgError, match="singular"):  # the verdict stands
                f.solve(np.eye(n, dtype=dtype))
    assert sum(verdicts) >= 10  # the inverse decided in enough cases for the test to mean something


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_ill_conditioned_regular_inverse_skips_the_condition_estimate(dtype, monkeypatch):
    """A regular matrix whose pivot ratio is below sqrt(eps) is inverted without ``?pocon`` and accurately;
    a solve on the same kind of factor runs the estimate first (and keeps the matrix)."""
    import kronlin
    from kronlin import _linalg

    estimates = []
    real = _linalg._condition_singular
    monkeypatch.setattr(_linalg, "_condition_singular", lambda *a: estimates.append(a[0]) or real(*a))
    eps = np.finfo(dtype).eps
    cond = 1e-2 / eps  # pivot ratio 1/cond, below sqrt(eps); the 1-norm rcond above 10·eps
    n = 4
    rng = np.random.default_rng(5)
    Q = np.eye(n)
    Q[:-1, :-1] = np.linalg.qr(rng.standard_normal((n - 1, n - 1)))[0]  # the last coordinate kept apart:
    M64 = (Q * np.array([1.0, 0.5, 0.3, 1 / cond])) @ Q.T  # the last pivot is the smallest eigenvalue
    M = ((M64 + M64.T) / 2).astype(dtype)
    Minv = kronlin.Kron(M, np.ones((1, 1), dtype)).inv().A
    assert estimates == []
    # a backward-stable inverse: relative residual of order cond·eps
    res = np.linalg.norm(M.astype(np.float64) @ Minv.astype(np.float64) - np.eye(n)) / np.sqrt(n)
    assert res < n * cond * eps
    f = Factor(np, M, "M", judge_by_inverse=True)
    assert f._suspect is not None  # the pivots did leave a doubt
    f.solve(np.eye(n, dtype=dtype))
    assert estimates == ["pocon"]  # which keeps it too
