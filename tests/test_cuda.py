"""GPU checks (run only where CuPy and a CUDA device exist): GPU results against the CPU as reference.

The core suite already runs on CuPy through the ``xp`` fixture; this module adds
the CUDA kernel against its NumPy reference and end-to-end CPU/GPU agreement.
"""

from __future__ import annotations

import numpy as np
import pytest

from kronlin import Kron, _ext
from kronlin._kernels.eig_scale import eig_scale, eig_scale_reference

from helpers import rel_err, spd

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
