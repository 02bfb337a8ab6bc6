"""Compiled kernels against their NumPy references (one test module per kernel family)."""

from __future__ import annotations

import numpy as np
import pytest

from kronlin import Kron, _ext
from kronlin._kernels import _dispatch
from kronlin._kernels.eig_scale import eig_scale, eig_scale_reference
from kronlin._kernels.woodbury_gram import gram_shared, gram_shared_reference
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
