"""GPU checks (run only where CuPy and a CUDA device exist): GPU results against the CPU as reference.

The core suite already runs on CuPy through the ``xp`` fixture; this module adds
the CUDA kernel against its NumPy reference and end-to-end CPU/GPU agreement.
"""

from __future__ import annotations

import numpy as np
import pytest

from kronlin import Kron, _ext
from kronlin._kernels.eig_scale import eig_scale, eig_scale_reference
from kronlin.testing import spd

from helpers import rel_err

cp = pytest.importorskip("cupy")
pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(cp.cuda.runtime.getDeviceCount() == 0, reason="no CUDA device"),
]


@pytest.fixture
def cuda_ext():
    mod = _ext.cuda()
    if mod is None:
        pytest.fail(f"kronlin._cuda is not usable on a machine with a GPU: {_ext.cuda_import_error}")
    return mod


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("power", [-1.0, -0.5, 0.5, 1.0, -0.25])
@pytest.mark.parametrize("shape", [(1, 1, 1), (3, 13, 17), (2, 512, 300)])
def test_eig_scale_cuda_matches_numpy_reference(cuda_ext, dtype, power, shape):
    rng = np.random.default_rng(sum(shape))
    B, q, p = shape
    Y = rng.standard_normal(shape).astype(dtype)
    lg = rng.uniform(0.1, 3.0, (B, q)).astype(dtype)
    la = rng.uniform(0.1, 3.0, (B, p)).astype(dtype)
    ref = eig_scale_reference(np, Y, lg, la, 0.25, power)
    got = eig_scale(cp, cp.asarray(Y), cp.asarray(lg), cp.asarray(la), 0.25, power)
    assert rel_err(got.get(), ref) < (1e-14 if dtype == "float64" else 2e-6)


@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_gpu_solve_agrees_with_cpu(cuda_ext, dtype):
    rng = np.random.default_rng(0)
    A, G = spd(rng, 64, 100.0, (2,)), spd(rng, 48, 100.0, (2,))
    X = rng.standard_normal((3, 2, 48, 64))
    cpu = Kron(A.astype(dtype), G.astype(dtype)).eigh().solve(X.astype(dtype), 0.01)
    gpu = Kron(cp.asarray(A, dtype=dtype), cp.asarray(G, dtype=dtype)).eigh().solve(cp.asarray(X, dtype=dtype), 0.01)
    assert isinstance(gpu, cp.ndarray) and gpu.dtype == cpu.dtype
    assert rel_err(gpu.get(), cpu) < (1e-11 if dtype == "float64" else 1e-3)


# -- the typed bindings on real device memory ---------------------------------------------------
class _Interface:
    """Exposes a CuPy array's __cuda_array_interface__ with some fields replaced."""

    def __init__(self, arr, **changes):
        cai = dict(arr.__cuda_array_interface__)
        cai.update(changes)
        self.__cuda_array_interface__ = cai


def _stream():
    return cp.cuda.get_current_stream().ptr


def test_cuda_bindings_reject_bad_operands(cuda_ext):
    Y, lg, la = cp.ones((2, 3, 4)), cp.ones((2, 3)), cp.ones((2, 4))
    with pytest.raises(ValueError, match=r"lg has dtype '<f4' but Y has '<f8'"):
        cuda_ext.eig_scale(Y, lg.astype(cp.float32), la, 0.0, -1.0, _stream())
    with pytest.raises(ValueError, match=r"Y \(shape \(2, 4, 3\)\) must be C-contiguous"):
        cuda_ext.eig_scale(Y.transpose(0, 2, 1), lg, cp.ones((2, 3)), 0.0, -1.0, _stream())
    with pytest.raises(ValueError, match=r"do not agree"):
        cuda_ext.eig_scale(Y, cp.ones((2, 4)), la, 0.0, -1.0, _stream())
    with pytest.raises(TypeError, match=r"lg must be a CUDA array"):
        cuda_ext.eig_scale(Y, np.ones((2, 3)), la, 0.0, -1.0, _stream())
    with pytest.raises(ValueError, match=r"Y is read-only"):
        cuda_ext.eig_scale(_Interface(Y, data=(Y.data.ptr, True)), lg, la, 0.0, -1.0, _stream())
    host = np.ones((2, 3, 4))
    with pytest.raises(ValueError, match=r"Y is not CUDA device memory"):
        cuda_ext.eig_scale(_Interface(Y, data=(host.ctypes.data, False)), lg, la, 0.0, -1.0, _stream())
    A, E = cp.ones((2, 5, 3)), cp.ones((4, 5, 2))
    with pytest.raises(ValueError, match=r"K must have shape \(N\*S, N\*S\) = \(4, 4\); got \(2, 2\)"):
        cuda_ext.woodbury_gram_shared(A, E, cp.empty((2, 2)), 1.0, _stream())
    with pytest.raises(ValueError, match=r"E has dtype '<f4' but A has '<f8'"):
        cuda_ext.woodbury_gram_shared(A, E.astype(cp.float32), cp.empty((4, 4)), 1.0, _stream())
    assert bool(cp.all(Y == 1.0))  # nothing was launched


def test_cuda_binding_waits_for_the_operands_stream(cuda_ext):
    """An operand produced on another stream (CAI v3 'stream') is ordered before the launch."""
    rng = np.random.default_rng(5)
    Yh, g, a = rng.standard_normal((1, 300, 200)), rng.uniform(1, 2, (1, 300)), rng.uniform(1, 2, (1, 200))
    side = cp.cuda.Stream(non_blocking=True)
    with side:
        Y = cp.asarray(Yh)
        big = cp.ones((2048, 2048)) @ cp.ones((2048, 2048))  # keep the side stream busy
    got = Y
    cuda_ext.eig_scale(_Interface(got, stream=side.ptr), cp.asarray(g), cp.asarray(a), 0.5, -1.0, _stream())
    cp.cuda.get_current_stream().synchronize()
    assert rel_err(got.get(), eig_scale_reference(np, Yh, g, a, 0.5, -1.0)) < 1e-14
    del big


@pytest.mark.parametrize("op_dtype,rhs_dtype", [("float32", "float64"), ("float64", "float32")])
def test_mixed_dtype_solve_on_gpu(cuda_ext, op_dtype, rhs_dtype):
    """float32 operator, float64 right-hand side (and the reverse): the kernel gets one dtype and is right."""
    rng = np.random.default_rng(6)
    A, G = spd(rng, 40, 50.0), spd(rng, 30, 50.0)
    X = rng.standard_normal((30, 40))
    K = Kron(cp.asarray(A, dtype=op_dtype), cp.asarray(G, dtype=op_dtype))
    got = K.eigh().solve(cp.asarray(X, dtype=rhs_dtype), 0.01)
    assert got.dtype == np.float64
    A, G = (M.astype(op_dtype).astype(np.float64) for M in (A, G))
    ref = np.linalg.solve(np.kron(A, G) + 0.01 * np.eye(1200), X.astype(rhs_dtype).flatten("F"))
    # a float32 operator's eigendecomposition carries float32 round-off (cond ~ 2500 here)
    assert rel_err(got.get(), ref.reshape((30, 40), order="F")) < (1e-11 if op_dtype == "float64" else 1e-3)


@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_torch_cuda_tensors_round_trip(cuda_ext, dtype):
    """torch CUDA tensors compute on CuPy through DLPack and come back as torch CUDA tensors."""
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("torch without CUDA")
    rng = np.random.default_rng(7)
    A, G, X = spd(rng, 24, 30.0), spd(rng, 16, 30.0), rng.standard_normal((16, 24))
    tdt = getattr(torch, dtype)
    tA, tG, tX = (torch.as_tensor(M, dtype=tdt, device="cuda") for M in (A, G, X))
    K = Kron(tA, tG)
    Y, Z = K @ tX, K.eigh().solve(tX, 0.1)
    assert isinstance(Y, torch.Tensor) and Y.is_cuda and Y.dtype == tdt and Z.is_cuda
    tol = 1e-12 if dtype == "float64" else 1e-4
    assert rel_err(Y.cpu().numpy(), Kron(A, G) @ X) < tol
    assert rel_err(Z.cpu().numpy(), Kron(A, G).eigh().solve(X, 0.1)) < tol


@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_eigh_float32_failure_retried_never_nan(cuda_ext, dtype):
    """eigh of extreme-range matrices: kronlin's result is finite (float32 failures retried in float64)."""
    from kronlin._linalg import eigh

    rng = np.random.default_rng(8)
    Q = np.linalg.qr(rng.standard_normal((64, 64)))[0]
    for scale in (1e-30, 1e25, 1e32):  # entries up to ~1e38, near float32 overflow
        M = (Q * np.geomspace(1.0, 1e6, 64)) @ Q.T * scale
        M = cp.asarray((M + M.T) / 2, dtype=dtype)
        if not bool(cp.all(cp.isfinite(M))):
            continue
        w, V = eigh(cp, M, "M")
        assert bool(cp.all(cp.isfinite(w))) and bool(cp.all(cp.isfinite(V)))
        ref = np.linalg.eigvalsh(cp.asnumpy(M).astype(np.float64))
        assert rel_err(cp.asnumpy(w).astype(np.float64), ref) < (1e-10 if dtype == "float64" else 1e-4)


@pytest.mark.parametrize("tile", [32, 64, 128])
@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_gram_cuda_tiles_match_reference(cuda_ext, tile, dtype):
    """Both tile sizes of the Gram kernel against the NumPy reference (T not a multiple of the tile, S = 2)."""
    from kronlin._kernels.woodbury_gram import gram_shared_reference

    rng = np.random.default_rng(9)
    for N, S, T, da, de in [(4, 2, 70, 19, 37), (3, 1, 130, 64, 8), (1, 1, 5, 3, 2), (2, 1, 300, 40, 33)]:
        A, E = rng.standard_normal((N, T, da)), rng.standard_normal((N, S, T, de))
        ref = gram_shared_reference(np, A, E)
        K = cp.empty((N * S, N * S), dtype=dtype)
        cuda_ext.woodbury_gram_shared(cp.asarray(A, dtype=dtype), cp.asarray(E.reshape(N * S, T, de), dtype=dtype),
                                      K, 1.0, _stream(), tile)
        Kn = K.get()
        assert np.array_equal(Kn, Kn.T)
        assert rel_err(Kn, ref) < (1e-13 if dtype == "float64" else 2e-5)
    with pytest.raises(ValueError, match="tile must be 0"):
        cuda_ext.woodbury_gram_shared(cp.ones((1, 2, 2)), cp.ones((1, 2, 2)), cp.empty((1, 1)), 1.0, _stream(), 48)
