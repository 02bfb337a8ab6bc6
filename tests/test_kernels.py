"""Compiled kernels against their NumPy references (one test module per kernel family)."""

from __future__ import annotations

import contextlib
import math

import numpy as np
import pytest
import scipy.linalg as sl

import kronlin
from badinput import layout
from kronlin import Kron, _ext, kernels
from kronlin._kernels import _dispatch, cholesky
from kronlin._kernels.block_apply import COMPILED_MAX_ORDER, block_apply, block_apply_compiled, gemm_address
from kronlin._kernels.eig_scale import eig_scale, eig_scale_reference
from kronlin._kernels.symmetric import (asymmetry, asymmetry_reference, mirror_lower, mirror_lower_reference,
                                        stack_asymmetry)
from kronlin._kernels.woodbury_gram import gram_shared, gram_shared_reference
from kronlin._validate import check_symmetric
from kronlin.testing import spd

from helpers import rel_err

POWERS = [-1.0, -0.5, 0.5, 1.0, -0.25, 2.0, 0.0]


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("power", POWERS)
@pytest.mark.parametrize("shape", [(1, 1, 1), (1, 7, 5), (3, 13, 17), (2, 256, 300)])
def test_eig_scale_cpu_matches_reference(cpu_ext, dtype, power, shape):
    rng = np.random.default_rng(sum(shape))
    B, q, p = shape
    Y = rng.standard_normal(shape).astype(dtype)
    lg = rng.uniform(0.1, 3.0, (B, q)).astype(dtype)
    la = rng.uniform(0.1, 3.0, (B, p)).astype(dtype)
    ref = eig_scale_reference(np, Y, lg, la, 0.25, power)
    Yk = Y.copy()
    cpu_ext.eig_scale(Yk, lg, la, 0.25, power)
    # a few ulps: pow/sqrt/division are correctly rounded or within 1 ulp in both paths
    assert rel_err(Yk, ref) < (1e-15 if dtype == "float64" else 1e-6) * 4


def test_eig_scale_dispatch_broadcasts_eigenvalues(cpu_ext):
    rng = np.random.default_rng(1)
    Y = rng.standard_normal((4, 3, 6, 5))
    lg = rng.uniform(1, 2, (3, 6))  # factor batch (3,) broadcast against Y's (4, 3)
    la = rng.uniform(1, 2, (5,))
    ref = eig_scale_reference(np, Y, lg, la, 0.0, -1.0)
    got = eig_scale(np, Y.copy(), lg, la, 0.0, -1.0)
    assert rel_err(got, ref) < 1e-15


def test_eig_scale_non_contiguous_takes_reference():
    Y = np.asfortranarray(np.ones((4, 3)))
    out = eig_scale(np, Y, np.ones(4), 2 * np.ones(3), 0.0, -1.0)
    assert np.allclose(out, 0.5) and np.allclose(Y, 1.0)


def test_eig_scale_binding_rejects_bad_layout(cpu_ext):
    with pytest.raises(ValueError, match="C-contiguous"):
        cpu_ext.eig_scale(np.ones((1, 4, 3)).transpose(0, 2, 1), np.ones((1, 3)), np.ones((1, 4)), 0.0, -1.0)
    with pytest.raises(ValueError, match="one dtype"):
        cpu_ext.eig_scale(np.ones((1, 2, 2)), np.ones((1, 2), np.float32), np.ones((1, 2)), 0.0, -1.0)
    with pytest.raises(ValueError, match="do not agree"):
        cpu_ext.eig_scale(np.ones((1, 2, 2)), np.ones((1, 3)), np.ones((1, 2)), 0.0, -1.0)


def test_disabled_context_forces_reference(cpu_ext):
    assert _ext.cpu() is cpu_ext
    with _ext.disabled():
        assert _ext.cpu() is None
    assert _ext.cpu() is cpu_ext


# -- dispatch: one helper chooses C++, CUDA or the reference for every family --------------------
class _RecordingCuda:
    """Stand-in for ``kronlin._cuda`` on the CPU: checks operands like the typed bindings, records, computes."""

    def __init__(self):
        self.calls = []

    @staticmethod
    def _same_dtype(**ops):
        dts = {name: a.dtype for name, a in ops.items()}
        if len(set(dts.values())) != 1:
            raise ValueError(f"operands of different dtypes: {dts}")

    def eig_scale(self, Y, lg, la, shift, power, stream):
        self._same_dtype(Y=Y, lg=lg, la=la)
        self.calls.append(("eig_scale", Y.dtype, lg.dtype, la.dtype, stream))
        Y[...] = eig_scale_reference(np, Y, lg, la, shift, power)

    def woodbury_gram_shared(self, A, E, K, scale, stream):
        self._same_dtype(A=A, E=E, K=K)
        self.calls.append(("woodbury_gram_shared", A.dtype, E.dtype, K.dtype, stream))
        N, T = A.shape[0], A.shape[1]
        K[...] = scale * gram_shared_reference(np, A, E.reshape(N, -1, T, E.shape[-1]))


@pytest.fixture
def fake_cuda(monkeypatch):
    """Route NumPy arrays through the CUDA branch of the dispatch, with a recording stand-in module."""
    mod = _RecordingCuda()
    monkeypatch.setattr(_dispatch, "module_for", lambda xp: (mod, "cuda") if xp is np else (None, None))
    monkeypatch.setattr(_dispatch, "_cupy_stream", lambda: 1234)
    return mod


@pytest.mark.parametrize("op_dtype,rhs_dtype", [("float32", "float64"), ("float64", "float32"), ("float32", "float32")])
def test_eig_scale_cuda_branch_gets_one_dtype(fake_cuda, op_dtype, rhs_dtype):
    """The old CUDA branch passed float32 eigenvalues with is_double=True for a float64 right-hand side."""
    rng = np.random.default_rng(3)
    A, G = spd(rng, 6, 10.0), spd(rng, 5, 10.0)
    X = rng.standard_normal((5, 6))
    got = Kron(A.astype(op_dtype), G.astype(op_dtype)).eigh().solve(X.astype(rhs_dtype), 0.1)
    out_dtype = np.result_type(op_dtype, rhs_dtype)
    assert got.dtype == out_dtype
    assert fake_cuda.calls == [("eig_scale", out_dtype, out_dtype, out_dtype, 1234)]
    # reference in float64 from the very values the operator and right-hand side hold
    A, G, X = (M.astype(op_dtype).astype(np.float64) for M in (A, G, X.astype(rhs_dtype)))
    ref = np.linalg.solve(np.kron(A, G) + 0.1 * np.eye(30), X.flatten("F")).reshape((5, 6), order="F")
    # a float32 operator's eigendecomposition carries float32 round-off whatever the right-hand side
    assert rel_err(got, ref) < (1e-12 if op_dtype == "float64" else 1e-5)


def test_gram_cuda_branch_allocates_the_output(fake_cuda):
    rng = np.random.default_rng(4)
    A, E = rng.standard_normal((3, 9, 4)), rng.standard_normal((3, 2, 9, 5))
    K = gram_shared(np, A, E, "kernel")
    assert [c[0] for c in fake_cuda.calls] == ["woodbury_gram_shared"] and fake_cuda.calls[0][-1] == 1234
    assert rel_err(K, gram_shared_reference(np, A, E)) < 1e-14


def test_dispatch_chooses_per_namespace(cpu_ext):
    k = _dispatch.kernel(np, "eig_scale")
    assert k.device == "cpu" and k.fn is cpu_ext.eig_scale and k.stream is None
    assert _dispatch.kernel(np, "no_such_kernel") is None
    strict = pytest.importorskip("array_api_strict")
    assert _dispatch.kernel(strict, "eig_scale") is None
    with _ext.disabled():
        assert _dispatch.kernel(np, "eig_scale") is None


# -- the symmetric-matrix family (csrc/cpu/symmetric_cpu.cpp) ------------------------------------------------
# orders on both sides of the 64-entry tiles, and every remainder of the 4 x 4 / 2 x 2 register transposes
SYM_SHAPES = [(1, 2, 2), (2, 7, 7), (1, 63, 63), (1, 64, 64), (1, 65, 65), (3, 129, 129), (1, 130, 130), (2, 300, 300),
              (200, 8, 8)]


def _stack(shape, dtype, seed=0, asym=0.0):
    rng = np.random.default_rng(seed)
    X = rng.standard_normal(shape)
    S = X + np.swapaxes(X, -1, -2)
    if asym:
        S[..., -1, 0] += asym  # one entry off symmetry, in the last tile pair
    return S.astype(dtype)


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("shape", SYM_SHAPES)
@pytest.mark.parametrize("asym", [0.0, 0.37])
def test_asymmetry_cpu_matches_reference(cpu_ext, dtype, shape, asym):
    S = _stack(shape, dtype, sum(shape), asym)
    got = cpu_ext.asymmetry(np.ascontiguousarray(S))
    ref = asymmetry_reference(np, S)
    # both are maxima of the same |a - b| and |a| (exact in the dtype): equal, not close
    assert got == ref
    assert (got[0] > 0) == (asym != 0.0)


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("where", [(37, 5), (5, 37), (130, 64), (64, 130), (299, 298), (298, 299), (200, 199)])
def test_asymmetry_cpu_finds_one_entry_anywhere(cpu_ext, dtype, where):
    """One entry off symmetry at places the kernel reaches differently (its vector lanes, the pairs left over
    in a row, the diagonal tile's triangle, either side of the diagonal): the same maximum as the reference."""
    S = _stack((1, 300, 300), dtype, 5)
    S[(0,) + where] += 0.25
    got = cpu_ext.asymmetry(S)
    assert got == asymmetry_reference(np, S)
    assert got[0] == float(abs(S[(0,) + where] - S[(0,) + where[::-1]]))


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("n", [2, 3, 5, 8, 9, 63, 64, 65, 67, 131])
def test_asymmetry_cpu_finds_one_entry_at_every_place(cpu_ext, dtype, n):
    """Every off-diagonal place, one at a time (orders around the register blocks' and the tile's widths): the
    diagonal tile transposes only its blocks below the diagonal, and none that a pair needs may be left out."""
    S = _stack((1, n, n), dtype, n)
    base = cpu_ext.asymmetry(S)
    assert base[0] == 0.0
    for i, j in ((i, j) for i in range(n) for j in range(n) if i != j):
        old = S[0, i, j]
        S[0, i, j] = old + 1
        got = cpu_ext.asymmetry(S)
        assert got[0] == float(abs(S[0, i, j] - S[0, j, i])), (i, j)
        S[0, i, j] = old


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("where", [(0, 0), (5, 70), (70, 5), (3, 40), (79, 78)])
def test_nonfinite_entry_gives_nan_in_both_paths(cpu_ext, bad, where):
    S = _stack((1, 80, 80), "float64")
    S[(0,) + where] = bad
    for got in (cpu_ext.asymmetry(S), asymmetry_reference(np, S)):
        assert math.isnan(got[0]) and math.isnan(got[1])


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("shape", SYM_SHAPES + [(1, 1, 1)])
def test_mirror_lower_cpu_matches_reference(cpu_ext, dtype, shape):
    rng = np.random.default_rng(len(shape) + shape[-1])
    S = rng.standard_normal(shape).astype(dtype)
    lower = np.tril(S)
    got, ref = S.copy(), S.copy()
    cpu_ext.mirror_lower(got)
    mirror_lower_reference(np, ref)
    assert np.array_equal(got, ref)
    assert np.array_equal(got, np.swapaxes(got, -1, -2)) and np.array_equal(np.tril(got), lower)


def test_symmetric_dispatch_runs_kernel_or_reference_alike(cpu_ext):
    """The dispatching entry points give the same answers with the extension and without it, for
    2-D and stacked input and non-contiguous input (which always takes the reference)."""
    S = _stack((4, 150, 150), "float32", 3, asym=1e-3)
    for x in (S, S[0], S[:, ::-1, ::-1], np.asfortranarray(S[1])):
        with kernels.disabled():
            ref = asymmetry(np, x)
        assert asymmetry(np, x) == ref
    L = np.tril(np.random.default_rng(1).standard_normal((3, 140, 140)))
    a, b = L.copy(), L.copy()
    mirror_lower(np, a)
    with kernels.disabled():
        mirror_lower(np, b)
    assert np.array_equal(a, b) and np.array_equal(a, np.swapaxes(a, -1, -2))


def test_symmetric_bindings_reject_bad_layout(cpu_ext):
    with pytest.raises(ValueError, match="square"):
        cpu_ext.asymmetry(np.ones((2, 3, 4)))
    with pytest.raises(ValueError, match="C-contiguous"):
        cpu_ext.mirror_lower(np.ones((1, 3, 6))[:, :, ::2])
    with pytest.raises(ValueError, match="float32 or float64"):
        cpu_ext.asymmetry(np.ones((1, 3, 3), dtype=np.int64))
    ro = np.ones((1, 3, 3))
    ro.flags.writeable = False
    with pytest.raises(ValueError, match="writeable"):
        cpu_ext.mirror_lower(ro)


def test_symmetry_check_tolerance_is_unchanged():
    """check_symmetric accepts round-off (SYM_RTOL_FACTOR·eps·max|x|) and refuses more, both paths."""
    S = _stack((1, 100, 100), "float64", 7)[0]
    scale = float(np.abs(S).max())
    for ctx in (contextlib.nullcontext, kernels.disabled):
        with ctx():
            T = S.copy()
            T[3, 90] += 2 * np.finfo(np.float64).eps * scale
            check_symmetric(np, T, "T")
            T[3, 90] += 1e-6 * scale
            with pytest.raises(ValueError, match=r"T \(shape \(100, 100\)\) must be symmetric"):
                check_symmetric(np, T, "T")


def test_bindings_take_equivalent_dtypes_not_only_the_canonical_one(cpu_ext):
    """An unpickled array (and one received over MPI, which pickles) carries its own float64 descriptor,
    equal to the canonical one but not the same object: the bindings compared descriptors by identity
    and refused it ("dtype must be float32 or float64", seen resuming a distributed run on 3 ranks).
    A byte-swapped array is a different dtype and is still refused (the dispatch sends it to the
    reference)."""
    import pickle

    def twin(a):
        b = pickle.loads(pickle.dumps(a))
        assert b.dtype == a.dtype and b.dtype is not a.dtype  # the case being tested
        return b

    rng = np.random.default_rng(0)
    S = rng.standard_normal((1, 5, 5))
    S = S + np.swapaxes(S, -1, -2)
    assert cpu_ext.asymmetry(twin(S)) == cpu_ext.asymmetry(S)
    L, L2 = np.tril(S), twin(np.tril(S))
    cpu_ext.mirror_lower(L)
    cpu_ext.mirror_lower(L2)
    assert np.array_equal(L, L2)
    Y, lg, la = rng.standard_normal((1, 3, 4)), rng.uniform(1, 2, (1, 3)), rng.uniform(1, 2, (1, 4))
    Y2 = twin(Y)
    cpu_ext.eig_scale(Y, lg, la, 0.5, -1.0)
    cpu_ext.eig_scale(Y2, twin(lg), la, 0.5, -1.0)
    assert np.array_equal(Y, Y2)
    A, E = rng.standard_normal((2, 3, 4)), rng.standard_normal((2, 3, 5))
    assert np.array_equal(cpu_ext.woodbury_gram_shared(twin(A), twin(E), 1.0), cpu_ext.woodbury_gram_shared(A, E, 1.0))
    with pytest.raises(ValueError, match="float32 or float64"):
        cpu_ext.asymmetry(S.astype(">f8"))
    with kernels.disabled():
        ref = asymmetry(np, S)
    assert asymmetry(np, S.astype(">f8")) == ref  # the dispatch takes the reference for it


# -- the Cholesky family (csrc/cpu/cholesky_cpu.cpp) ------------------------------------------------------------
CHOL_SHAPES = [(1, 1, 1), (3, 2, 2), (200, 8, 8), (5, 63, 63), (4, 64, 64), (2, 130, 130), (2, 256, 256),
               (2, 257, 257), (3, 47, 47), (3, 48, 48)]  # either side of POTRF_LOWER_ORDERS' ends


def _spd_stack(shape, dtype, seed=0):
    rng = np.random.default_rng(seed)
    X = rng.standard_normal(shape[:-1] + (2 * shape[-1],))
    return (X @ np.swapaxes(X, -1, -2) / shape[-1] + 0.1 * np.eye(shape[-1])).astype(dtype)


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("shape", CHOL_SHAPES)
def test_cholesky_stack_kernels_match_references_bit_for_bit(cpu_ext, dtype, shape):
    """The kernels make the references' LAPACK calls (SciPy's own routines) on the same layout: equal results,
    an exactly symmetric inverse, the input untouched; and they are the inverse (checked against float64)."""
    S = _spd_stack(shape, dtype, sum(shape))
    S0 = S.copy()
    L, info = cholesky.potrf_stack(S)
    with kernels.disabled():
        L_ref, info_ref = cholesky.potrf_stack(S)
    assert not info.any() and not info_ref.any() and info.dtype == np.int32
    assert np.array_equal(L, L_ref) and np.array_equal(S, S0)
    assert np.array_equal(np.triu(L, 1), np.zeros_like(L))  # C-ordered lower factors, zeros above
    Inv, Inv_ref, Inv_potri = L.copy(), L_ref.copy(), L_ref.copy()
    assert not cholesky.potri_stack(Inv).any()
    assert not cholesky.potri_stack_reference(Inv_ref).any()
    with kernels.disabled():  # without the extension: the loop of ?potri calls
        assert not cholesky.potri_stack(Inv_potri).any()
    Inv_potri_compiled = L.copy()
    assert not cholesky.potri_stack(Inv_potri_compiled, by_halves=False).any()
    assert np.array_equal(Inv, Inv_ref) and np.array_equal(Inv, np.swapaxes(Inv, -1, -2))
    assert np.array_equal(Inv_potri, Inv_potri_compiled) and np.array_equal(Inv_potri, np.swapaxes(Inv_potri, -1, -2))
    exact = np.linalg.inv(S.astype(np.float64))
    tol = 50 * np.finfo(dtype).eps * np.linalg.cond(S.astype(np.float64)).max()  # an inverse's relative error
    for X in (Inv, Inv_potri):
        assert np.abs(X - exact).max() <= tol * np.abs(exact).max()


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("n", [5, 47, 48, 64, 256, 257, 300])
@pytest.mark.parametrize("overwrite", [False, True])
def test_cholesky_stack_factors_read_the_lower_triangle_only(cpu_ext, dtype, n, overwrite):
    """Whichever ``uplo`` LAPACK is called with (``'L'`` on the transposed lower triangle at
    POTRF_LOWER_ORDERS, ``'U'`` else), the factor is that of the lower triangle: garbage above the diagonal
    changes nothing, in place or not, compiled or not (bit for bit), and ``L Lᵀ`` is the matrix."""
    S = _spd_stack((3, n, n), dtype, n)
    clean = np.tril(S) + np.swapaxes(np.tril(S, -1), -1, -2)
    dirty = S + np.triu(np.full_like(S, 7.0), 1)  # not symmetric above the diagonal
    results = []
    for disabled in (False, True):
        with kernels.disabled() if disabled else contextlib.nullcontext():
            X = dirty.copy()
            L, info = cholesky.potrf_stack(X, overwrite=overwrite)
        assert not info.any() and (L is X) == overwrite
        results.append(L.copy())
    assert np.array_equal(results[0], results[1])
    L = results[0].astype(np.float64)
    assert np.array_equal(np.triu(L, 1), np.zeros_like(L))
    tol = 50 * n * np.finfo(dtype).eps
    assert np.abs(L @ np.swapaxes(L, -1, -2) - clean).max() <= tol * np.abs(clean).max()


@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_cholesky_stack_kernels_report_the_matrix_that_is_not_positive_definite(cpu_ext, dtype):
    S = _spd_stack((6, 9, 9), dtype, 4)
    S[3, 4, 4] = -50.0  # the fourth matrix is indefinite; its leading 5×5 minor is the first that fails
    L, info = cholesky.potrf_stack(S)
    with kernels.disabled():
        _, info_ref = cholesky.potrf_stack(S)
    assert info[3] == info_ref[3] == 5 and np.flatnonzero(info).tolist() == [3]
    assert np.flatnonzero(info_ref).tolist() == [3]  # the reference stops there
    assert kronlin._linalg._potrf(S) is None  # what Factor sees: not positive definite, so LU


def test_cholesky_stack_kernels_refuse_bad_layouts_and_addresses(cpu_ext):
    S = _spd_stack((2, 4, 4), "float64")
    address = cholesky.lapack_address("dpotrf")
    with pytest.raises(ValueError, match="C-contiguous"):
        cpu_ext.potrf_stack(np.swapaxes(S, 1, 2), np.empty_like(S), address)
    with pytest.raises(ValueError, match="one dtype and shape"):
        cpu_ext.potrf_stack(S, np.empty((2, 4, 4), np.float32), address)
    with pytest.raises(ValueError, match="address is 0"):
        cpu_ext.potri_stack(S.copy(), 0, [])
    with pytest.raises(ValueError, match="addresses of"):
        cpu_ext.potri_stack(S.copy(), cholesky.lapack_address("dpotri"), [1, 2, 3, 4])
    # the dispatch takes the reference for what the kernel does not take: the same answers
    for x in (np.asfortranarray(S), S.astype(">f8")):
        L, info = cholesky.potrf_stack(x)
        assert not info.any() and np.allclose(L, np.linalg.cholesky(S), rtol=1e-13, atol=1e-13)


TRTRI_ORDERS = [1, 16, 17, 31, 32, 33, 48, 64, 65, 100, 130, 257, 300]  # either side of the leaf and the splits


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("n", TRTRI_ORDERS)
def test_triangular_inverse_by_halves_is_the_inverse_and_reads_one_triangle(dtype, n):
    """``trtri_lower_reference`` (the compiled kernel's recursion, in Python): ``L⁻¹`` to round-off against
    float64, as accurate as LAPACK's ``?trtri``, whatever lies above the diagonal; of the strict upper triangle
    only the band the leaves' ``?gemm`` reads is written (zeros)."""
    from scipy.linalg import lapack

    L = np.linalg.cholesky(_spd_stack((n, n), "float64", n)).astype(dtype)
    garbage = np.triu(np.full_like(L, 7.0), 1)
    X = L + garbage
    assert cholesky.trtri_lower_reference(X) == 0
    band = np.triu(np.ones_like(L), 1) - np.triu(np.ones_like(L), cholesky.RECURSIVE_LEAF)
    assert np.array_equal(np.triu(X, 1), garbage * (1 - band))
    exact = np.linalg.inv(L.astype(np.float64))
    lapack_inv = np.tril(lapack.get_lapack_funcs("trtri", dtype=L.dtype)(L, lower=1)[0]).astype(np.float64)
    err = np.abs(np.tril(X) - exact).max() / np.abs(exact).max()
    err_lapack = np.abs(lapack_inv - exact).max() / np.abs(exact).max()
    assert err <= 4 * err_lapack + 4 * np.finfo(dtype).eps


@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_triangular_inverse_by_halves_reports_a_zero_diagonal_entry(dtype):
    """``?trtri``'s info (the 1-based index of an exactly zero diagonal entry), in either half, from the reference
    and from the compiled stack kernel alike."""
    for n, k in [(10, 3), (40, 5), (40, 30), (100, 99)]:
        L = np.linalg.cholesky(_spd_stack((n, n), "float64", n)).astype(dtype)
        L[k, k] = 0.0
        assert cholesky.trtri_lower_reference(L.copy()) == k + 1
        assert cholesky.potri_stack_reference(L[None].copy()).tolist() == [k + 1]
        for disabled in (False, True):  # compiled by halves, or the loop of ?potri calls
            with kernels.disabled() if disabled else contextlib.nullcontext():
                assert cholesky.potri_stack(L[None].copy()).tolist() == [k + 1]


@pytest.mark.parametrize("dtype, cond", [("float32", 1e2), ("float32", 1e5), ("float64", 1e2), ("float64", 1e5),
                                         ("float64", 1e10)])
def test_spd_inverse_by_halves_is_as_accurate_as_potri(cpu_ext, dtype, cond):
    """The inverse by halves (compiled and reference, bit for bit) against LAPACK's ``?potri`` on the same factor,
    on matrices of condition ``cond``: errors against float64 (for float32) or residuals ``‖M X − I‖``
    (float64) within a small multiple of ``?potri``'s."""
    from scipy.linalg import lapack

    assert cpu_ext.recursive_leaf == cholesky.RECURSIVE_LEAF
    rng = np.random.default_rng(int(np.log10(cond)))
    for n in (33, 200, 517):
        Q = np.linalg.qr(rng.standard_normal((n, n)))[0]
        M = ((Q * np.geomspace(1.0, 1.0 / cond, n)) @ Q.T)
        M = ((M + M.T) / 2).astype(dtype)
        L, info = cholesky.potrf_stack(M[None])
        assert not info.any()
        X, X_ref = L.copy(), L.copy()
        assert not cholesky.potri_stack(X).any()
        assert not cholesky.potri_stack_reference(X_ref).any()
        assert np.array_equal(X, X_ref)
        P = lapack.get_lapack_funcs("potri", dtype=L.dtype)(L[0].T, lower=0)[0].T  # C lower triangle
        P = np.tril(P) + np.tril(P, -1).T
        M64 = M.astype(np.float64)
        if dtype == "float32":
            exact = np.linalg.inv(M64)
            measure = lambda Y: np.abs(Y.astype(np.float64) - exact).max() / np.abs(exact).max()  # noqa: E731
        else:
            measure = lambda Y: np.abs(M64 @ Y - np.eye(n)).max()  # noqa: E731
        assert measure(X[0]) <= 4 * measure(P) + 10 * n * np.finfo(dtype).eps


def test_lapack_addresses_are_scipys_c_routines():
    for name in ("spotrf", "dpotrf", "spotri", "dpotri", "slauum", "dlauum"):
        assert isinstance(cholesky.lapack_address(name), int)
    for dtype in (np.float32, np.float64):
        assert len(cholesky._recursive_addresses(dtype)) == 3 and None not in cholesky._recursive_addresses(dtype)
    assert cholesky.lapack_address("nope") is None


# -- the norms family (csrc/cpu/norms_cpu.cpp) ---------------------------------------------------------------------
@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("shape", [(1, 1), (3, 5), (5, 3), (64, 64), (65, 130), (300, 257), (1000, 7)])
def test_norm1_kernel_matches_reference_and_dense(cpu_ext, dtype, shape):
    """The compiled 1-norm against the reference (rounding apart: the column sums run in another order) and
    against ``np.linalg.norm(x, 1)`` in float64."""
    x = np.random.default_rng(sum(shape)).standard_normal(shape).astype(dtype)
    exact = np.linalg.norm(x.astype(np.float64), 1)
    got, ref = cpu_ext.norm1(x), kernels.norm1_reference(x)
    tol = 4 * shape[0] * np.finfo(dtype).eps * exact  # sums of shape[0] magnitudes in the input's dtype
    assert abs(got - exact) <= tol and abs(ref - exact) <= tol
    assert kernels.norm1(x) == got  # the dispatch takes the kernel


@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_norm1_propagates_nan_and_infinity(cpu_ext, dtype):
    for bad, expect in ((np.nan, math.isnan), (np.inf, math.isinf), (-np.inf, math.isinf)):
        x = np.ones((40, 30), dtype=dtype)
        x[17, 29] = bad
        for fn in (cpu_ext.norm1, kernels.norm1_reference):
            assert expect(fn(x))
    big = np.full((4, 3), np.finfo(dtype).max / 2, dtype=dtype)  # column sums overflow to infinity
    assert math.isinf(cpu_ext.norm1(big))


def test_norm1_dispatch_and_binding_refusals(cpu_ext):
    x = np.random.default_rng(3).standard_normal((20, 30))
    for other in (np.asfortranarray(x), x[:, ::2], x.astype(">f8"), x.astype(np.float16)):  # the reference's
        assert kernels.norm1(other) == pytest.approx(np.linalg.norm(other.astype(np.float64), 1), rel=1e-3)
    with kernels.disabled():
        assert kernels.norm1(x) == kernels.norm1_reference(x)
    assert kernels.norm1(np.zeros((0, 3))) == 0.0
    with pytest.raises(ValueError, match="C-contiguous"):
        cpu_ext.norm1(np.asfortranarray(x))
    with pytest.raises(ValueError, match="matrix"):
        cpu_ext.norm1(np.ones(4))
    with pytest.raises(ValueError, match="float32 or float64"):
        cpu_ext.norm1(np.ones((2, 2), dtype=np.int64))


# -- the block-apply family (csrc/cpu/block_apply_cpu.cpp) -----------------------------------------------
def _blocks(B, q, p, dtype, seed=0):
    rng = np.random.default_rng(seed)
    G = rng.standard_normal((B, q, q)).astype(dtype)
    At = rng.standard_normal((B, p, p)).astype(dtype)
    V = [rng.standard_normal((q, p)).astype(dtype) for _ in range(B)]
    return G, V, At


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("B, q, p", [(1, 1, 1), (3, 5, 7), (200, 8, 8), (4, 64, 33), (2, 130, 65)])
def test_block_apply_cpu_matches_reference_and_products(cpu_ext, dtype, B, q, p):
    G, V, At = _blocks(B, q, p, dtype, B + q + p)
    Y = np.empty((B, q, p), dtype=dtype)  # the kernel itself, at every order (the dispatch stops at 96)
    bad = cpu_ext.block_apply(G, V, At, Y, gemm_address(dtype))
    bad = None if bad < 0 else bad
    assert np.array_equal(block_apply(G, V, At)[0], Y) or max(q, p) > COMPILED_MAX_ORDER
    with kernels.disabled():
        Y_ref, bad_ref = block_apply(G, V, At)
    assert bad is None and bad_ref is None and Y.dtype == np.dtype(dtype) and Y.shape == (B, q, p)
    exact = np.stack([G[b].astype(np.float64) @ V[b] @ At[b] for b in range(B)])
    # two GEMMs of inner sizes q and p: rounding of order (q + p)·eps relative to the products' scale
    scale = np.stack([np.abs(G[b]).astype(np.float64) @ np.abs(V[b]) @ np.abs(At[b]) for b in range(B)])
    eps = np.finfo(dtype).eps
    for got in (Y, Y_ref):
        assert np.all(np.abs(got - exact) <= 2 * (q + p) * eps * scale)
    # NumPy's and SciPy's OpenBLAS builds may order the sums differently: agreement to rounding
    assert np.all(np.abs(Y - Y_ref) <= 2 * (q + p) * eps * scale)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("where", [0, 5, 11])
def test_block_apply_cpu_reports_the_first_nonfinite_result(cpu_ext, bad, where):
    G, V, At = _blocks(12, 6, 9, "float64", 3)
    V[where][2, 3] = bad
    V[11][0, 0] = bad  # a later one too: the first is reported
    for ctx in (contextlib.nullcontext(), kernels.disabled()):
        with ctx:
            Y, b = block_apply(G, V, At)
        assert b == where
        assert np.all(np.isfinite(Y[:where]))
    # an overflow of finite blocks is found the same way
    G, V, At = _blocks(4, 6, 9, "float32", 5)
    V[2] *= np.float32(1e36)
    G[2] *= np.float32(1e4)  # G V reaches about 1e40, beyond float32's 3.4e38
    assert np.all(np.isfinite(V[2])) and np.all(np.isfinite(G[2]))
    for ctx in (contextlib.nullcontext(), kernels.disabled()):
        with ctx:
            assert block_apply(G, V, At)[1] == 2


def test_block_apply_cpu_refuses_bad_arguments_and_the_dispatch_falls_back(cpu_ext):
    G, V, At = _blocks(3, 4, 5, "float64")
    Y = np.empty((3, 4, 5))
    address = gemm_address(np.float64)
    assert isinstance(address, int) and isinstance(gemm_address(np.float32), int) and gemm_address(np.int64) is None
    with pytest.raises(ValueError, match="one matrix per matrix"):
        cpu_ext.block_apply(G, V[:2], At, Y, address)
    with pytest.raises(ValueError, match="share one dtype"):
        cpu_ext.block_apply(G.astype(np.float32), V, At, Y, address)
    with pytest.raises(ValueError, match="address is 0"):
        cpu_ext.block_apply(G, V, At, Y, 0)
    # blocks it does not read in place: -2 and nothing computed; the dispatch takes the reference, with the same
    # answers
    ref = np.stack([g @ v @ a for g, v, a in zip(G, V, At)])
    for Vx in _blocks_not_in_place(V):
        Y[...] = 7.0
        assert cpu_ext.block_apply(G, Vx, At, Y, address) == -2 and np.all(Y == 7.0)
        assert block_apply_compiled(G, Vx, At) is None
        if np.shape(Vx[1]) == V[1].shape and np.array_equal(np.asarray(Vx[1], dtype=np.float64), V[1]):  # same values
            got, bad = block_apply(G, Vx, At)
            assert bad is None and np.allclose(got, ref, rtol=1e-13, atol=1e-13)
    got, bad = block_apply_compiled(G, tuple(V), At)  # a tuple of blocks is served
    assert bad is None and np.allclose(got, ref, rtol=1e-13, atol=1e-13)


def _blocks_not_in_place(V):
    """Lists that differ from ``V`` (float64 (q, p) blocks) in one block that the kernel must not read in place:
    Fortran order, byte-swapped, another dtype, another shape, unaligned, a masked array (its data is not its
    values), another subclass, a nested list."""
    masked = np.ma.masked_array(V[1], mask=np.zeros(V[1].shape, bool))
    masked.mask[0, 0] = True
    subs = [np.asfortranarray(V[1]), V[1].astype(">f8"), V[1].astype(np.float32), V[1][:, :-1].copy(),
            layout("unaligned", V[1]), masked, layout("subclass", V[1]), V[1].tolist()]
    return [[V[0], x, *V[2:]] for x in subs]


def test_block_apply_dispatch_compiles_small_blocks_only(cpu_ext, monkeypatch):
    """The compiled loop serves blocks up to COMPILED_MAX_ORDER wide, the NumPy loop the wider ones."""
    from kronlin._kernels import block_apply as family

    calls = []
    real = family.block_apply_reference
    monkeypatch.setattr(family, "block_apply_reference", lambda *a: calls.append(a[0].shape) or real(*a))
    G, V, At = _blocks(3, COMPILED_MAX_ORDER, 8, "float32")
    family.block_apply(G, V, At)
    assert calls == []
    G, V, At = _blocks(3, COMPILED_MAX_ORDER + 1, 8, "float32")
    family.block_apply(G, V, At)
    assert calls == [G.shape]


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("shape", SYM_SHAPES)
@pytest.mark.parametrize("asym", [0.0, 0.37])
def test_stack_asymmetry_cpu_matches_stacking_then_measuring(cpu_ext, dtype, shape, asym):
    S = _stack(shape, dtype, sum(shape) + 1, asym)
    Ms = [np.ascontiguousarray(M) for M in S]
    out = np.empty_like(S)
    got = stack_asymmetry(np, Ms, out)
    assert np.array_equal(out, S)
    assert got == asymmetry_reference(np, S)  # exact maxima: equal, not close
    with kernels.disabled():
        out2 = np.empty_like(S)
        assert stack_asymmetry(np, Ms, out2) == got and np.array_equal(out2, S)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_stack_asymmetry_cpu_nonfinite_and_bad_arguments(cpu_ext, bad):
    S = _stack((3, 70, 70), "float64")
    S[2, 5, 66] = bad
    got = cpu_ext.stack_asymmetry(list(S), np.empty_like(S))
    assert math.isnan(got[0]) and math.isnan(got[1])
    with pytest.raises(ValueError, match="one matrix per matrix"):
        cpu_ext.stack_asymmetry(list(S[:2]), np.empty_like(S))
    # matrices it does not read in place: None and nothing copied; the dispatch takes the reference
    for Ms in _blocks_not_in_place(list(S)):
        out = np.full_like(S, 7.0)
        assert cpu_ext.stack_asymmetry(Ms, out) is None and np.all(out == 7.0)
        if np.shape(Ms[1]) == S[1].shape and np.array_equal(np.asarray(Ms[1], dtype=np.float64), S[1], equal_nan=True):
            got = stack_asymmetry(np, Ms, out)
            assert np.array_equal(out, S, equal_nan=True) and math.isnan(got[0]) and math.isnan(got[1])
    # what the kernel does not take goes to the reference: the same measure
    T = _stack((3, 9, 9), "float64")
    out = np.empty_like(T)
    assert stack_asymmetry(np, [np.asfortranarray(M) for M in T], out) == asymmetry_reference(np, T)


# -- every public dispatcher, on layouts the compiled code does not read directly --------------------------
def _spd_batch(rng, B, n):
    X = rng.standard_normal((B, n, 2 * n))
    return X @ np.swapaxes(X, -1, -2) / n + np.eye(n)


_LAYOUTS = ("byteswap", "unaligned", "fortran", "strided", "subclass")  # badinput.LAYOUTS but read-only (in place)


def _dispatchers(rng):
    """``{name: (call, args)}``: each public kernel dispatcher of kronlin.kernels with float64 arguments."""
    S = _spd_batch(rng, 3, 20)
    M = S[0] + 0.01 * rng.standard_normal((20, 20))
    return {"asymmetry": (lambda x: kernels.asymmetry(np, x), (M,)),
            "norm1": (kernels.norm1, (M,)),
            "mirror_lower": (lambda x: kernels.mirror_lower(np, x), (S,)),
            "potrf_stack": (lambda x: np.tril(kernels.potrf_stack(x)[0]), (S,)),
            "potri_stack": (lambda L: (kernels.potri_stack(L), L)[1], (np.linalg.cholesky(S),)),
            "block_apply": (lambda G, V, A: kernels.block_apply(G, list(V), A)[0],
                            (S, rng.standard_normal((3, 20, 20)), S)),
            "gram_shared": (lambda A, E: kernels.gram_shared(np, A, E, method="kernel"),
                            (rng.standard_normal((4, 6, 5)), rng.standard_normal((4, 1, 6, 3)))),
            "eig_scale": (lambda Y, g, a: kernels.eig_scale(np, Y, g, a, 0.1, -1.0),
                          (rng.standard_normal((2, 5, 7)), rng.random((2, 5)) + 1, rng.random((2, 7)) + 1)),
            "gsylv_backsub": (lambda S1, T1, S2, T2, W: kernels.gsylv_backsub(np, S1, T1, S2, T2, W, 1),
                              (*sl.qz(_spd_batch(rng, 1, 5)[0], np.eye(5) + 0.1 * rng.random((5, 5)), output="real")[:2],
                               *sl.qz(_spd_batch(rng, 1, 7)[0], np.eye(7) + 0.1 * rng.random((7, 7)), output="real")[:2],
                               rng.standard_normal((5, 7))))}  # fmt: skip


@pytest.mark.parametrize("how", _LAYOUTS)
@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("name", list(_dispatchers(np.random.default_rng(0))))
def test_dispatchers_take_every_layout(name, dtype, how):
    """A byte-swapped array (a portable file), an unaligned one (a packed record's field, an odd offset), a
    Fortran-ordered, strided or subclassed one: the dispatcher computes what it computes for a C-ordered copy
    (the compiled code where it reads the layout, its reference where not; gram_shared and eig_scale sent a
    byte-swapped array to the compiled code, which refused it with an error)."""
    call, args = _dispatchers(np.random.default_rng(1))[name]
    args = [a.astype(dtype) for a in args]
    want = np.asarray(call(*[a.copy() for a in args]), dtype=np.float64)
    got = np.asarray(call(*[layout(how, a) for a in args]), dtype=np.float64)
    assert got.shape == want.shape
    # rounding only: a layout may take the reference, whose BLAS calls may differ in summation order
    np.testing.assert_allclose(got, want, rtol=50 * np.finfo(dtype).eps, atol=50 * np.finfo(dtype).eps * np.abs(want).max())
