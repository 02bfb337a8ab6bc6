"""Dense per-example references and small models for the kronlin.torch tests.

Every reference is computed one example at a time (a forward and a backward
pass on ``x[n:n+1]`` with its own per-example loss ``ℓ_n``), with convolution
patches cut out by explicit loops: nothing is shared with the binding's
batched hooks.  Imported by tests/test_torch_*.py after ``importorskip("torch")``.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from threadpoolctl import threadpool_limits

nn = torch.nn
F = torch.nn.functional


@pytest.fixture(autouse=True)
def single_thread():
    """One torch thread and one BLAS thread: tiny problems on a shared 2-core machine otherwise
    spend most of their time in thread hand-offs (a 64-32-10 MLP step: 75 ms instead of 0.4 ms)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with threadpool_limits(1):
            yield
    finally:
        torch.set_num_threads(n)


# -- models and per-example references -----------------------------------------------------
def mlp(seed=0, dtype=torch.float64):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 4, bias=False), nn.Tanh(), nn.Linear(4, 3)).to(dtype)


def cnn(seed=0, dtype=torch.float64):
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(2, 3, 3, padding=1), nn.Tanh(),
        nn.Conv2d(3, 4, 3, stride=2, padding=2, dilation=2, bias=False), nn.Tanh(),
        nn.Conv2d(4, 2, (3, 2), padding="same"), nn.Tanh(),
        nn.Flatten(), nn.Linear(2 * 4 * 4, 3),
    ).to(dtype)


def batch(model, N=7, seed=1, dtype=torch.float64, kind="cross_entropy"):
    g = torch.Generator().manual_seed(seed)
    shape = (N, 6) if isinstance(model[0], nn.Linear) else (N, 2, 7, 7)
    x = torch.randn(shape, generator=g, dtype=dtype)
    y = torch.randint(0, 3, (N,), generator=g) if kind == "cross_entropy" else torch.randn((N, 3), generator=g, dtype=dtype)
    return x, y


def layers_of(model):
    return [m for m in model if isinstance(m, (nn.Linear, nn.Conv2d))]


def example_loss(kind, f, y, reduction="mean"):
    """ℓ_n of one example: cross-entropy, or nn.MSELoss on one row: (1/C)‖f − y‖² ("mean") or ‖f − y‖² ("sum")."""
    return F.cross_entropy(f, y) if kind == "cross_entropy" else F.mse_loss(f, y, reduction=reduction)


def loop_patches(conv, x):
    """(T, C_in·kh·kw) patches of one input (C, H, W) by explicit slicing, and the output (C_out, Ho, Wo)."""
    out = conv(x[None])[0]
    kh, kw = conv.kernel_size
    dh, dw = conv.dilation
    sh, sw = conv.stride
    if conv.padding == "same":
        th, tw = dh * (kh - 1), dw * (kw - 1)
        pads = (tw // 2, tw - tw // 2, th // 2, th - th // 2)
    else:
        pads = (conv.padding[1], conv.padding[1], conv.padding[0], conv.padding[0])
    xp = F.pad(x, pads)
    Ho, Wo = out.shape[1:]
    rows = []
    for i in range(Ho):
        for j in range(Wo):
            blk = xp[:, i * sh: i * sh + dh * (kh - 1) + 1: dh, j * sw: j * sw + dw * (kw - 1) + 1: dw]
            rows.append(blk.reshape(-1))
    P = torch.stack(rows)
    # the reference checks itself: the patches reproduce the convolution
    W = conv.weight.reshape(conv.out_channels, -1)
    rec = P @ W.T + (conv.bias if conv.bias is not None else 0)
    torch.testing.assert_close(rec.T.reshape(out.shape), out, rtol=1e-12, atol=1e-12)
    return P


def per_example(model, x, y, kind="cross_entropy", reduction="mean"):
    """Per layer: lists over n of ā_n (T, p), ĝ_n (T, q) and the column-stacked gradient vec(∇_[W|b] ℓ_n)."""
    mods = layers_of(model)
    acts, errs, grads = [[] for _ in mods], [[] for _ in mods], [[] for _ in mods]
    for n in range(x.shape[0]):
        seen = {}

        def fwd(m, inp, out):
            out.retain_grad()
            seen[m] = (inp[0].detach(), out)

        hs = [m.register_forward_hook(fwd) for m in mods]
        model.zero_grad(set_to_none=True)
        example_loss(kind, model(x[n:n + 1]), y[n:n + 1], reduction).backward()
        for h in hs:
            h.remove()
        for k, m in enumerate(mods):
            a, out = seen[m]
            if isinstance(m, nn.Conv2d):
                P = loop_patches(m, a[0])
                g = out.grad[0].reshape(m.out_channels, -1).T
            else:
                P, g = a, out.grad
            if m.bias is not None:
                P = torch.cat([P, torch.ones(P.shape[0], 1, dtype=P.dtype)], 1)
            acts[k].append(P.numpy().copy())
            errs[k].append(g.numpy().copy())
            Gw = m.weight.grad.reshape(m.weight.shape[0], -1)
            blk = Gw if m.bias is None else torch.cat([Gw, m.bias.grad[:, None]], 1)
            grads[k].append(blk.numpy().T.reshape(-1).copy())  # column stacking
    model.zero_grad(set_to_none=True)
    return acts, errs, grads


def plain_copy(model, make):
    """The same weights in a model without the preconditioner's hooks (for references taken mid-run)."""
    clone = make()
    clone.load_state_dict(model.state_dict())
    return clone


def dense_factors(acts, errs, c=1.0):
    """curvlinops-scaled (A, G) per layer from per-example lists."""
    out = []
    for a_list, g_list in zip(acts, errs):
        N, T = len(a_list), a_list[0].shape[0]
        A = sum(a.T @ a for a in a_list) / (N * T)
        G = c * sum(g.T @ g for g in g_list) / N
        out.append((A, G))
    return out


def run_step(model, pre, x, y, kind="cross_entropy", reduction="mean"):
    model.zero_grad(set_to_none=True)
    f = model(x)
    loss = F.cross_entropy(f, y, reduction=reduction) if kind == "cross_entropy" else F.mse_loss(f, y, reduction=reduction)
    loss.backward()
    before = [grad_block(m) for m in layers_of(model)]
    pre.step()
    return loss, before


def grad_block(m):
    Gw = m.weight.grad.reshape(m.weight.shape[0], -1)
    return (Gw if m.bias is None else torch.cat([Gw, m.bias.grad[:, None]], 1)).detach().clone()


def close(actual, expected, rtol):
    """Entrywise agreement relative to the largest entry of the reference."""
    actual, expected = np.asarray(actual), np.asarray(expected)
    assert actual.shape == expected.shape
    scale = max(np.abs(expected).max(), np.finfo(expected.dtype).tiny)
    err = np.abs(actual - expected).max() / scale
    assert err <= rtol, f"relative error {err:.3g} > {rtol:.3g}"


def vec(M):
    return np.asarray(M).T.reshape(-1)


def train(model, pre, opt, batches):
    """Cross-entropy training steps with the preconditioner ``pre`` and the torch optimizer ``opt``."""
    for x, y in batches:
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        pre.step()
        opt.step()


def resumed_run(fresh, batches, split):
    """``(uninterrupted, resumed)``: ``(model, pre)`` trained on every batch, and ``(model, pre)`` trained on
    ``batches[:split]``, saved with ``torch.save`` (model, optimizer, preconditioner), loaded into a fresh
    triple and trained on the rest.  ``fresh()`` returns a new ``(model, pre, opt)``."""
    import io

    model_a, pre_a, opt_a = fresh()
    train(model_a, pre_a, opt_a, batches)
    model_b, pre_b, opt_b = fresh()
    train(model_b, pre_b, opt_b, batches[:split])
    buf = io.BytesIO()
    torch.save({"model": model_b.state_dict(), "opt": opt_b.state_dict(), "pre": pre_b.state_dict()}, buf)
    buf.seek(0)
    ckpt = torch.load(buf, weights_only=True)
    pre_b.remove_hooks()
    model_c, pre_c, opt_c = fresh()
    model_c.load_state_dict(ckpt["model"])
    opt_c.load_state_dict(ckpt["opt"])
    pre_c.load_state_dict(ckpt["pre"])
    assert pre_c.steps == split
    train(model_c, pre_c, opt_c, batches[split:])
    return (model_a, pre_a), (model_c, pre_c)

