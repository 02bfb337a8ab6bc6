"""KronEigh.refresh (issue 13 item 2): the certified warm-started eigenbasis against cold decompositions.

References are dense (``np.kron`` + ``scipy.linalg.solve``) and cold ``Kron(A, G).eigh()``; the trajectory
test replays factors recorded from a real ``kronlin.train`` K-FAC run (``tests/data/kfac_trajectory.npz``,
written by ``python bench/refresh.py --save-test-data``).
"""

from __future__ import annotations

import copy
import math
import pickle
from pathlib import Path

import numpy as np
import pytest
import scipy.linalg as sl

from kronlin import Kron, KronEigh
from kronlin._validate import LinAlgError

from helpers import DTYPES, on, rel_err, to_np, tol
from kronlin.testing import spd, unvec, vec

DATA = Path(__file__).parent / "data" / "kfac_trajectory.npz"


def _psd(rng, n, rank=None):
    B = rng.standard_normal((n, rank or 2 * n))
    return B @ B.T / B.shape[1]


def _dense_solve(A, G, lam, X):
    p, q = A.shape[0], G.shape[0]
    return unvec(sl.solve(np.kron(A, G) + lam * np.eye(p * q), vec(X), assume_a="pos"), q, p)


def _worst_rel(E, A, G, lam):
    """max over x of ‖x̃ − x‖ / ‖x‖ = ‖K̃⁻¹(K − K̃)‖₂ for the operator E represents (dense, float64)."""
    Qa, la, Qg, lg = (to_np(t).astype(np.float64) for t in E)
    At, Gt = (Qa * la) @ Qa.T, (Qg * lg) @ Qg.T
    n = A.shape[0] * G.shape[0]
    Kt = np.kron(At, Gt) + lam * np.eye(n)
    return np.linalg.norm(np.linalg.solve(Kt, np.kron(A, G) - np.kron(At, Gt)), 2)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("p,q", [(1, 1), (6, 4), (13, 9)])
@pytest.mark.parametrize("step", [0.0, 1e-7, 1e-4, 1e-2])
@pytest.mark.parametrize("lam", [1e-3, 0.3])
def test_refresh_meets_rtol_against_dense(xp, dtype, p, q, step, lam):
    rng = np.random.default_rng(p * 31 + q)
    A0, G0 = _psd(rng, p), _psd(rng, q)
    A1, G1 = A0 + step * _psd(rng, p), G0 + step * _psd(rng, q)
    X = rng.standard_normal((q, p))
    E0 = Kron(*on(xp, A0, G0, dtype=dtype)).eigh()
    rtol = 1e-3
    E1 = E0.refresh(*on(xp, A1, G1, dtype=dtype), damping=lam, rtol=rtol)
    info = E1.refresh_info
    assert set(info) == {"A", "G", "bound", "checked"} and info["checked"]
    assert info["bound"] <= rtol
    got = E1.solve(on(xp, X, dtype=dtype), damping=lam)
    assert to_np(got).dtype == np.dtype(dtype)
    cond = (np.linalg.eigvalsh(A1)[-1] * np.linalg.eigvalsh(G1)[-1] + lam) / lam
    # the certified bound plus the rounding a cold eigh carries
    assert rel_err(got, _dense_solve(A1, G1, lam, X)) <= info["bound"] * 2 + tol(dtype, cond)
    if step == 0.0:
        assert info["A"] == info["G"] == "kept"  # an unchanged factor never needs a decomposition


@pytest.mark.parametrize("seed", range(6))
def test_bound_is_an_upper_bound_of_the_true_worst_case(seed):
    """η ≥ ‖K̃⁻¹(K − K̃)‖₂ (dense, float64) for kept bases over a range of stalenesses and dampings."""
    rng = np.random.default_rng(seed)
    p, q = int(rng.integers(2, 12)), int(rng.integers(2, 12))
    A0, G0 = _psd(rng, p, rank=max(1, p // 2)), _psd(rng, q)  # a rank-deficient factor too
    step = 10.0 ** rng.uniform(-6, 0)
    A1, G1 = A0 + step * _psd(rng, p), G0 + step * _psd(rng, q)
    for lam in (1e-4, 1e-2, 1.0):
        E = Kron(A0, G0).eigh().refresh(A1, G1, damping=lam, rtol=math.inf)
        assert E.refresh_info["A"] == E.refresh_info["G"] == "kept"
        worst = _worst_rel(E, A1, G1, lam)
        assert worst <= E.refresh_info["bound"] * (1 + 1e-10) + 1e-12
        assert E.refresh_info["bound"] <= 50 * worst + 1e-12  # and not vacuous (measured 1.0-2.5x over 90 cases)


def test_one_factor_cold_when_only_it_moved():
    rng = np.random.default_rng(1)
    A0, G0 = _psd(rng, 30), _psd(rng, 8)
    E0 = Kron(A0, G0).eigh()
    E1 = E0.refresh(A0 + 0.1 * _psd(rng, 30), G0, damping=1e-2)
    assert (E1.refresh_info["A"], E1.refresh_info["G"]) == ("cold", "kept")
    E2 = E0.refresh(A0, G0 + 0.1 * _psd(rng, 8), damping=1e-2)
    assert (E2.refresh_info["A"], E2.refresh_info["G"]) == ("kept", "cold")


def test_eigenvalue_correction_is_the_rayleigh_quotient():
    rng = np.random.default_rng(2)
    A0, G0 = _psd(rng, 7), _psd(rng, 5)
    A1, G1 = A0 + 1e-3 * _psd(rng, 7), G0 + 1e-3 * _psd(rng, 5)
    E0 = Kron(A0, G0).eigh()
    Qa, la, Qg, lg = E0.refresh(A1, G1, damping=1.0, rtol=math.inf)
    np.testing.assert_array_equal(Qa, E0.Qa)
    np.testing.assert_allclose(la, np.diag(E0.Qa.T @ A1 @ E0.Qa), rtol=1e-13, atol=1e-15)
    np.testing.assert_allclose(lg, np.diag(E0.Qg.T @ G1 @ E0.Qg), rtol=1e-13, atol=1e-15)


def test_recorded_kfac_trajectory():
    """Factors of a real curves-ae K-FAC run (refresh every step): every warm step within rtol of the cold one."""
    z = np.load(DATA)
    layers, n = [int(k) for k in z["layers"]], int(z["n_refresh"])
    for rtol in (1e-3, 1e-1):
        for k in layers:
            E = None
            for r in range(n):
                A, G, V, lam = z[f"r{r}_l{k}_A"], z[f"r{r}_l{k}_G"], z[f"r{r}_l{k}_V"], float(z[f"r{r}_lam"])
                cold = Kron(A, G).eigh()
                if E is None:
                    E = cold
                    continue
                # the kept-basis step (never falling back) is within its own certified bound
                K = E.refresh(A, G, damping=lam, rtol=math.inf)
                ref = cold.solve(V, damping=lam)
                err = np.linalg.norm(K.solve(V, damping=lam) - ref) / np.linalg.norm(ref)
                assert err <= K.refresh_info["bound"] * (1 + 1e-8) + 1e-12
                E = E.refresh(A, G, damping=lam, rtol=rtol)
                err = np.linalg.norm(E.solve(V, damping=lam) - ref) / np.linalg.norm(ref)
                assert err <= rtol * (1 + 1e-8) + 1e-12, (k, r, E.refresh_info)


def test_failed_checks_back_off_and_stay_exact():
    rng = np.random.default_rng(3)
    E = Kron(_psd(rng, 6), _psd(rng, 5)).eigh()
    checked = []
    for _ in range(12):
        A, G = _psd(rng, 6), _psd(rng, 5)  # unrelated factors: the old basis never fits
        E = E.refresh(A, G, damping=1e-3)
        checked.append(E.refresh_info["checked"])
        assert (E.refresh_info["A"], E.refresh_info["G"]) == ("cold", "cold")
        X = rng.standard_normal((5, 6))
        assert rel_err(E.solve(X, damping=1e-3), _dense_solve(A, G, 1e-3, X)) < tol("float64", 1e4)
    # checks at refreshes 1, 3, 7 (skipping 1, then 3), then every 8th at most
    assert checked == [True, False, True, False, False, False, True] + [False] * 5
    # rtol=inf ignores the back-off (it never falls back)
    assert E.refresh(A, G, damping=1e-3, rtol=math.inf).refresh_info["checked"]


def test_stack_refresh_matches_items():
    rng = np.random.default_rng(4)
    A0 = np.stack([_psd(rng, 5) for _ in range(3)])
    G0 = np.stack([_psd(rng, 4) for _ in range(3)])
    A1, G1 = A0 + 1e-6 * np.stack([_psd(rng, 5) for _ in range(3)]), G0.copy()
    E = Kron(A0, G0).eigh().refresh(A1, G1, damping=0.1)
    X = rng.standard_normal((3, 4, 5))
    got = E.solve(X, damping=0.1)
    for b in range(3):
        assert rel_err(got[b], _dense_solve(A1[b], G1[b], 0.1, X[b])) <= E.refresh_info["bound"] * 2 + tol("float64", 1e3)


def test_result_pickles_and_is_independent():
    rng = np.random.default_rng(5)
    A0, G0 = _psd(rng, 4), _psd(rng, 3)
    E0 = Kron(A0, G0).eigh()
    A1 = A0 + 1e-9 * _psd(rng, 4)
    E1 = E0.refresh(A1, G0, damping=0.1)
    A1[...] = 0.0  # snapshot semantics: the caller's array is not held
    X = rng.standard_normal((3, 4))
    for C in (pickle.loads(pickle.dumps(E1)), copy.deepcopy(E1)):
        np.testing.assert_array_equal(C.solve(X, damping=0.1), E1.solve(X, damping=0.1))
        assert C.refresh_info == E1.refresh_info
    assert E0.refresh_info is None


def test_refresh_validates():
    rng = np.random.default_rng(6)
    A, G = _psd(rng, 4), _psd(rng, 3)
    E = Kron(A, G).eigh()
    with pytest.raises(ValueError, match="shapes, dtype and library"):
        E.refresh(_psd(rng, 5), G, damping=0.1)
    with pytest.raises(ValueError, match="shapes, dtype and library"):
        E.refresh(A.astype(np.float32), G.astype(np.float32), damping=0.1)
    with pytest.raises(ValueError, match="damping"):
        E.refresh(A, G, damping=-1.0)
    with pytest.raises(ValueError, match="rtol"):
        E.refresh(A, G, damping=0.1, rtol=0.0)
    with pytest.raises(ValueError, match="symmetric"):
        E.refresh(A + np.triu(np.ones((4, 4)), 1), G, damping=0.1)
    with pytest.raises(LinAlgError, match="positive semi-definite"):
        E.refresh(A - 10 * np.eye(4), G, damping=0.1)
    assert isinstance(E.refresh(A, G, damping=0.1), KronEigh)


@pytest.mark.parametrize("dtype", DTYPES)
def test_refresh_across_byte_orders(dtype):
    """An operator's dtype is float32 or float64 whatever its inputs' byte order: an eigenbasis of big-endian
    factors refreshes with native ones and the other way round (it refused them, naming the dtypes '>f8' and
    'float64'), and the refreshed solve meets rtol against the dense solve."""
    rng = np.random.default_rng(9)
    A, G = _psd(rng, 5).astype(dtype), _psd(rng, 4).astype(dtype)
    A1, G1 = (A + 0.01 * _psd(rng, 5)).astype(dtype), (G + 0.01 * _psd(rng, 4)).astype(dtype)
    X = rng.standard_normal((4, 5)).astype(dtype)
    swap = lambda M: M.astype(M.dtype.newbyteorder())  # noqa: E731
    for E, (A2, G2) in ((Kron(swap(A), swap(G)).eigh(), (A1, G1)), (Kron(A, G).eigh(), (swap(A1), swap(G1)))):
        assert E.dtype == np.dtype(dtype) and E.dtype.isnative
        R = E.refresh(A2, G2, damping=0.1)
        got = R.solve(X, 0.1)
        assert got.dtype == np.dtype(dtype)
        ref = _dense_solve(A1.astype(np.float64), G1.astype(np.float64), 0.1, X.astype(np.float64))
        assert rel_err(got, ref) < 1e-3 + tol(dtype, 100.0)
