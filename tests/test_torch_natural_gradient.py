"""kronlin.torch.NaturalGradient against ``np.linalg.solve(λI + F_dense, g)``.

``F_dense = c·(1/N) Σ_n vec(∇ℓ_n) vec(∇ℓ_n)ᵀ`` is built from per-example
gradients computed one example at a time (tests/torch_helpers.py), over the
column-stacked ``[W | b]`` blocks of all supported layers in module order.
"""

from __future__ import annotations

import io

import numpy as np
import pytest

torch = pytest.importorskip("torch")
nn = torch.nn
F = torch.nn.functional

import kronlin.torch as kt  # noqa: E402
from torch_helpers import (  # noqa: E402
    batch, close, cnn, example_loss, grad_block, layers_of, mlp, per_example, single_thread, vec,
)

# torch warns that padding="same" with an even kernel (tested on purpose) may copy the input: speed, not results
pytestmark = pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel lengths:UserWarning")

SOLVE64 = 1e-10  # λ = 1e-2 against a Fisher of norm ~1: condition ≲ 1e3


def _dense_fisher(model, x, yfisher, kind, reduction):
    """Per-example gradients J (P, N) at labels ``yfisher`` and the dense Fisher c·J Jᵀ/N."""
    N = x.shape[0]
    _, _, grads = per_example(model, x, yfisher, kind, reduction)
    J = np.stack([np.concatenate([grads[k][n] for k in range(len(grads))]) for n in range(N)], axis=1)  # (P, N)
    c = 1.0 if reduction == "mean" else N
    Fd = c * (J @ J.T) / N
    return J, Fd, c


@pytest.mark.parametrize("make", [mlp, cnn], ids=["mlp", "cnn"])
@pytest.mark.parametrize("kind", ["cross_entropy", "mse"])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_empirical_natural_gradient_equals_dense_solve(make, kind, reduction):
    lam = 1e-2
    model = make()
    x, y = batch(model, kind=kind)
    J, Fd, c = _dense_fisher(model, x, y, kind, reduction)
    pre = kt.NaturalGradient(model, damping=lam, reduction=reduction)
    model.zero_grad(set_to_none=True)
    f = model(x)
    (F.cross_entropy(f, y, reduction=reduction) if kind == "cross_entropy" else F.mse_loss(f, y, reduction=reduction)).backward()
    g = np.concatenate([vec(grad_block(m).numpy()) for m in layers_of(model)])
    # the reference's per-example gradients add up to the batch gradient
    close(g, J.sum(axis=1) * (1.0 if reduction == "sum" else 1.0 / x.shape[0]), 1e-12)
    pre.step()
    got = np.concatenate([vec(grad_block(m).numpy()) for m in layers_of(model)])
    close(got, np.linalg.solve(lam * np.eye(len(g)) + Fd, g), SOLVE64)


@pytest.mark.parametrize("make", [mlp, cnn], ids=["mlp", "cnn"])
@pytest.mark.parametrize("kind", ["cross_entropy", "mse"])
def test_mc_natural_gradient_equals_dense_solve_with_the_sampled_labels(make, kind):
    lam = 1e-2
    model = make()
    x, y = batch(model, kind=kind)
    pre = kt.NaturalGradient(model, damping=lam, fisher="mc", loss=kind, seed=7)
    model.zero_grad(set_to_none=True)
    f = model(x)
    assert all(p.grad is None for p in model.parameters())  # the MC pass leaves .grad alone
    example_loss(kind, f, y).backward()
    g = np.concatenate([vec(grad_block(m).numpy()) for m in layers_of(model)])
    pre.step()
    got = np.concatenate([vec(grad_block(m).numpy()) for m in layers_of(model)])
    pre.remove_hooks()
    _, Fd, _ = _dense_fisher(model, x, pre.sampled_targets, kind, "mean")
    close(got, np.linalg.solve(lam * np.eye(len(g)) + Fd, g), SOLVE64)


def test_fisher_operator_is_the_woodbury_fisher_of_the_batch():
    lam = 1e-1
    model = mlp()
    x, y = batch(model)
    J, Fd, _ = _dense_fisher(model, x, y, "cross_entropy", "mean")
    pre = kt.NaturalGradient(model, damping=lam)
    F.cross_entropy(model(x), y).backward()
    op = pre.fisher_operator()
    assert op.n_columns == x.shape[0] and op.n_params == Fd.shape[0]
    close(op.to_dense(), Fd, 1e-12)


def test_natural_gradient_errors_and_state():
    with pytest.raises(ValueError, match="damping must be a finite positive number"):
        kt.NaturalGradient(mlp(), damping=0.0)
    with pytest.raises(ValueError, match="no supported layer"):
        kt.NaturalGradient(nn.Sequential(nn.Tanh()))
    model = mlp()
    pre = kt.NaturalGradient(model, damping=1e-2, fisher="mc", loss="cross_entropy")
    with pytest.raises(RuntimeError, match="before any backward pass"):
        pre.step()
    x, y = batch(model)
    F.cross_entropy(model(x), y).backward()
    pre.step()
    state = pre.state_dict()
    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    again = kt.NaturalGradient(mlp(), damping=1e-2, fisher="mc", loss="cross_entropy", seed=123)
    again.load_state_dict(torch.load(buf, weights_only=True))
    assert again.steps == 1
    assert torch.equal(again._generator.get_state(), pre._generator.get_state())
    with pytest.raises(ValueError, match="not a kronlin.torch.NaturalGradient"):
        again.load_state_dict({})
    before = again._generator.get_state()
    for edit, pattern in (({"steps": -1}, r"state\['steps'\]"), ({"steps": "1"}, r"state\['steps'\]"),
                          ({"generator": torch.zeros(3)}, r"state\['generator'\]")):
        with pytest.raises(ValueError, match=pattern):
            again.load_state_dict({**state, "steps": 4, **edit})
        assert again.steps == 1 and torch.equal(again._generator.get_state(), before)  # nothing changed
    with pytest.raises(ValueError, match="missing 'generator'"):
        again.load_state_dict({k: v for k, v in state.items() if k != "generator"})


def test_float32_natural_gradient_stays_float32_and_matches_float64():
    out = []
    for dtype in (torch.float64, torch.float32):
        model = cnn(dtype=dtype)
        x, y = batch(model)
        pre = kt.NaturalGradient(model, damping=1e-1)
        F.cross_entropy(model(x.to(dtype)), y).backward()
        pre.step()
        out.append([grad_block(m) for m in layers_of(model)])
    for b64, b32 in zip(*out):
        assert b32.dtype == torch.float32
        close(b32.double().numpy(), b64.numpy(), 1e-4)  # float32 round-off; λ = 0.1 keeps the solve well conditioned
