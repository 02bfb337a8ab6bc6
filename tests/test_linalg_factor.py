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
