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
