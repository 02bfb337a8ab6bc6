"""kronlin.torch on CUDA tensors (issue 16: "CUDA tensors through CuPy when it is installed, with a clear
error when it is not").

The CUDA legs run where torch sees a GPU and CuPy is installed (the device check, ``bench/device_check.sh``,
runs the whole suite there); each trains the same model on the CPU and on the GPU from the same weights and
batches and compares the GPU's factors and preconditioned gradients with the CPU's (which the other
kronlin.torch tests check against dense per-example references), and with the dense solve itself.  The
missing-CuPy error is tested everywhere with an object that says it lives on a CUDA device.
"""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest

torch = pytest.importorskip("torch")
nn = torch.nn
F = torch.nn.functional

import kronlin.torch as kt  # noqa: E402
from kronlin._backend import context  # noqa: E402
from torch_helpers import (  # noqa: E402
    batch, close, cnn, dense_factors, grad_block, layers_of, mlp, per_example, resumed_run, run_step, single_thread, vec,
)

pytestmark = pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel lengths:UserWarning")

SOLVE64 = 1e-10  # as tests/test_torch_kfac.py: condition numbers ≲ 1e4
SAME64 = 1e-11   # GPU against CPU, float64: cuBLAS/cuSOLVER and OpenBLAS/LAPACK round differently


def _have_cupy() -> bool:
    try:
        import cupy  # noqa: F401
    except ImportError:
        return False
    return True


@pytest.fixture
def cuda():
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device for torch")
    pytest.importorskip("cupy")
    return torch.device("cuda")


class _OnCuda:
    """An object that says it lives on CUDA device 0 (DLPack device type 2), without needing a GPU."""

    def __dlpack_device__(self):
        return (2, 0)

    def __dlpack__(self, *args, **kwargs):  # pragma: no cover - never reached: the namespace is decided first
        raise AssertionError("not an array")

    def detach(self):  # what the binding calls on a tensor first
        return self


@pytest.mark.skipif(_have_cupy(), reason="CuPy is installed: a CUDA array computes on it")
def test_a_cuda_array_without_cupy_is_a_clear_error():
    with pytest.raises(TypeError, match=r"lives on a CUDA device; install CuPy"):
        context(("acts[0]", _OnCuda()))
    with pytest.raises(TypeError, match=r"tensor lives on a CUDA device; install CuPy"):
        kt._convert.to_array(_OnCuda())


def _to(model, device):
    return copy.deepcopy(model).to(device)


@pytest.mark.parametrize("make", [mlp, cnn], ids=["mlp", "cnn"])
@pytest.mark.parametrize("mode", ["exact", "factored"])
@pytest.mark.parametrize("N", [7, 2])
def test_cuda_step_equals_cpu_step_and_dense_solve(cuda, make, mode, N):
    """N = 2: one batch's factors, the thin (from-rows) route on the GPU too."""
    lam = 1e-2
    model = make()
    x, y = batch(model, N=N)
    acts, errs, _ = per_example(model, x, y)
    gpu = _to(model, cuda)
    pre_c = kt.KFAC(model, damping=lam, damping_mode=mode)
    pre_g = kt.KFAC(gpu, damping=lam, damping_mode=mode)
    _, before = run_step(model, pre_c, x, y)
    run_step(gpu, pre_g, x.to(cuda), y.to(cuda))
    for m_c, m_g, (A, G), V in zip(layers_of(model), layers_of(gpu), dense_factors(acts, errs), before):
        At, Gt = pre_g.factors(m_g)
        assert At.device.type == Gt.device.type == m_g.weight.grad.device.type == "cuda"
        close(At.cpu().numpy(), A, SAME64)
        close(Gt.cpu().numpy(), G, SAME64)
        got = vec(grad_block(m_g).cpu().numpy())
        close(got, vec(grad_block(m_c).numpy()), SAME64)
        p, q = A.shape[0], G.shape[0]
        if mode == "exact":
            M = np.kron(A, G) + lam * np.eye(p * q)
        else:
            pi = math.sqrt((np.trace(A) / p) / (np.trace(G) / q))
            gam = math.sqrt(lam)
            M = np.kron(A + pi * gam * np.eye(p), G + gam / pi * np.eye(q))
        close(got, np.linalg.solve(M, vec(V.numpy())), SOLVE64)


def test_cuda_mc_fisher_samples_the_cpu_labels(cuda):
    """The MC labels come from the CPU generator (then move to the device): the same labels, the same factors."""
    model = mlp()
    x, y = batch(model)
    gpu = _to(model, cuda)
    pres = [kt.KFAC(m, damping=1e-2, fisher="mc", loss="cross_entropy", seed=3) for m in (model, gpu)]
    run_step(model, pres[0], x, y)
    run_step(gpu, pres[1], x.to(cuda), y.to(cuda))
    for m_c, m_g in zip(layers_of(model), layers_of(gpu)):
        for t_c, t_g in zip(pres[0].factors(m_c), pres[1].factors(m_g)):
            close(t_g.cpu().numpy(), t_c.numpy(), SAME64)


def test_cuda_float32_stays_float32_on_the_device(cuda):
    model = mlp(dtype=torch.float32)
    x, y = batch(model, dtype=torch.float32)
    gpu = _to(model, cuda)
    for m, xx, yy in ((model, x, y), (gpu, x.to(cuda), y.to(cuda))):
        run_step(m, kt.KFAC(m, damping=1e-2, damping_mode="factored"), xx, yy)
    for m_c, m_g in zip(layers_of(model), layers_of(gpu)):
        g = grad_block(m_g)
        assert g.dtype == torch.float32 and g.device.type == "cuda"
        close(g.cpu().double().numpy(), grad_block(m_c).double().numpy(), 1e-4)  # float32 round-off, condition ≲ 1e2


def test_cuda_natural_gradient_equals_cpu(cuda):
    model = cnn()
    x, y = batch(model)
    gpu = _to(model, cuda)
    for m, xx, yy in ((model, x, y), (gpu, x.to(cuda), y.to(cuda))):
        run_step(m, kt.NaturalGradient(m, damping=1e-2), xx, yy)
    for m_c, m_g in zip(layers_of(model), layers_of(gpu)):
        close(grad_block(m_g).cpu().numpy(), grad_block(m_c).numpy(), SAME64)


@pytest.mark.parametrize("max_decay,N,mode", [(0.95, 7, "exact"), (0.0, 2, "factored")])
def test_cuda_state_dict_resume_is_bit_exact(cuda, max_decay, N, mode):
    def fresh():
        model = mlp().to(cuda)
        pre = kt.KFAC(model, damping=1e-2, refresh_period=2, max_decay=max_decay, damping_mode=mode)
        return model, pre, torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)

    batches = [tuple(t.to(cuda) for t in batch(mlp(), N=N, seed=s)) for s in range(6)]
    (model_a, _), (model_c, _) = resumed_run(fresh, batches, 3)
    for pa, pc in zip(model_a.parameters(), model_c.parameters()):
        assert torch.equal(pa, pc)
