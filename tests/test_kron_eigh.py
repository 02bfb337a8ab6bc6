"""KronEigh: eigendecomposition, exact damped solves and matrix functions against dense scipy."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.linalg as sl

from kronlin import Kron, KronEigh
from kronlin import _linalg
from kronlin.testing import spd, unvec, vec

from helpers import DTYPES, on, rel_err, to_np, tol

SHAPES = [(1, 1), (3, 1), (1, 4), (5, 7), (13, 11), (19, 8)]


def _dense_fn(A, G, fn):
    """f(A ⊗ G) from the dense eigendecomposition (scipy reference)."""
    w, V = sl.eigh(np.kron(A, G))
    return (V * fn(w)) @ V.T


@pytest.mark.parametrize("p,q", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("cond", [1.0, 1e3])
@pytest.mark.parametrize("damping", [0.0, 1e-2, 3.0])
def test_damped_solve_against_dense(xp, p, q, dtype, cond, damping):
    rng = np.random.default_rng(p * 7 + q)
    A, G = spd(rng, p, cond), spd(rng, q, cond)
    X = rng.standard_normal((q, p))
    E = Kron(*on(xp, A, G, dtype=dtype)).eigh()
    ref = unvec(sl.solve(np.kron(A, G) + damping * np.eye(p * q), vec(X)), q, p)
    got = E.solve(on(xp, X, dtype=dtype), damping=damping)
    assert to_np(got).dtype == np.dtype(dtype)
    assert rel_err(got, ref) < tol(dtype, cond**2)
    # solve(., 0) agrees with the Cholesky solve of Kron
    if damping == 0.0:
        assert rel_err(got, Kron(*on(xp, A, G, dtype=dtype)).solve(on(xp, X, dtype=dtype))) < tol(dtype, cond**2)


@pytest.mark.parametrize("power", [-1.0, -0.5, -0.25, 0.5, 1.0, 2.0, 1.7])
@pytest.mark.parametrize("dtype", DTYPES)
def test_power_against_fractional_matrix_power(xp, power, dtype):
    rng = np.random.default_rng(3)
    p, q, damping = 6, 4, 0.1
    A, G = spd(rng, p, 100.0), spd(rng, q, 100.0)
    X = rng.standard_normal((q, p))
    M = np.kron(A, G) + damping * np.eye(p * q)
    ref = unvec(np.real(sl.fractional_matrix_power(M, power)) @ vec(X), q, p)
    got = Kron(*on(xp, A, G, dtype=dtype)).eigh().power(on(xp, X, dtype=dtype), power, damping)
    assert rel_err(got, ref) < tol(dtype, 1e4)


@pytest.mark.parametrize("dtype", DTYPES)
def test_apply_matrix_function(xp, dtype):
    rng = np.random.default_rng(4)
    A, G = spd(rng, 5, 30.0), spd(rng, 3, 30.0)
    X = rng.standard_normal((3, 5))
    E = Kron(*on(xp, A, G, dtype=dtype)).eigh()
    got = E.apply(on(xp, X, dtype=dtype), lambda d: (d + 1e-3) ** -0.25)
    ref = unvec(_dense_fn(A, G, lambda w: (w + 1e-3) ** -0.25) @ vec(X), 3, 5)
    assert rel_err(got, ref) < tol(dtype, 1e2)
    # exp: a function that is not a power, on flat vectors
    got = E.apply(on(xp, vec(X), dtype=dtype), lambda d: xp.exp(-d / 100))
    assert rel_err(got, _dense_fn(A, G, lambda w: np.exp(-w / 100)) @ vec(X)) < tol(dtype, 1e2)


def test_apply_rejects_bad_fn_output():
    E = Kron(np.eye(3), np.eye(2)).eigh()
    with pytest.raises(ValueError, match="broadcastable"):
        E.apply(np.ones((2, 3)), lambda d: np.ones((4, 4)))
    with pytest.raises(ValueError, match="NaN or infinity"):
        E.apply(np.ones((2, 3)), lambda d: d * np.inf)


def test_unpacking_and_reconstruction(xp):
    rng = np.random.default_rng(5)
    A, G = spd(rng, 4, 10.0), spd(rng, 3, 10.0)
    Qa, la, Qg, lg = Kron(*on(xp, A, G)).eigh()
    Qa, la, Qg, lg = map(to_np, (Qa, la, Qg, lg))
    assert rel_err((Qa * la) @ Qa.T, A) < 1e-13 and rel_err((Qg * lg) @ Qg.T, G) < 1e-13
    E2 = KronEigh(*on(xp, Qa, la, Qg, lg))
    X = rng.standard_normal((3, 4))
    assert rel_err(E2 @ on(xp, X), G @ X @ A.T) < 1e-13
    assert rel_err(E2.eigvals(0.5), np.outer(lg, la) + 0.5) < 1e-14
    assert abs(float(to_np(E2.logdet(0.5))) - np.linalg.slogdet(np.kron(A, G) + 0.5 * np.eye(12))[1]) < 1e-12


def test_linear_operator_of_damped_inverse_root():
    from scipy.sparse.linalg import cg

    rng = np.random.default_rng(6)
    A, G = spd(rng, 6, 10.0), spd(rng, 5, 10.0)
    E = Kron(A, G).eigh()
    L = E.aslinearoperator(power=-0.5, damping=0.2)
    M = np.real(sl.fractional_matrix_power(np.kron(A, G) + 0.2 * np.eye(30), -0.5))
    v = rng.standard_normal(30)
    assert rel_err(L @ v, M @ v) < 1e-12 and rel_err(L.rmatvec(v), M @ v) < 1e-12
    x, info = cg(E.aslinearoperator(), v, rtol=1e-12, atol=0.0)
    assert info == 0 and rel_err(x, sl.solve(np.kron(A, G), v)) < 1e-8


def test_singular_factor_needs_damping():
    A = np.diag([1.0, 0.0, 2.0])  # PSD, singular
    E = Kron(A, np.eye(2)).eigh()
    with pytest.raises(np.linalg.LinAlgError, match="damping > 0"):
        E.solve(np.ones((2, 3)))
    ok = E.solve(np.ones((2, 3)), damping=1e-3)
    assert np.all(np.isfinite(ok))
    with pytest.raises(np.linalg.LinAlgError, match="damping > 0"):
        E.logdet()


def test_psd_clipping_and_rejection():
    rng = np.random.default_rng(8)
    Q = np.linalg.qr(rng.standard_normal((5, 5)))[0]
    w = np.array([-1e-17, 0.0, 1.0, 2.0, 3.0])  # round-off negative: clipped
    A = (Q * w) @ Q.T
    A = (A + A.T) / 2
    la = to_np(Kron(A, np.eye(2)).eigh().la)
    assert la.min() >= 0.0
    B = (Q * np.array([-1e-3, 0.0, 1.0, 2.0, 3.0])) @ Q.T
    B = (B + B.T) / 2
    with pytest.raises(np.linalg.LinAlgError, match="A .*not positive semi-definite"):
        Kron(B, np.eye(2)).eigh()
    # indefinite factors are allowed with psd=False; then integer powers still work
    E = Kron(B, np.eye(2)).eigh(psd=False)
    assert to_np(E.la).min() < 0
    X = rng.standard_normal((2, 5))
    assert rel_err(E.power(X, 1.0), X @ B.T) < 1e-12
    with pytest.raises(np.linalg.LinAlgError, match="fractional power"):
        E.power(X, -0.5)


def test_float32_eigh_failure_retries_in_float64(monkeypatch):
    """A float32 eigh that returns NaN (as LAPACK/cuSOLVER sometimes do) is redone in float64."""
    real = _linalg._syevd  # NumPy float32/float64 matrices go to LAPACK ?syevd directly (issue 13)

    def flaky(M):
        if M.dtype == np.float32:
            w, V = real(M)
            return w * np.nan, V
        return real(M)

    monkeypatch.setattr(_linalg, "_syevd", flaky)
    rng = np.random.default_rng(9)
    A = spd(rng, 4, 10.0).astype(np.float32)
    w, Q = _linalg.eigh(np, A, "A")
    assert w.dtype == np.float32 and np.all(np.isfinite(w))
    assert rel_err((Q * w) @ Q.T, A) < 1e-5

    def broken(M):
        return None  # LAPACK's info > 0: did not converge

    monkeypatch.setattr(_linalg, "_syevd", broken)
    with pytest.raises(np.linalg.LinAlgError, match="eigendecomposition of A"):
        _linalg.eigh(np, A, "A")


def test_extension_and_reference_paths_agree():
    from kronlin import _ext

    rng = np.random.default_rng(10)
    A, G = spd(rng, 9, 50.0, (2,)), spd(rng, 7, 50.0, (2,))
    X = rng.standard_normal((3, 2, 7, 9))
    for dtype in DTYPES:
        E = Kron(A.astype(dtype), G.astype(dtype)).eigh()
        for power in (-1.0, -0.5, 0.5, 1.0, -0.3):
            fast = E.power(X.astype(dtype), power, 0.1)
            with _ext.disabled():
                ref = E.power(X.astype(dtype), power, 0.1)
            assert rel_err(fast, ref) < (1e-14 if dtype == "float64" else 1e-6)


@pytest.mark.parametrize("kind", ["full", "thin", "thin-shifted"])
@pytest.mark.parametrize("damping, power", [(0.0, -1.0), (0.3, -1.0), (0.3, -0.5), (0.0, 1.0)])
def test_a_nonfinite_right_hand_side_is_named_wherever_it_sits(xp, kind, damping, power):
    """solve/power check X through the result (the orthonormal bases carry a NaN or infinity of any entry
    into it): every position, NaN and ±inf, on full and thin (from the rows) bases, is refused naming X."""
    rng = np.random.default_rng(7)
    p, q = 5, 3
    if kind == "full":
        E = Kron(on(xp, spd(rng, p)), on(xp, spd(rng, q))).eigh()
    else:
        shift = (0.2, 0.1) if kind == "thin-shifted" else (0.0, 0.0)
        a, g = rng.standard_normal((2, p)), rng.standard_normal((2, q))
        E = KronEigh.from_rows(on(xp, a), on(xp, g), shift_a=shift[0], shift_g=shift[1])
        if shift == (0.0, 0.0) and damping == 0.0:
            pytest.skip("singular without damping or shifts")
    X = rng.standard_normal((q, p))
    assert np.all(np.isfinite(to_np(E.power(on(xp, X), power, damping))))
    for bad in (np.nan, np.inf, -np.inf):
        for i in range(q):
            for j in range(p):
                Xb = X.copy()
                Xb[i, j] = bad
                with pytest.raises(ValueError, match=r"^X \(shape \(3, 5\)\) contains NaN or infinity"):
                    E.power(on(xp, Xb), power, damping)
        flat = X.T.reshape(-1).copy()  # a flat column-stacked vector: the message shows its own shape
        flat[4] = bad
        with pytest.raises(ValueError, match=r"^X \(shape \(15\)\) contains NaN or infinity"):
            E.solve(on(xp, flat), damping=max(damping, 0.1))
