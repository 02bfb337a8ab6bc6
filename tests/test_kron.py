"""Kron against dense references (np.kron, scipy.linalg) on NumPy and array-api-strict."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.linalg as sl

import kronlin
from kronlin import Kron
from kronlin.testing import orthonormal, spd, unvec, vec

from helpers import DTYPES, krylov, native, on, rel_err, to_np, tol

# (p, q): 1x1 factors, primes, rectangular p != q in both directions.
SHAPES = [(1, 1), (1, 5), (4, 1), (2, 3), (7, 5), (11, 13), (17, 6), (23, 29)]
CONDS = [1.0, 1e3]


def _problem(seed, p, q, cond, batch=(), symmetric=True):
    rng = np.random.default_rng(seed)
    if symmetric:
        A, G = spd(rng, p, cond), spd(rng, q, cond)
    else:  # well-conditioned non-symmetric factors: LU path
        A = orthonormal(rng, p) @ np.diag(np.geomspace(1, cond, p)) @ orthonormal(rng, p)
        G = orthonormal(rng, q) @ np.diag(np.geomspace(1, cond, q)) @ orthonormal(rng, q)
    X = rng.standard_normal(batch + (q, p))
    return A, G, X


@pytest.mark.parametrize("p,q", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("cond", CONDS)
@pytest.mark.parametrize("symmetric", [True, False])
def test_matmul_solve_against_dense(xp, p, q, dtype, cond, symmetric):
    A, G, X = _problem(p * 100 + q, p, q, cond, symmetric=symmetric)
    K = Kron(*on(xp, A, G, dtype=dtype))
    D = np.kron(A, G)
    Xx = on(xp, X, dtype=dtype)
    assert rel_err(K @ Xx, unvec(D @ vec(X), q, p)) < tol(dtype)
    # a flat column-stacked vector gives a flat result
    assert rel_err(K @ on(xp, vec(X), dtype=dtype), D @ vec(X)) < tol(dtype)
    assert rel_err(K.T @ Xx, unvec(D.T @ vec(X), q, p)) < tol(dtype)
    ref = unvec(sl.solve(D, vec(X)), q, p)
    assert rel_err(K.solve(Xx), ref) < tol(dtype, cond**2)
    assert rel_err(K.inv().to_dense(), sl.inv(D)) < tol(dtype, cond**2)
    assert rel_err(K.to_dense(), D) < tol(dtype)
    assert to_np(K @ Xx).dtype == np.dtype(dtype)
    assert to_np(K.solve(Xx)).dtype == np.dtype(dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_solve_uses_cholesky_for_spd_and_lu_otherwise(dtype):
    A, G, X = _problem(1, 5, 4, 10.0)
    K = Kron(A.astype(dtype), G.astype(dtype))
    K.solve(X.astype(dtype))
    assert (K._fa.kind, K._fg.kind) == ("cholesky", "cholesky")
    A2, G2, _ = _problem(2, 5, 4, 10.0, symmetric=False)
    K2 = Kron(A2.astype(dtype), G2.astype(dtype))
    K2.solve(X.astype(dtype))
    assert (K2._fa.kind, K2._fg.kind) == ("lu", "lu")
    # symmetric but indefinite: Cholesky fails, LU takes over, the answer is still right
    S = np.diag([1.0, -2.0, 3.0, 0.5, 4.0]).astype(dtype)
    K3 = Kron(S, G.astype(dtype))
    assert rel_err(K3.solve(X.astype(dtype)), unvec(sl.solve(np.kron(S, G), vec(X)), 4, 5)) < tol(dtype, 100)
    assert K3._fa.kind == "lu"


def test_factorizations_are_cached():
    A, G, X = _problem(3, 6, 4, 10.0)
    K = Kron(A, G)
    K.solve(X)
    fa = K._fa
    K.solve(2 * X)
    K.logdet()
    assert K._fa is fa
    assert K.eigh() is K.eigh()


@pytest.mark.parametrize("batch_x,batch_f", [((3,), ()), ((2, 3), ()), ((3,), (3,)), ((2, 1), (4,))])
@pytest.mark.parametrize("dtype", DTYPES)
def test_batches(xp, batch_x, batch_f, dtype):
    rng = np.random.default_rng(7)
    p, q = 5, 3
    A = spd(rng, p, 10.0, batch_f)
    G = spd(rng, q, 10.0, batch_f)
    X = rng.standard_normal(batch_x + (q, p))
    K = Kron(*on(xp, A, G, dtype=dtype))
    out_shape = np.broadcast_shapes(batch_x, batch_f) + (q, p)
    ref_mm = np.broadcast_to(G @ X @ np.swapaxes(A, -1, -2), out_shape)
    ref_solve = np.linalg.solve(G, X) @ np.swapaxes(np.linalg.inv(A), -1, -2)
    assert rel_err(K @ on(xp, X, dtype=dtype), ref_mm) < tol(dtype)
    assert rel_err(K.solve(on(xp, X, dtype=dtype)), np.broadcast_to(ref_solve, out_shape)) < tol(dtype, 100)
    E = K.eigh()
    assert rel_err(E.solve(on(xp, X, dtype=dtype), 0.5), _dense_damped_solve(A, G, X, 0.5)) < tol(dtype, 100)
    if batch_f:
        dense = np.stack([np.kron(a, g) for a, g in zip(A.reshape(-1, p, p), G.reshape(-1, q, q))])
        assert rel_err(K.to_dense(), dense.reshape(batch_f + (p * q, p * q))) < tol(dtype)
        ld = np.linalg.slogdet(dense)[1].reshape(batch_f)
        assert rel_err(K.logdet(), ld) < tol(dtype, 10)
        assert rel_err(K.trace(), np.trace(dense, axis1=-2, axis2=-1).reshape(batch_f)) < tol(dtype)


def _dense_damped_solve(A, G, X, damping):
    """Reference (A⊗G + damping I)^{-1} vec(X), batched over leading axes."""
    A, G, X = np.asarray(A, float), np.asarray(G, float), np.asarray(X, float)
    p, q = A.shape[-1], G.shape[-1]
    shape = np.broadcast_shapes(A.shape[:-2], G.shape[:-2], X.shape[:-2])
    A = np.broadcast_to(A, shape + (p, p)).reshape(-1, p, p)
    G = np.broadcast_to(G, shape + (q, q)).reshape(-1, q, q)
    X = np.broadcast_to(X, shape + (q, p)).reshape(-1, q, p)
    out = [unvec(sl.solve(np.kron(a, g) + damping * np.eye(p * q), vec(x)), q, p) for a, g, x in zip(A, G, X)]
    return np.stack(out).reshape(shape + (q, p))


@pytest.mark.parametrize("p,q", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_logdet_trace(xp, p, q, dtype):
    A, G, _ = _problem(p + 31 * q, p, q, 1e3)
    K = Kron(*on(xp, A, G, dtype=dtype))
    D = np.kron(A, G)
    sign, ld = np.linalg.slogdet(D)
    assert sign > 0
    # the log-determinant is a sum of p*q logs: compare with an absolute tolerance scaled by its size
    assert abs(float(to_np(K.logdet())) - ld) <= tol(dtype) * max(1.0, abs(ld)) * 10
    assert rel_err(K.trace(), np.trace(D)) < tol(dtype)
    s, l2 = K.slogdet()
    assert float(to_np(s)) == 1.0 and abs(float(to_np(l2)) - ld) <= tol(dtype) * max(1.0, abs(ld)) * 10


def test_slogdet_negative_determinant():
    A = np.diag([1.0, -2.0, 3.0])
    G = np.diag([2.0, 5.0])
    K = Kron(A, G)
    sign, logabs = K.slogdet()
    ref = np.linalg.slogdet(np.kron(A, G))
    assert float(sign) == ref[0] and abs(float(logabs) - ref[1]) < 1e-12
    A4 = np.diag([1.0, -2.0, 3.0, 1.0])
    s4, _ = Kron(A4, np.diag([1.0, 2.0, 3.0])).slogdet()
    assert float(s4) == np.linalg.slogdet(np.kron(A4, np.diag([1.0, 2.0, 3.0])))[0] == -1.0
    with pytest.raises(np.linalg.LinAlgError, match="slogdet"):
        Kron(A4, np.diag([1.0, 2.0, 3.0])).logdet()


def test_lu_slogdet_sign_with_pivoting():
    rng = np.random.default_rng(5)
    for _ in range(10):
        A = rng.standard_normal((5, 5))
        G = rng.standard_normal((3, 3))
        s, l = Kron(A, G).slogdet()
        ref = np.linalg.slogdet(np.kron(A, G))
        assert float(s) == ref[0] and abs(float(l) - ref[1]) < 1e-10


def test_matmat_and_linear_operator(xp):
    A, G, X = _problem(11, 6, 4, 10.0)
    A2 = A + 0.3 * np.triu(np.ones_like(A), 1)  # non-symmetric: checks rmatvec uses the transpose
    K = Kron(*on(xp, A2, G))
    D = np.kron(A2, G)
    V = np.random.default_rng(0).standard_normal((24, 3))
    assert rel_err(K.matmat(on(xp, V)), D @ V) < 1e-13
    assert rel_err(K.rmatmat(on(xp, V)), D.T @ V) < 1e-13
    L = K.aslinearoperator()
    assert L.shape == (24, 24)
    Vl = native(xp, V)  # what the LinearOperator's library takes: CuPy arrays for cupyx, else NumPy
    assert rel_err(L @ Vl[:, 0], D @ V[:, 0]) < 1e-13
    assert rel_err(L.matmat(Vl), D @ V) < 1e-13
    assert rel_err(L.rmatvec(Vl[:, 1]), D.T @ V[:, 1]) < 1e-13
    x, info = krylov(xp, "gmres", L, Vl[:, 0])
    assert info == 0 and rel_err(x, sl.solve(D, V[:, 0])) < 1e-8
    Ks = Kron(*on(xp, A, G))
    x, info = krylov(xp, "cg", Ks.aslinearoperator(), Vl[:, 0])
    assert info == 0 and rel_err(x, sl.solve(np.kron(A, G), V[:, 0])) < 1e-8


def test_to_dense_refuses_large_unless_allowed(monkeypatch):
    import kronlin.kron as kmod

    monkeypatch.setattr(kmod, "DENSE_LIMIT", 100)
    K = Kron(np.eye(4), np.eye(3))
    with pytest.raises(ValueError, match="allow_large=True"):
        K.to_dense()
    assert K.to_dense(allow_large=True).shape == (12, 12)


def test_dtype_of_mixed_inputs():
    A32 = np.eye(3, dtype=np.float32)
    G64 = np.eye(2)
    assert Kron(A32, G64).dtype == np.float64
    K32 = Kron(A32, np.eye(2, dtype=np.float32))
    assert K32.dtype == np.float32
    X64 = np.ones((2, 3))
    assert (K32 @ X64).dtype == np.float64  # the wider right-hand side wins
    assert (K32 @ X64.astype(np.float32)).dtype == np.float32
    assert Kron(np.eye(3, dtype=int), np.eye(2, dtype=bool)).dtype == np.float64


def test_size_zero_batch():
    K = Kron(np.eye(3), np.eye(2))
    out = K @ np.zeros((0, 2, 3))
    assert out.shape == (0, 2, 3)
    assert K.eigh().solve(np.zeros((0, 2, 3)), 1.0).shape == (0, 2, 3)


def test_public_api_table():
    for name in ("Kron", "KronEigh", "pi_factor", "factored_damping"):
        assert hasattr(kronlin, name)
    K = Kron(np.eye(2), np.eye(3))
    for meth in ("__matmul__", "matmat", "T", "solve", "inv", "logdet", "trace", "to_dense", "eigh",
                 "aslinearoperator"):
        assert hasattr(K, meth)


@pytest.mark.parametrize("first", ["inv", "solve"])
def test_inv_and_solve_in_either_order_share_nothing_they_should_not(first):
    """inv() without a cached factorization factors for itself and inverts in place; a cached one (from
    solve) is used and kept.  Either way both results are exact and repeatable."""
    rng = np.random.default_rng(11)
    A, G = spd(rng, 6, 30.0), spd(rng, 4, 30.0)
    X = rng.standard_normal((4, 6))
    K = Kron(A, G)
    ref_inv, ref_sol = np.linalg.inv(np.kron(A, G)), unvec(np.linalg.solve(np.kron(A, G), vec(X)), 4, 6)
    for _ in range(2):
        if first == "inv":
            Ki = K.inv()
            Y = K.solve(X)
        else:
            Y = K.solve(X)
            Ki = K.inv()
        assert rel_err(Ki.to_dense(), ref_inv) < 1e-12
        assert rel_err(Y, ref_sol) < 1e-12
    assert K._fac is not None and all(f.kind == "cholesky" for f in K._fac)
