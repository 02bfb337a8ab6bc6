"""The NumPy LAPACK routes of kronlin._linalg (issue 13, item 1): eigh, Cholesky and SPD inverse.

NumPy float32/float64 factors go to SciPy's ``?syevd``, ``?potrf`` and
``?potri`` wrappers directly (bench/results/decomp_routes.md); these tests pin
the results to dense float64 references and to the routes they replaced
(``numpy.linalg``), single and stacked, and the float32 -> float64 retry of a
failing or non-finite LAPACK call.
"""

from __future__ import annotations

import pickle

import numpy as np
import pytest

import kronlin
from kronlin import _linalg
from kronlin._linalg import Factor
from kronlin.testing import spd

from helpers import DTYPES, rel_err

SHAPES = [(1,), (5,), (64,), (130,), (3, 40), (2, 2, 17), (2, 300)]  # 300 > one mirror tile  # (n,) one matrix, (*batch, n) a stack


def _mat(shape, dtype, seed=0, cond=1e3):
    *batch, n = shape
    return spd(np.random.default_rng(seed + n), n, cond, tuple(batch)).astype(dtype)


def _count(monkeypatch, name):
    """Count the calls of ``_linalg.<name>`` (proves the route is taken; a test that cannot fail otherwise)."""
    real, calls = getattr(_linalg, name), []

    def spy(*args, **kw):
        calls.append(args[0].shape)
        return real(*args, **kw)

    monkeypatch.setattr(_linalg, name, spy)
    return calls


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_eigh_route_residual_orthonormality_and_agreement(monkeypatch, dtype, shape):
    M = _mat(shape, dtype)
    n = shape[-1]
    calls = _count(monkeypatch, "_syevd")
    w, Q = _linalg.eigh(np, M, "A")
    # one matrix: ?syevd; a stack: the per-matrix loop in float32, NumPy's stacked call in float64 (measured)
    assert bool(calls) == (len(shape) == 1 or dtype == "float32")
    assert w.dtype == Q.dtype == np.dtype(dtype)
    assert w.shape == M.shape[:-1] and Q.shape == M.shape
    eps = np.finfo(dtype).eps
    M64, Q64, w64 = M.astype(np.float64), Q.astype(np.float64), w.astype(np.float64)
    # backward-stable eigensolver (LAPACK Users' Guide §4.7: p(n)·eps with p a modest function of n):
    # ‖AQ − QΛ‖_F ≤ c·n·eps·‖A‖_F and ‖QᵀQ − I‖_F ≤ c·n·eps per matrix, c = 4; observed up to 1.6·n·eps
    # for the orthonormality at n = 5 (?steqr below ?syevd's divide-and-conquer crossover), ≤ 1.2 for
    # numpy.linalg.eigh on random symmetric matrices
    c = 4
    res = np.linalg.norm(M64 @ Q64 - Q64 * w64[..., None, :], axis=(-2, -1))
    assert np.all(res <= c * n * eps * np.linalg.norm(M64, axis=(-2, -1)))
    orth = np.linalg.norm(np.swapaxes(Q64, -1, -2) @ Q64 - np.eye(n), axis=(-2, -1))
    assert np.all(orth <= c * n * eps)
    # the eigenvalues agree with the route this replaced (numpy.linalg.eigh): |Δλ| ≤ n·eps·‖A‖₂ (Weyl)
    w_old = np.linalg.eigh(M)[0].astype(np.float64)
    assert np.all(np.abs(w64 - w_old) <= n * eps * np.abs(w_old).max(axis=-1, keepdims=True))
    assert np.all(np.diff(w, axis=-1) >= 0)


def test_eigh_route_reads_the_lower_triangle_like_numpy():
    """A matrix symmetric only to round-off is read as numpy.linalg.eigh reads it (lower triangle)."""
    rng = np.random.default_rng(1)
    M = _mat((50,), "float64")
    noisy = M + 1e-13 * np.triu(rng.standard_normal(M.shape), 1)  # asymmetric above the diagonal only
    w, Q = _linalg.eigh(np, noisy, "A")
    w_ref, _ = np.linalg.eigh(M)
    assert rel_err(w, w_ref) < 1e-14
    assert rel_err((Q * w) @ Q.T, M) < 1e-14
    # Fortran-ordered and strided inputs go through the same route
    Mf = np.asfortranarray(M)
    assert rel_err(_linalg.eigh(np, Mf, "A")[0], w_ref) < 1e-14
    big = np.zeros((100, 100))
    big[::2, ::2] = M
    assert rel_err(_linalg.eigh(np, big[::2, ::2], "A")[0], w_ref) < 1e-14


@pytest.mark.parametrize("stacked", [False, True])
@pytest.mark.parametrize("mode", ["nan", "info"])
def test_float32_eigh_lapack_failure_retries_in_float64(monkeypatch, stacked, mode):
    """The float32 ?syevd returns NaN or reports a failure: the float64 ?syevd redoes it, result in float32."""
    real = _linalg._lapack
    used = []

    def patched(name, dtype):
        f = real(name, dtype)
        used.append((name, np.dtype(dtype).name))
        if name != "syevd" or np.dtype(dtype) != np.float32:
            return f

        def bad(a, **kw):
            w, v, info = f(a, **kw)
            return (w * np.nan, v, 0) if mode == "nan" else (w, v, 3)

        return bad

    monkeypatch.setattr(_linalg, "_lapack", patched)
    M = _mat((3, 30) if stacked else (30,), "float32")
    w, Q = _linalg.eigh(np, M, "A")
    assert ("syevd", "float32") in used
    if not stacked:  # (float64 stacks retry through NumPy's stacked call, the faster route there)
        assert ("syevd", "float64") in used
    assert w.dtype == Q.dtype == np.float32 and np.all(np.isfinite(w)) and np.all(np.isfinite(Q))
    M64 = M.astype(np.float64)
    rec = (Q.astype(np.float64) * w.astype(np.float64)[..., None, :]) @ np.swapaxes(Q, -1, -2).astype(np.float64)
    assert rel_err(rec, M64) < 30 * np.finfo(np.float32).eps  # the float64 result rounded to float32
    # the same failure in float64 is an error naming the argument
    monkeypatch.setattr(_linalg, "_lapack", lambda name, dtype: (lambda a, **kw: (real(name, dtype)(a, **kw)[0], a, 1)))

    def broken(M):
        raise np.linalg.LinAlgError("Eigenvalues did not converge")

    monkeypatch.setattr(np.linalg, "eigh", broken)
    with pytest.raises(np.linalg.LinAlgError, match="eigendecomposition of A .*even in float64"):
        _linalg.eigh(np, M, "A")


def test_psd_clipping_and_message_unchanged():
    Q = np.linalg.qr(np.random.default_rng(2).standard_normal((6, 6)))[0]
    for dtype in DTYPES:
        near = ((Q * np.array([-1e-18, 0.0, 1.0, 2.0, 3.0, 4.0])) @ Q.T).astype(dtype)
        near = (near + near.T) / 2
        w, _ = _linalg.eigh(np, near, "A")
        assert w.min() >= 0.0
        bad = ((Q * np.array([-1e-2, 0.0, 1.0, 2.0, 3.0, 4.0])) @ Q.T).astype(dtype)
        bad = (bad + bad.T) / 2
        with pytest.raises(np.linalg.LinAlgError, match="A .*not positive semi-definite"):
            _linalg.eigh(np, bad, "A")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_cholesky_route_and_inverse(monkeypatch, dtype, shape):
    M = _mat(shape, dtype)
    n = shape[-1]
    eps = np.finfo(dtype).eps
    potri_calls = _count(monkeypatch, "_potri")
    f = Factor(np, M, "M")
    assert f.kind == "cholesky" and f._L.dtype == np.dtype(dtype) and f._L.shape == M.shape
    L = f._L.astype(np.float64)
    assert np.all(np.triu(L, 1) == 0)
    M64 = M.astype(np.float64)
    # backward stable: ‖LLᵀ − M‖_F ≤ n·eps·‖M‖_F; the factor the old route computed agrees to cond·n·eps
    assert np.all(np.linalg.norm(L @ np.swapaxes(L, -1, -2) - M64, axis=(-2, -1))
                  <= n * eps * np.linalg.norm(M64, axis=(-2, -1)))
    assert rel_err(L, np.linalg.cholesky(M64)) < 1e3 * n * eps
    Minv = f.inv()
    assert Minv.dtype == np.dtype(dtype) and Minv.shape == M.shape
    assert np.array_equal(Minv, np.swapaxes(Minv, -1, -2))  # exactly symmetric
    assert potri_calls  # single matrices and stacks (per matrix) both go through ?potri
    # ‖M X − I‖_F/√n ≤ cond·n·eps (cond = 1e3), against float64 dense inverses
    res = np.linalg.norm(M64 @ Minv.astype(np.float64) - np.eye(n), axis=(-2, -1)) / np.sqrt(n)
    assert np.all(res <= 1e3 * n * eps)
    assert rel_err(Minv, np.linalg.inv(M64)) < 1e3 * n * eps


def test_not_positive_definite_still_falls_back_to_lu_and_singular_still_raises():
    rng = np.random.default_rng(4)
    for dtype in DTYPES:
        S = rng.standard_normal((8, 8))
        ind = ((S + S.T) / 2).astype(dtype)  # symmetric indefinite: ?potrf reports info > 0
        f = Factor(np, ind, "M")
        assert f.kind == "lu"
        assert rel_err(f.inv(), np.linalg.inv(ind.astype(np.float64))) < 1e3 * np.finfo(dtype).eps
        stack = np.stack([_mat((8,), dtype), ind])  # one indefinite matrix makes the whole stack LU
        assert Factor(np, stack, "M").kind == "lu"
        sing = np.diag([1.0, 1.0, 1e-30]).astype(dtype)
        with pytest.raises(np.linalg.LinAlgError, match="M .*singular to working precision"):
            Factor(np, sing, "M")


def test_potri_failure_falls_back_to_solves(monkeypatch):
    monkeypatch.setattr(_linalg, "_potri", lambda L, overwrite=False: None)
    for shape in [(20,), (3, 20)]:
        M = _mat(shape, "float64")
        Minv = Factor(np, M, "M").inv()
        assert np.array_equal(Minv, np.swapaxes(Minv, -1, -2))
        assert rel_err(Minv, np.linalg.inv(M)) < 1e-11


@pytest.mark.parametrize("shape", [(20,), (3, 20)])
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_inverse_in_the_factors_memory_is_the_same_and_consumes_it(shape, dtype):
    """Factor.inv(overwrite=True) (potri in the Cholesky factor's own memory) gives the same bits as the
    copying route; the factorization is consumed: solves and a second inverse are refused."""
    M = _mat(shape, dtype)
    ref = Factor(np, M, "M").inv()
    f = Factor(np, M, "M")
    logdet = f.slogdet()[1]
    got = f.inv(overwrite=True)
    assert np.array_equal(got, ref) and np.array_equal(got, np.swapaxes(got, -1, -2))
    assert np.array_equal(logdet, Factor(np, M, "M").slogdet()[1])
    for call in (lambda: f.solve(np.ones(shape + (2,))), f.inv, f.slogdet):
        with pytest.raises(RuntimeError, match=r"factorization of M was consumed"):
            call()


def test_routes_survive_pickling_and_give_identical_results():
    A, G = _mat((40,), "float32"), _mat((2, 30), "float32", seed=1)[0]
    K = kronlin.Kron(A, G)
    E, Kinv = K.eigh(), K.inv()
    K2 = pickle.loads(pickle.dumps(K))
    X = np.random.default_rng(5).standard_normal((30, 40)).astype(np.float32)
    assert np.array_equal(K2.eigh().solve(X, damping=0.1), E.solve(X, damping=0.1))
    assert np.array_equal(K2.inv() @ X, Kinv @ X)


@pytest.mark.parametrize("dtype", DTYPES)
def test_kron_eigh_and_inv_against_dense(dtype):
    A, G = _mat((3, 24), dtype), _mat((3, 16), dtype, seed=1)
    K = kronlin.Kron(A, G)
    dense = K.to_dense().astype(np.float64)
    eps = np.finfo(dtype).eps
    X = np.random.default_rng(6).standard_normal((3, 16, 24))
    want = np.linalg.solve(dense, X.transpose(0, 2, 1).reshape(3, -1, 1))[..., 0]
    want = want.reshape(3, 24, 16).transpose(0, 2, 1)
    # cond(A ⊗ G) ≤ 1e6: the solve's relative error is ≤ cond·(a few eps)
    assert rel_err(K.eigh().solve(X.astype(dtype)), want) < 1e6 * 10 * eps
    assert rel_err(K.inv() @ X.astype(dtype), want) < 1e6 * 10 * eps


@pytest.mark.parametrize("dtype", DTYPES)
def test_generalized_eigh_route(monkeypatch, dtype):
    """``C x = s A x`` through ?sygvd: Kᵀ A K = I and Kᵀ C K = diag(s), agreeing with scipy.linalg.eigh(C, A)."""
    import scipy.linalg

    used = []
    real = _linalg._lapack
    monkeypatch.setattr(_linalg, "_lapack", lambda name, dt: used.append(name) or real(name, dt))
    n = 60
    A, C = _mat((n,), dtype, cond=1e2), _mat((n,), dtype, seed=7, cond=1e2)
    s, K = _linalg.generalized_eigh(np, C, A, "C", "A")
    assert "sygvd" in used and s.dtype == K.dtype == np.dtype(dtype)
    eps = np.finfo(dtype).eps
    A64, C64, K64 = A.astype(np.float64), C.astype(np.float64), K.astype(np.float64)
    # cond(A) = 1e2 enters through the Cholesky reduction: ≤ cond·n·eps
    assert np.linalg.norm(K64.T @ A64 @ K64 - np.eye(n)) <= 1e2 * n * eps
    assert np.linalg.norm(K64.T @ C64 @ K64 - np.diag(s)) <= 1e2 * n * eps * np.abs(s).max()
    s_ref = scipy.linalg.eigh(C64, A64, eigvals_only=True)
    assert np.all(np.abs(s - s_ref) <= 1e2 * n * eps * np.abs(s_ref).max())


def test_generalized_eigh_float32_failure_retries_in_float64(monkeypatch):
    real = _linalg._lapack
    used = []

    def patched(name, dtype):
        f = real(name, dtype)
        used.append((name, np.dtype(dtype).name))
        if name == "sygvd" and np.dtype(dtype) == np.float32:
            return lambda a, b, **kw: (f(a, b, **kw)[0] * np.nan,) + tuple(f(a, b, **kw)[1:])
        return f

    monkeypatch.setattr(_linalg, "_lapack", patched)
    A, C = _mat((20,), "float32", cond=10.0), _mat((20,), "float32", seed=3, cond=10.0)
    s, K = _linalg.generalized_eigh(np, C, A, "C", "A")
    assert used == [("sygvd", "float32"), ("sygvd", "float64")]
    assert s.dtype == np.float32 and np.all(np.isfinite(s))
    A64 = A.astype(np.float64)
    assert np.linalg.norm(K.T.astype(np.float64) @ A64 @ K.astype(np.float64) - np.eye(20)) < 1e-5


@pytest.mark.parametrize("n", [1, 2, 127, 128, 129, 300])
def test_mirror_lower_tiles(n):
    """The tiled mirror behind the SPD inverse: exactly symmetric, the lower triangle untouched (orders
    around and across the 128 tile)."""
    B = np.tril(np.random.default_rng(n).standard_normal((n, n)))
    S = _linalg._mirror_lower(B.copy())
    assert np.array_equal(S, S.T) and np.array_equal(np.tril(S), B)
