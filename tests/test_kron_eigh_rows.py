"""KronEigh.from_rows: thin eigenbases of Gram-matrix factors against dense scipy on the formed factors."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import scipy.linalg as sl

from numpy.linalg import LinAlgError

from kronlin import Kron, KronEigh
from kronlin._linalg import rows_eigh
from kronlin.testing import unvec, vec

from helpers import DTYPES, on, rel_err, to_np, tol

# (n_a, p, n_g, q): thin A, thin G, both, neither (n > 0.8 p: dense from the rows), n = 1
ROWS = [(3, 8, 10, 4), (10, 4, 2, 6), (3, 9, 2, 7), (9, 4, 8, 3), (1, 5, 1, 6), (6, 8, 3, 3)]


def _factors(a, g, sa, sg):
    a, g = np.asarray(a, np.float64), np.asarray(g, np.float64)
    return sa * a.T @ a, sg * g.T @ g


def _dense_fn(A, G, fn):
    w, V = sl.eigh(np.kron(A, G))
    return (V * fn(np.clip(w, 0, None))) @ V.T


def _rows(rng, n, d, rank=None):
    x = rng.standard_normal((n, d))
    if rank is not None:  # rank-deficient rows: duplicates and a zero row
        x = rng.standard_normal((n, rank)) @ rng.standard_normal((rank, d))
        x[0] = 0.0
    return x


@pytest.mark.parametrize("na,p,ng,q", ROWS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("damping", [1e-2, 1.0])
def test_solve_and_power_against_dense(xp, na, p, ng, q, dtype, damping):
    rng = np.random.default_rng(na * 100 + p * 10 + q)
    a, g = _rows(rng, na, p), _rows(rng, ng, q)
    sa, sg = 1.0 / na, 2.0
    A, G = _factors(a, g, sa, sg)
    X = rng.standard_normal((q, p))
    E = KronEigh.from_rows(*on(xp, a, g, dtype=dtype), scale_a=sa, scale_g=sg)
    M = np.kron(A, G) + damping * np.eye(p * q)
    cond = np.linalg.norm(M, 2) / damping
    ref = unvec(sl.solve(M, vec(X)), q, p)
    got = E.solve(on(xp, X, dtype=dtype), damping=damping)
    assert to_np(got).dtype == np.dtype(dtype)
    assert rel_err(got, ref) < tol(dtype, cond)
    ref = unvec(_dense_fn(A, G, lambda w: (w + damping) ** -0.5) @ vec(X), q, p)
    assert rel_err(E.power(on(xp, X, dtype=dtype), -0.5, damping), ref) < tol(dtype, cond)
    assert rel_err(E @ on(xp, X, dtype=dtype), unvec(np.kron(A, G) @ vec(X), q, p)) < tol(dtype)
    ref = unvec(_dense_fn(A, G, lambda w: (w + 0.1) ** -0.25) @ vec(X), q, p)
    assert rel_err(E.apply(on(xp, X, dtype=dtype), lambda d: (d + 0.1) ** -0.25), ref) < tol(dtype, 1e3)


@pytest.mark.parametrize("dtype", DTYPES)
def test_spectrum_and_logdet_include_the_complement(xp, dtype):
    rng = np.random.default_rng(1)
    a, g = _rows(rng, 3, 7), _rows(rng, 2, 5)
    A, G = _factors(a, g, 0.5, 1.5)
    E = KronEigh.from_rows(*on(xp, a, g, dtype=dtype), scale_a=0.5, scale_g=1.5)
    ev = np.sort(to_np(E.eigvals(0.3)).ravel())
    ref = np.sort(np.clip(np.linalg.eigvalsh(np.kron(A, G)), 0, None)) + 0.3
    assert ev.shape == (35,)
    assert np.max(np.abs(ev - ref)) <= tol(dtype) * ref.max()
    assert abs(float(E.logdet(0.3)) - np.linalg.slogdet(np.kron(A, G) + 0.3 * np.eye(35))[1]) < tol(dtype, 1e3)
    with pytest.raises(LinAlgError, match="singular"):  # the complement's eigenvalue is 0
        E.solve(on(xp, rng.standard_normal((5, 7)), dtype=dtype))


@pytest.mark.parametrize("dtype", DTYPES)
def test_thin_basis_is_an_eigenbasis(xp, dtype):
    rng = np.random.default_rng(2)
    a, g = _rows(rng, 4, 9), _rows(rng, 12, 5)
    E = KronEigh.from_rows(*on(xp, a, g, dtype=dtype), scale_a=0.25)
    Qa, la, Qg, lg = (to_np(x).astype(np.float64) for x in E)
    assert Qa.shape == (9, 4) and la.shape == (4,) and Qg.shape == (5, 5) and lg.shape == (5,)
    A, G = _factors(a, g, 0.25, 1.0)
    assert np.max(np.abs(Qa.T @ Qa - np.eye(4))) < 100 * 9 * np.finfo(dtype).eps * 10
    assert rel_err(A @ Qa, Qa * la) < tol(dtype, 1e2)
    assert np.all(np.diff(la) >= 0) and "ranks=(4, 5)" in repr(E)


@pytest.mark.parametrize("dtype", DTYPES)
def test_rank_deficient_rows(xp, dtype):
    """Duplicate directions and a zero row: eigenvalues at rounding level become zero columns, results stay exact."""
    rng = np.random.default_rng(3)
    a, g = _rows(rng, 6, 11, rank=2), _rows(rng, 3, 4)
    w, U = rows_eigh(np, np.asarray(a, dtype), 1.0, "a")
    zero = w == 0
    assert zero.sum() >= 4 and np.all(U[:, zero] == 0)
    A, G = _factors(a, g, 1.0, 1.0)
    X = rng.standard_normal((4, 11))
    E = KronEigh.from_rows(*on(xp, a, g, dtype=dtype))
    M = np.kron(A, G) + 0.05 * np.eye(44)
    ref = unvec(sl.solve(M, vec(X)), 4, 11)
    assert rel_err(E.solve(on(xp, X, dtype=dtype), 0.05), ref) < tol(dtype, np.linalg.norm(M, 2) / 0.05)


def test_batched_rows_match_per_item(xp):
    rng = np.random.default_rng(4)
    a, g = rng.standard_normal((3, 2, 6)), rng.standard_normal((3, 7, 4))
    X = rng.standard_normal((3, 4, 6))
    for shifts, damping in (((0.0, 0.0), 0.1), ((0.2, 0.1), 0.0)):
        got = KronEigh.from_rows(*on(xp, a, g), 1.0, 1.0, *shifts).solve(on(xp, X), damping)
        for i in range(3):
            ref = KronEigh.from_rows(a[i], g[i], 1.0, 1.0, *shifts).solve(X[i], damping)
            assert rel_err(got[i, ...], ref) < 1e-12


def test_float32_single_batch_factor_is_more_accurate_than_dense():
    """K-FAC's one-batch factor of a wide layer: the Gram route beats ?syevd on the formed float32 factor
    (whose near-zero eigenvalues are rounding noise), measured against float64."""
    rng = np.random.default_rng(5)
    N, p, q = 32, 200, 6
    a, g = rng.standard_normal((N, p)), rng.standard_normal((N, q))
    X = rng.standard_normal((q, p))
    ref = KronEigh.from_rows(a, g, 1 / N, 1 / N).solve(X, 1e-2)
    A, G = _factors(a, g, 1 / N, 1 / N)
    assert rel_err(ref, unvec(sl.solve(np.kron(A, G) + 1e-2 * np.eye(p * q), vec(X)), q, p)) < 1e-10
    a32, g32, X32 = (x.astype(np.float32) for x in (a, g, X))
    thin = KronEigh.from_rows(a32, g32, 1 / N, 1 / N).solve(X32, 1e-2)
    dense = Kron(a32.T @ a32 / N, g32.T @ g32 / N).eigh().solve(X32, 1e-2)
    assert rel_err(thin, ref) < rel_err(dense, ref)


def test_apply_needs_a_function_of_the_products():
    rng = np.random.default_rng(6)
    E = KronEigh.from_rows(rng.standard_normal((2, 5)), rng.standard_normal((6, 3)))
    X = rng.standard_normal((3, 5))
    with pytest.raises(ValueError, match="function of the eigenvalue products"):
        E.apply(X, lambda d: rng.standard_normal(d.shape) ** 2 + 1.0)
    assert rel_err(E.apply(X, lambda d: np.ones_like(d)), X) < 1e-14


def test_refresh_from_a_thin_basis_is_cold():
    rng = np.random.default_rng(7)
    a, g = rng.standard_normal((2, 6)), rng.standard_normal((5, 3))
    E = KronEigh.from_rows(a, g)
    A, G = _factors(rng.standard_normal((9, 6)), rng.standard_normal((9, 3)), 1.0, 1.0)
    R = E.refresh(A, G, damping=0.1)
    assert R.refresh_info["A"] == "cold" and R.refresh_info["G"] == "cold"
    X = rng.standard_normal((3, 6))
    assert rel_err(R.solve(X, 0.1), Kron(A, G).eigh().solve(X, 0.1)) < 1e-12


@pytest.mark.parametrize("bad,match", [
    (lambda a, g: (a[0], g), "rows"),
    (lambda a, g: (a[:0], g), "order >= 1|shape"),
    (lambda a, g: (np.where(a > 1, np.nan, a), g), "NaN"),
    (lambda a, g: (np.broadcast_to(a, (2,) + a.shape), np.broadcast_to(g, (3,) + g.shape)), "broadcast"),
])
def test_bad_rows_refused(bad, match):
    rng = np.random.default_rng(8)
    a, g = rng.standard_normal((3, 5)), rng.standard_normal((4, 2))
    with pytest.raises(ValueError, match=match):
        KronEigh.from_rows(*bad(a, g))
    with pytest.raises(ValueError, match="scale_a"):
        KronEigh.from_rows(a, g, scale_a=0.0)
    with pytest.raises(ValueError, match="scale_a, scale_g"):  # the products lg·la overflow, not the factors
        KronEigh.from_rows(a, g, scale_a=1e300, scale_g=1e300)


def test_zero_rows_are_a_zero_factor():
    """All-zero rows give A = shift·I (a zero matrix is regular once damped), not an error."""
    rng = np.random.default_rng(10)
    X = rng.standard_normal((3, 5))
    assert rel_err(KronEigh.from_rows(np.zeros((2, 5)), rng.standard_normal((4, 3))).solve(X, 0.5), X / 0.5) < 1e-15
    assert rel_err(KronEigh.from_rows(np.zeros((2, 5)), np.zeros((1, 3)), shift_a=2.0, shift_g=0.5).solve(X), X) < 1e-15


@pytest.mark.parametrize("dtype,big", [("float64", 1e200), ("float32", 1e25)])
def test_overflowing_second_moment_raises(dtype, big):
    """Finite rows whose second moment leaves the dtype: FloatingPointError naming the rows, no warning."""
    rng = np.random.default_rng(9)
    a, g = rng.standard_normal((3, 8)).astype(dtype), rng.standard_normal((9, 4)).astype(dtype)
    for args, name in (((a * big, g), "aᵀa"), ((a, g * big), "gᵀg")):
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            with pytest.raises(FloatingPointError, match=name):
                KronEigh.from_rows(*args)


@pytest.mark.parametrize("na,p,ng,q", ROWS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shifts", [(0.3, 0.0), (0.0, 0.2), (0.05, 2.0)])
def test_shifted_factors_against_dense(xp, na, p, ng, q, dtype, shifts):
    """``(s_a aᵀa + shift_a I) ⊗ (s_g gᵀg + shift_g I)``: K-FAC's factored damping without a factorization."""
    rng = np.random.default_rng(na * 100 + p * 10 + q + 1)
    a, g = _rows(rng, na, p), _rows(rng, ng, q)
    A, G = _factors(a, g, 0.5, 1.5)
    A, G = A + shifts[0] * np.eye(p), G + shifts[1] * np.eye(q)
    X = rng.standard_normal((q, p))
    E = KronEigh.from_rows(*on(xp, a, g, dtype=dtype), 0.5, 1.5, *shifts)
    K = np.kron(A, G)
    damping = 1e-2 if 0.0 in shifts else 0.0
    M = K + damping * np.eye(p * q)
    cond = np.linalg.cond(M)
    assert rel_err(E.solve(on(xp, X, dtype=dtype), damping), unvec(sl.solve(M, vec(X)), q, p)) < tol(dtype, cond)
    ref = unvec(_dense_fn(A, G, lambda w: (w + damping) ** -0.5) @ vec(X), q, p)
    assert rel_err(E.power(on(xp, X, dtype=dtype), -0.5, damping), ref) < tol(dtype, cond)
    assert rel_err(E @ on(xp, X, dtype=dtype), unvec(K @ vec(X), q, p)) < tol(dtype)
    ref = unvec(_dense_fn(A, G, lambda w: w / (w + 1.0)) @ vec(X), q, p)
    assert rel_err(E.apply(on(xp, X, dtype=dtype), lambda d: d / (d + 1.0)), ref) < tol(dtype, 1e2)
    ev = np.sort(to_np(E.eigvals(damping)).ravel())
    assert np.max(np.abs(ev - np.sort(np.linalg.eigvalsh(M)))) <= tol(dtype) * ev.max()

