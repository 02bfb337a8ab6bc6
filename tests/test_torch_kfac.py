"""kronlin.torch.KFAC against dense references built here from per-example quantities.

The references (tests/torch_helpers.py) are computed one example at a time,
with convolution patches cut out by explicit loops: nothing is shared with the
binding's batched hooks.  Scaling convention checked throughout (curvlinops'):
``A = (1/(N·T)) Σ_{n,t} ā āᵀ``, ``G = c·(1/N) Σ_{n,t} ĝ ĝᵀ`` with ``c = 1`` for a
mean-reduced loss and ``c = N`` for a summed one.
"""

from __future__ import annotations

import math
import subprocess
import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch")
nn = torch.nn
F = torch.nn.functional

import kronlin  # noqa: E402
import kronlin.torch as kt  # noqa: E402
from torch_helpers import (  # noqa: E402
    batch, close, cnn, dense_factors, example_loss, grad_block, layers_of, mlp, per_example, plain_copy, resumed_run,
    run_step, train, vec,
)

# torch warns that padding="same" with an even kernel (the asymmetric case the CNN below tests on
# purpose) may copy the input; the warning is about speed, not results
pytestmark = pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel lengths:UserWarning")

RTOL64 = 1e-12   # factors: sums of products, a few ulps times the sizes here
SOLVE64 = 1e-10  # solves: the condition numbers here are ≲ 1e4


# ---------------------------------------------------------------------------------------------
# factors
# ---------------------------------------------------------------------------------------------
def _assert_factors(pre, model, ref, dtype=None):
    """``pre.factors`` of every layer equal the dense ``(A, G)`` of ``ref`` (and have ``dtype``, if given)."""
    for m, (A, G) in zip(layers_of(model), ref):
        At, Gt = pre.factors(m)
        if dtype is not None:
            assert At.dtype == Gt.dtype == dtype
        close(At.numpy(), A, RTOL64)
        close(Gt.numpy(), G, RTOL64)


def every_model_loss_and_reduction(test):
    """MLP and CNN × cross-entropy and MSE × mean and sum reduction: the factor tests' grid."""
    for mark in (pytest.mark.parametrize("reduction", ["mean", "sum"]),
                 pytest.mark.parametrize("kind", ["cross_entropy", "mse"]),
                 pytest.mark.parametrize("make", [mlp, cnn], ids=["mlp", "cnn"])):  # fmt: skip
        test = mark(test)
    return test


@every_model_loss_and_reduction
def test_empirical_factors_equal_dense_per_example(make, kind, reduction):
    model = make()
    x, y = batch(model, kind=kind)
    acts, errs, _ = per_example(model, x, y, kind, reduction)
    N = x.shape[0]
    ref = dense_factors(acts, errs, c=1.0 if reduction == "mean" else N)
    pre = kt.KFAC(model, damping=1e-3, reduction=reduction)
    run_step(model, pre, x, y, kind, reduction)
    _assert_factors(pre, model, ref, dtype=torch.float64)


@every_model_loss_and_reduction
def test_mc_factors_equal_dense_with_the_sampled_labels(make, kind, reduction):
    model = make()
    x, y = batch(model, kind=kind)
    pre = kt.KFAC(model, damping=1e-3, fisher="mc", loss=kind, reduction=reduction, seed=3)
    model.zero_grad(set_to_none=True)
    f = model(x)
    # the MC backward ran inside the forward pass and left .grad alone
    assert all(p.grad is None for p in model.parameters())
    example_loss(kind, f, y, reduction).backward()
    pre.step()
    yhat = pre.sampled_targets.clone()
    pre.remove_hooks()
    acts, errs, _ = per_example(model, x, yhat, kind, reduction)
    c = 1.0 if reduction == "mean" else x.shape[0]
    _assert_factors(pre, model, dense_factors(acts, errs, c))


def test_mc_ignores_forward_passes_that_are_not_back_propagated():
    model = mlp()
    x, y = batch(model)
    pre = kt.KFAC(model, damping=1e-2, fisher="mc", loss="cross_entropy")
    model.zero_grad(set_to_none=True)
    f = model(x)
    yhat = pre.sampled_targets.clone()
    model(x[:3])  # e.g. a logging pass outside no_grad: its MC labels are drawn but never used
    F.cross_entropy(f, y).backward()
    pre.step()
    pre.remove_hooks()
    ref = dense_factors(*per_example(model, x, yhat)[:2])
    for m, (A, G) in zip(layers_of(model), ref):
        close(pre.factors(m)[1].numpy(), G, RTOL64)
    # a layer run twice *with* backward passes through both is refused
    pre = kt.KFAC(model, damping=1e-2)
    (F.cross_entropy(model(x), y) + F.cross_entropy(model(x[:3]), y[:3])).backward()
    with pytest.raises(RuntimeError, match="ran 2 times"):
        pre.step()


def test_mc_labels_follow_the_predictive_distribution():
    """Cross-entropy: label frequencies ≈ softmax; squared error: ŷ − f ~ N(0, C/2) (so E ĝĝᵀ = (2/C) I)."""
    torch.manual_seed(0)
    lin = nn.Linear(1, 3).double()
    with torch.no_grad():
        lin.weight.zero_()
        lin.bias.copy_(torch.tensor([0.0, 1.0, 2.0], dtype=torch.float64))
    x = torch.zeros(20000, 1, dtype=torch.float64)
    pre = kt.KFAC(lin, fisher="mc", loss="cross_entropy")
    lin(x)
    freq = torch.bincount(pre.sampled_targets, minlength=3).double() / x.shape[0]
    p = torch.softmax(lin.bias.detach(), 0)
    assert torch.allclose(freq, p, atol=0.015)  # 4.5 standard errors at N = 20000
    pre.remove_hooks()
    pre = kt.KFAC(lin, fisher="mc", loss=nn.MSELoss())
    f = lin(x)
    var = (pre.sampled_targets - f.detach()).var(dim=0)
    assert torch.allclose(var, torch.full((3,), 1.5, dtype=torch.float64), rtol=0.05)  # C/2 = 1.5; 5 % ≈ 5 s.e.


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_kfac_block_equals_dense_fisher_block_for_one_example(reduction):
    """For N = 1 the layer's Fisher block vec(∇ℓ)vec(∇ℓ)ᵀ is exactly A ⊗ G in column-stacked order."""
    model = mlp()
    x, y = batch(model, N=1)
    _, _, grads = per_example(model, x, y)
    pre = kt.KFAC(model, damping=1e-3, reduction=reduction)
    run_step(model, pre, x, y, reduction=reduction)
    for m, g in zip(layers_of(model), grads):
        A, G = (t.numpy() for t in pre.factors(m))
        close(np.kron(A, G), np.outer(g[0], g[0]), RTOL64)


# ---------------------------------------------------------------------------------------------
# preconditioned gradients
# ---------------------------------------------------------------------------------------------
def _pi(A, G):
    return math.sqrt((np.trace(A) / A.shape[0]) / (np.trace(G) / G.shape[0]))


@pytest.mark.parametrize("make", [mlp, cnn], ids=["mlp", "cnn"])
@pytest.mark.parametrize("mode", ["exact", "factored"])
@pytest.mark.parametrize("N", [7, 2])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_preconditioned_gradient_equals_dense_solve(make, mode, N, reduction):
    """N = 2: every MLP layer and the CNN's linear layer have a factor with fewer rows than 0.8× its order
    (0.4× for factored damping), so their inverses come from the rows (KronEigh.from_rows, thin); the others
    as before."""
    lam = 1e-2
    model = make()
    x, y = batch(model, N=N)
    acts, errs, _ = per_example(model, x, y, reduction=reduction)
    pre = kt.KFAC(model, damping=lam, damping_mode=mode, reduction=reduction)
    _, before = run_step(model, pre, x, y, reduction=reduction)
    from_rows = [ks[0] for ks, op in pre._inv if len(ks) == 1 and getattr(op, "_thin", False)]
    assert from_rows == {(mlp, 7): [], (mlp, 2): [0, 1, 2], (cnn, 7): [3], (cnn, 2): [3]}[make, N]
    for m, (A, G), V in zip(layers_of(model), dense_factors(acts, errs, N if reduction == "sum" else 1.0), before):
        p, q = A.shape[0], G.shape[0]
        if mode == "exact":
            M = np.kron(A, G) + lam * np.eye(p * q)
        else:
            pi, gam = _pi(A, G), math.sqrt(lam)
            M = np.kron(A + pi * gam * np.eye(p), G + gam / pi * np.eye(q))
        expected = np.linalg.solve(M, vec(V.numpy()))
        close(vec(grad_block(m).numpy()), expected, SOLVE64)


@pytest.mark.parametrize("N", [7, 2])
def test_equal_shaped_layers_are_decomposed_as_one_stack(N):
    """Exact damping: layers of equal (p, q) share one Kron(A_stack, G_stack).eigh() and one batched solve
    (N = 2: one batch's factors, from the rows as one stack too); each layer's result is its dense solve."""
    lam = 1e-2
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(6, 6), nn.Tanh(), nn.Linear(6, 6), nn.Tanh(), nn.Linear(6, 6), nn.Tanh(),
                          nn.Linear(6, 3)).double()
    x, y = batch(model, N=N)
    acts, errs, _ = per_example(model, x, y)
    pre = kt.KFAC(model, damping=lam)
    _, before = run_step(model, pre, x, y)
    groups = sorted((i if isinstance(i, list) else [i]) for i, _ in pre._inv)
    assert groups == [[0, 1, 2], [3]]
    assert all(op._thin == (N == 2) for i, op in pre._inv if i != [3])
    for m, (A, G), V in zip(layers_of(model), dense_factors(acts, errs), before):
        M = np.kron(A, G) + lam * np.eye(A.shape[0] * G.shape[0])
        close(vec(grad_block(m).numpy()), np.linalg.solve(M, vec(V.numpy())), SOLVE64)


def test_linear_layer_on_sequences_uses_the_weight_sharing_factors():
    """nn.Linear on (N, T, d) inputs: A = (1/(N·T)) Σ ā āᵀ, G = (1/N) Σ ĝ ĝᵀ over examples and positions."""
    torch.manual_seed(0)
    lin = nn.Linear(4, 3).double()
    x = torch.randn(5, 6, 4, dtype=torch.float64)
    y = torch.randint(0, 3, (5,))
    A = np.zeros((5, 5))
    G = np.zeros((3, 3))
    for n in range(5):
        out = lin(x[n:n + 1])
        out.retain_grad()
        F.cross_entropy(out.mean(1), y[n:n + 1]).backward()
        a = torch.cat([x[n], torch.ones(6, 1, dtype=torch.float64)], 1).numpy()
        g = out.grad[0].numpy()
        A += a.T @ a / 30
        G += g.T @ g / 5
    lin.zero_grad()
    pre = kt.KFAC(lin, damping=1e-2)
    F.cross_entropy(lin(x).mean(1), y).backward()
    pre.step()
    close(pre.factors(lin)[0].numpy(), A, RTOL64)
    close(pre.factors(lin)[1].numpy(), G, RTOL64)


def test_unsupported_layers_keep_their_gradient():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 4, 3, groups=2), nn.Flatten(), nn.LayerNorm(4 * 5 * 5),
                          nn.Linear(4 * 5 * 5, 3)).double()
    x = torch.randn(5, 2, 7, 7, dtype=torch.float64)
    y = torch.randint(0, 3, (5,))
    pre = kt.KFAC(model, damping=1e-2)
    assert [ly.module for ly in pre.layers] == [model[3]]
    F.cross_entropy(model(x), y).backward()
    kept = {n: p.grad.clone() for n, p in model.named_parameters() if not n.startswith("3.")}
    lin_before = model[3].weight.grad.clone()
    pre.step()
    for n, p in model.named_parameters():
        if n in kept:
            assert torch.equal(p.grad, kept[n])
    assert not torch.allclose(model[3].weight.grad, lin_before)


def test_running_average_update_and_refresh_periods():
    """First step: the first batch exactly; then ε = min(1 − 1/k, 0.95); inverses refreshed every T steps."""
    lam = 1e-2
    model = mlp()
    (x1, y1), (x2, y2), (x3, y3) = (batch(model, seed=s) for s in (1, 2, 3))
    ref1 = dense_factors(*per_example(model, x1, y1)[:2])
    pre = kt.KFAC(model, damping=lam, refresh_period=2)
    run_step(model, pre, x1, y1)
    _assert_factors(pre, model, ref1)
    # step 2 folds in batch 2 (ε = 1/2) but applies the inverse built at step 1
    w_before = [m.weight.detach().clone() for m in layers_of(model)]
    ref2 = dense_factors(*per_example(plain_copy(model, mlp), x2, y2)[:2])
    _, before = run_step(model, pre, x2, y2)
    for m, (A1, G1), (A2, G2), V in zip(layers_of(model), ref1, ref2, before):
        close(pre.factors(m)[0].numpy(), 0.5 * A1 + 0.5 * A2, RTOL64)
        close(pre.factors(m)[1].numpy(), 0.5 * G1 + 0.5 * G2, RTOL64)
        M = np.kron(A1, G1) + lam * np.eye(A1.shape[0] * G1.shape[0])
        close(vec(grad_block(m).numpy()), np.linalg.solve(M, vec(V.numpy())), SOLVE64)
    assert all(torch.equal(w, m.weight) for w, m in zip(w_before, layers_of(model)))
    # update_period=2: the second step adds nothing
    model = mlp()
    pre = kt.KFAC(model, damping=lam, update_period=2)
    run_step(model, pre, x1, y1)
    run_step(model, pre, x2, y2)
    for m, (A, G) in zip(layers_of(model), ref1):
        close(pre.factors(m)[0].numpy(), A, RTOL64)
    ref3 = dense_factors(*per_example(plain_copy(model, mlp), x3, y3)[:2])
    run_step(model, pre, x3, y3)
    for m, (A1, _), (A3, _) in zip(layers_of(model), ref1, ref3):
        close(pre.factors(m)[0].numpy(), 0.5 * A1 + 0.5 * A3, RTOL64)


def test_tridiagonal_structure_inverts_the_block_tridiagonal_fisher():
    """K-FAC §4.3: F̂⁻¹ applied to the stacked gradient; F̂ agrees with the damped F̃ on its tridiagonal blocks."""
    lam = 1e-2
    model = mlp()
    x, y = batch(model, N=9)
    acts, errs, _ = per_example(model, x, y)
    pre = kt.KFAC(model, damping=lam, damping_mode="factored", structure="tridiagonal")
    _, before = run_step(model, pre, x, y)
    N = x.shape[0]
    a = [np.concatenate(al) for al in acts]  # (N, p_k)
    g = [np.concatenate(gl) for gl in errs]
    gam = math.sqrt(lam)
    blocks = {}
    for i in range(3):
        for j in range(3):
            Aij, Gij = a[i].T @ a[j] / N, g[i].T @ g[j] / N
            if i == j:
                pi = _pi(Aij, Gij)
                Aij = Aij + pi * gam * np.eye(Aij.shape[0])
                Gij = Gij + gam / pi * np.eye(Gij.shape[0])
            blocks[i, j] = np.kron(Aij, Gij)
    sizes = [blocks[i, i].shape[0] for i in range(3)]
    off = np.cumsum([0] + sizes)
    Finv = kronlin.BlockTridiagInverse([a[k].T @ a[k] / N for k in range(3)], [g[k].T @ g[k] / N for k in range(3)],
                                       [a[k].T @ a[k + 1] / N for k in range(2)], [g[k].T @ g[k + 1] / N for k in range(2)],
                                       gamma=gam).to_dense()
    Fhat = np.linalg.inv(Finv)
    for i in range(3):
        for j in range(3):
            if abs(i - j) <= 1:  # the defining property of F̂ (K-FAC §4.3)
                close(Fhat[off[i]:off[i + 1], off[j]:off[j + 1]], blocks[i, j], 1e-8)
    v = np.concatenate([vec(V.numpy()) for V in before])
    got = np.concatenate([vec(grad_block(m).numpy()) for m in layers_of(model)])
    close(got, Finv @ v, SOLVE64)


def test_float32_model_stays_float32_and_matches_float64():
    m64 = mlp()
    m32 = mlp(dtype=torch.float32)
    x, y = batch(m64)
    out = []
    for model, xx in ((m64, x), (m32, x.float())):
        pre = kt.KFAC(model, damping=1e-2)
        run_step(model, pre, xx, y)
        A, G = pre.factors(model[0])
        out.append((A, G, grad_block(model[0])))
    for t64, t32 in zip(*out):
        assert t32.dtype == torch.float32
        close(t32.double().numpy(), t64.numpy(), 1e-4)  # float32 round-off, condition ≲ 1e2


# ---------------------------------------------------------------------------------------------
# checkpoints and training
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("make", [mlp, cnn], ids=["mlp", "cnn"])
@pytest.mark.parametrize("max_decay,N,mode", [(0.95, 7, "exact"), (0.0, 2, "exact"), (0.0, 2, "factored")])
def test_state_dict_resume_is_bit_exact(make, max_decay, N, mode):
    """max_decay = 0 with N = 2: one batch's factors, inverted from the rows (thin), which the state keeps."""
    def fresh():
        model = make()
        pre = kt.KFAC(model, damping=1e-2, fisher="mc", loss="cross_entropy", refresh_period=2, update_period=1, seed=5,
                      max_decay=max_decay, damping_mode=mode)
        opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
        return model, pre, opt

    batches = [batch(make(), N=N, seed=s) for s in range(6)]
    (model_a, pre_a), (model_c, pre_c) = resumed_run(fresh, batches, 3)
    for pa, pc in zip(model_a.parameters(), model_c.parameters()):
        assert torch.equal(pa, pc)
    for m_a, m_c in zip(layers_of(model_a), layers_of(model_c)):
        assert all(torch.equal(s, t) for s, t in zip(pre_a.factors(m_a), pre_c.factors(m_c)))


def test_kfac_beats_sgd_on_digits():
    datasets = pytest.importorskip("sklearn.datasets")
    X, Y = datasets.load_digits(return_X_y=True)
    X = torch.tensor(X / 16.0, dtype=torch.float64)
    Y = torch.tensor(Y)
    g = torch.Generator().manual_seed(0)
    idx = [torch.randint(0, X.shape[0], (64,), generator=g) for _ in range(40)]

    def run(use_kfac):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(64, 32), nn.Tanh(), nn.Linear(32, 10)).double()
        opt = torch.optim.SGD(model.parameters(), lr=0.2)
        pre = kt.KFAC(model, damping=3e-2, damping_mode="factored", refresh_period=5) if use_kfac else None
        for i in idx:
            opt.zero_grad()
            F.cross_entropy(model(X[i]), Y[i]).backward()
            if pre is not None:
                pre.step()
            opt.step()
        with torch.no_grad():
            return F.cross_entropy(model(X), Y).item()

    sgd, kfac = run(False), run(True)
    assert kfac < 0.7 * sgd, (kfac, sgd)


# ---------------------------------------------------------------------------------------------
# errors
# ---------------------------------------------------------------------------------------------
def test_model_without_supported_layer():
    with pytest.raises(ValueError, match="no supported layer"):
        kt.KFAC(nn.Sequential(nn.ReLU(), nn.Conv2d(2, 2, 3, groups=2)))
    with pytest.raises(TypeError, match="nn.Module"):
        kt.KFAC(lambda x: x)


@pytest.mark.parametrize("kwargs, match", [
    (dict(reduction="none"), "reduction must be 'mean' or 'sum'"),
    (dict(loss=nn.CrossEntropyLoss(reduction="none")), "cannot be represented"),
    (dict(loss=nn.MSELoss(reduction="sum"), reduction="sum"), None),
    (dict(loss=nn.CrossEntropyLoss(weight=torch.ones(3))), "class weights"),
    (dict(fisher="mc"), "needs loss="),
    (dict(fisher="type-2"), "fisher must be"),
    (dict(damping_mode="heuristic"), "damping_mode"),
    (dict(structure="tridiagonal"), "damping_mode='factored'"),
    (dict(update_period=0), "update_period"),
    (dict(damping=-1.0), "damping"),
    (dict(damping=float("nan")), "damping must be finite"),
    (dict(max_decay=1.0), "max_decay"),
    (dict(max_decay=float("nan")), "max_decay must be finite"),
])
def test_bad_options(kwargs, match):
    if match is None:
        assert kt.KFAC(mlp(), **kwargs).reduction == "sum"
        return
    with pytest.raises(ValueError, match=match):
        kt.KFAC(mlp(), **kwargs)


@pytest.mark.parametrize("cls", [kt.KFAC, kt.NaturalGradient])
@pytest.mark.parametrize("key, value", [("damping", "1e-3"), ("damping", True), ("damping", None)])
def test_option_types_checked_like_the_core(cls, key, value):
    """The binding validates through the core's helpers: a string damping used to be converted by float()."""
    with pytest.raises(TypeError, match=f"{key} must be a real scalar"):
        cls(mlp(), **{key: value})


@pytest.mark.parametrize("cls", [kt.KFAC, kt.NaturalGradient])
@pytest.mark.parametrize("seed, error", [(None, TypeError), ("1", TypeError), (2.5, TypeError), (True, TypeError),
                                         (-1, ValueError), (2**63, ValueError), (float("nan"), TypeError)])
def test_seed_checked(cls, seed, error):
    """The MC labels' seed is an integer: a float was truncated, a bool taken as 0/1, None an unnamed error."""
    model = mlp()
    with pytest.raises(error, match="seed must be"):
        cls(model, seed=seed)
    assert all(not m._forward_hooks for m in model.modules())  # nothing left behind
    assert cls(model, seed=np.int64(3)).seed == 3


def test_max_decay_type_checked():
    with pytest.raises(TypeError, match="max_decay must be a real scalar"):
        kt.KFAC(mlp(), max_decay="0.9")


def test_tridiagonal_needs_a_linear_chain():
    model = cnn()
    with pytest.raises(ValueError, match="sequential stack"):
        kt.KFAC(model, damping_mode="factored", structure="tridiagonal")
    assert all(not m._forward_hooks for m in model.modules())  # a refused construction leaves no hooks
    with pytest.raises(ValueError, match="has 5 outputs"):
        kt.KFAC(nn.Sequential(nn.Linear(3, 5), nn.Linear(4, 2)), damping_mode="factored", structure="tridiagonal")


def test_step_before_backward_and_layers_without_data():
    model = mlp()
    x, y = batch(model)
    pre = kt.KFAC(model)
    with pytest.raises(RuntimeError, match="before any backward pass"):
        pre.step()
    model(x)  # a forward pass alone is not enough
    with pytest.raises(RuntimeError, match="before any backward pass"):
        pre.step()
    pre._clear()

    class TwoHeads(nn.Module):
        def __init__(self):
            super().__init__()
            self.body, self.head, self.unused = nn.Linear(6, 4), nn.Linear(4, 3), nn.Linear(4, 3)

        def forward(self, x):
            return self.head(torch.tanh(self.body(x)))

    net = TwoHeads().double()
    pre = kt.KFAC(net)
    F.cross_entropy(net(x), y).backward()
    with pytest.raises(RuntimeError, match=r"\['unused'\] saw no data"):
        pre.step()
    with pytest.raises(RuntimeError, match="no statistics yet"):
        pre.factors(net.head)
    with pytest.raises(ValueError, match="not one of the layers"):
        pre.factors(nn.Linear(2, 2))


@pytest.mark.parametrize("mode", ["exact", "factored"])
def test_non_finite_statistics_refuse_the_step_and_name_the_layer(mode):
    """The binding leaves the finiteness tests to the core (factor diagonals, preconditioned blocks) and names
    the layer when the core refuses: both damping modes, whose operators check differently."""
    model = mlp()
    x, y = batch(model)
    pre = kt.KFAC(model, damping_mode=mode)
    run_step(model, pre, x, y)
    factors = [t.clone() for t in pre.factors(model[2])]
    x = x.clone()
    x[3, 1] = float("nan")
    model.zero_grad(set_to_none=True)
    F.cross_entropy(model(x), y).backward()
    grads = [p.grad.clone() for p in model.parameters()]
    with pytest.raises(FloatingPointError, match="layer '0' has non-finite inputs"):
        pre.step()
    assert pre.steps == 1
    assert all(torch.equal(g.nan_to_num(), p.grad.nan_to_num()) for g, p in zip(grads, model.parameters()))
    assert all(torch.equal(s, t) for s, t in zip(factors, pre.factors(model[2])))
    # a finite batch whose gradient is not finite is refused too
    pre._clear()
    model.zero_grad(set_to_none=True)
    F.cross_entropy(model(x[:3]), y[:3]).backward()
    model[4].bias.grad[0] = float("inf")
    with pytest.raises(FloatingPointError, match="layer '4' has a non-finite gradient"):
        pre.step()
    assert pre.steps == 1


def test_overflowing_statistics_refuse_the_step_and_name_the_layer():
    """float32 inputs of 1e20 are finite, their second moments are not."""
    model = mlp(dtype=torch.float32)
    x, y = batch(model, dtype=torch.float32)
    pre = kt.KFAC(model, damping=1e-2)
    run_step(model, pre, x, y)
    factors = [t.clone() for t in pre.factors(model[0])]
    model.zero_grad(set_to_none=True)
    F.cross_entropy(model(x * 1e20), y).backward()
    grads = [p.grad.clone() for p in model.parameters()]
    with pytest.raises(FloatingPointError, match="layer '0' has non-finite statistics"):
        pre.step()
    assert pre.steps == 1
    assert all(torch.equal(s, t) for s, t in zip(factors, pre.factors(model[0])))
    assert all(torch.equal(g, p.grad) for g, p in zip(grads, model.parameters()))
    # the preconditioner still works afterwards, with the old statistics
    pre._clear()
    run_step(model, pre, x, y)
    assert pre.steps == 2


def test_singular_curvature_names_the_layer():
    """Exact damping λ = 0 on a rank-deficient factor: the refresh fails, names the layer, changes nothing."""
    model = mlp()
    x, y = batch(model, N=2)  # A of the first layer (7×7) has rank ≤ 2
    pre = kt.KFAC(model, damping=0.0, damping_mode="factored")
    F.cross_entropy(model(x), y).backward()
    with pytest.raises(np.linalg.LinAlgError, match="layer '0'"):
        pre.step()
    assert pre.steps == 0
    with pytest.raises(RuntimeError, match="no statistics yet"):
        pre.factors(model[0])


def test_load_state_dict_rejects_another_configuration():
    pre = kt.KFAC(mlp())
    with pytest.raises(ValueError, match="not a kronlin.torch.KFAC"):
        pre.load_state_dict({"format": "x"})
    other = kt.KFAC(mlp(), fisher="mc", loss="mse").state_dict()
    with pytest.raises(ValueError, match="fisher="):
        pre.load_state_dict(other)


def _bad_state_edits():
    def rows_edit(s):
        s["rows"] = {"acts": s["rows"]["acts"][:1], "errs": s["rows"]["errs"], "N": s["rows"]["N"]}

    return [
        (lambda s: s.pop("stats"), r"missing 'stats'"),
        (lambda s: s.update(steps=-1), r"state\['steps'\]"),
        (lambda s: s.update(steps="3"), r"state\['steps'\]"),
        (lambda s: s.update(positions=[1]), r"state\['positions'\]"),
        (lambda s: s.update(scale=float("nan")), r"state\['scale'\]"),
        (lambda s: s.update(estimator_step=0), r"state\['estimator_step'\]"),
        (lambda s: s.update(stats=[1]), r"state\['stats'\]"),
        (lambda s: s["stats"]["A_diag"].__setitem__(1, torch.eye(3, dtype=torch.float64)), r"state\['stats'\]"),
        (lambda s: s["stats"]["G_diag"][0].__setitem__((0, 0), float("nan")), r"state\['stats'\]\['G_diag'\]\[0\]"),
        (lambda s: s["stats"].update(A_diag="x"), r"state\['stats'\]\['A_diag'\]"),
        (lambda s: s["inverse_factors"]["G_diag"].pop(), r"state\['inverse_factors'\]"),
        (lambda s: s["inverse_factors"]["A_diag"].__setitem__(0, torch.eye(2, dtype=torch.float64)),
         r"state\['inverse_factors'\] gives layer '0'"),
        (lambda s: s.update(inverse_factors={"A_diag": []}), r"state\['inverse_factors'\]"),
        (rows_edit, r"state\['rows'\]"),
        (lambda s: s.update(rows=[1]), r"state\['rows'\]"),
        (lambda s: s["rows"].update(N="2"), r"state\['rows'\]\['N'\]"),
        (lambda s: s.update(generator=torch.zeros(3)), r"generator"),
    ]


@pytest.mark.parametrize("edit, pattern", _bad_state_edits())
def test_load_state_dict_names_a_malformed_entry_and_changes_nothing(edit, pattern):
    """A malformed state raises ValueError naming the entry; the preconditioner then steps exactly as one that
    never saw it (max_decay=0 with N = 2: the state holds the rows, the thin route's input)."""
    batches = [batch(mlp(), N=2, seed=s) for s in range(3)]

    def trained():
        model = mlp()
        pre = kt.KFAC(model, damping=1e-2, max_decay=0.0, damping_mode="factored")
        run_step(model, pre, *batches[0])
        return model, pre

    model_a, pre_a = trained()
    model_b, pre_b = trained()
    state = pre_a.state_dict()
    edit(state)
    with pytest.raises(ValueError, match=pattern):
        pre_b.load_state_dict(state)
    for m_a, m_b in zip(layers_of(model_a), layers_of(model_b)):
        assert all(torch.equal(s, t) for s, t in zip(pre_a.factors(m_a), pre_b.factors(m_b)))
    assert pre_b.steps == pre_a.steps == 1
    for model, pre in ((model_a, pre_a), (model_b, pre_b)):
        run_step(model, pre, *batches[1])
    for pa, pb in zip(model_a.parameters(), model_b.parameters()):
        assert torch.equal(pa.grad, pb.grad)


def test_a_state_written_before_the_rows_were_kept_still_loads():
    """States of the same format from before the one-batch rows were saved have no 'rows' / 'inverse_rows':
    they load (no rows: every inverse from the factors) and step as the preconditioner they came from."""
    batches = [batch(mlp(), seed=s) for s in range(3)]

    def trained():
        model = mlp()
        pre = kt.KFAC(model, damping=1e-2, refresh_period=2)
        for b in batches[:2]:
            run_step(model, pre, *b)
        return model, pre

    model_a, pre_a = trained()
    model_b, pre_b = trained()
    state = pre_a.state_dict()
    assert state["rows"] is None and state["inverse_rows"] is None  # a running average: no rows to lose
    del state["rows"], state["inverse_rows"]
    pre_b.load_state_dict(state)
    for model, pre in ((model_a, pre_a), (model_b, pre_b)):
        run_step(model, pre, *batches[2])
    for pa, pb in zip(model_a.parameters(), model_b.parameters()):
        assert torch.equal(pa.grad, pb.grad)


def test_import_kronlin_does_not_import_torch(tmp_path):
    code = "import sys, kronlin; assert 'torch' not in sys.modules; import kronlin.torch; assert 'torch' in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=tmp_path)


def test_a_thread_limit_set_after_import_covers_the_core_lapack():
    """torch.set_num_threads limits torch's pool only; the core's decompositions run in SciPy's own OpenBLAS,
    which kronlin.torch loads at import so that a threadpoolctl limit set afterwards covers it (an unpinned
    second pool made refreshes on a busy machine up to 10x slower).  Fresh interpreter: nothing preloaded."""
    pytest.importorskip("threadpoolctl")
    code = (
        "import torch, kronlin.torch as kt\n"
        "from threadpoolctl import threadpool_limits, threadpool_info\n"
        "m = torch.nn.Sequential(torch.nn.Linear(4, 3))\n"
        "with threadpool_limits(1):\n"
        "    pre = kt.KFAC(m, damping=1e-2, damping_mode='factored')\n"
        "    torch.nn.functional.cross_entropy(m(torch.randn(8, 4)), torch.randint(0, 3, (8,))).backward()\n"
        "    pre.step()\n"
        "    pools = [(p['filepath'], p['num_threads']) for p in threadpool_info() if p['internal_api'] == 'openblas']\n"
        "print(pools)\n"
        "assert len(pools) >= 1 and all(n == 1 for _, n in pools), pools\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr


@pytest.mark.parametrize("fisher", ["empirical", "mc"])
def test_a_copy_of_the_model_neither_feeds_the_preconditioner_nor_carries_it(fisher):
    """copy.deepcopy(model) (an EMA or evaluation copy) and torch.save(model) copy the modules' hooks: the
    copies' hooks are inert, so training a copy changes nothing of the preconditioner of the original (its
    statistics, its MC labels), and a whole-model checkpoint pickles without it."""
    import copy
    import io

    batches = [batch(mlp(), seed=s) for s in range(4)]

    def fresh():
        model = mlp()
        pre = kt.KFAC(model, damping=1e-2, fisher=fisher, loss="cross_entropy", seed=5)
        return model, pre, torch.optim.SGD(model.parameters(), lr=0.1)

    model_a, pre_a, opt_a = fresh()
    train(model_a, pre_a, opt_a, batches)
    model_b, pre_b, opt_b = fresh()
    twin = copy.deepcopy(model_b)
    buf = io.BytesIO()
    torch.save(model_b, buf)  # a local-function hook would not pickle; a bound one would drag pre_b along
    assert len(buf.getvalue()) < 20_000
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    twin_opt = torch.optim.SGD(twin.parameters(), lr=0.1)
    for x, y in batches:
        for other in (twin, loaded):  # trained between the original's passes, with gradients
            twin_opt.zero_grad(set_to_none=True)
            F.cross_entropy(other(x), y).backward()
            twin_opt.step()
        train(model_b, pre_b, opt_b, [(x, y)])
    for ma, mb in zip(layers_of(model_a), layers_of(model_b)):
        assert all(torch.equal(u, v) for u, v in zip(pre_a.factors(ma), pre_b.factors(mb)))
        assert torch.equal(ma.weight, mb.weight)
    if fisher == "mc":
        assert torch.equal(pre_a.sampled_targets, pre_b.sampled_targets)
    pre_b.remove_hooks()  # the original's hooks go; the copies' inert ones stay inert
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model_b.modules())


@pytest.mark.parametrize("fisher, reduction, damping_mode", [
    ("empirical", "mean", "exact"), ("empirical", "sum", "factored"), ("mc", "mean", "factored")])
def test_accumulated_micro_batches_equal_one_batch(fisher, reduction, damping_mode):
    """accumulation_steps=3: three forward/backward passes (PyTorch's recipe: each micro-batch's mean loss / 3,
    or its sum) give the factors and the preconditioned gradient of the whole batch in one pass."""
    model = mlp()
    x, y = batch(model, N=9)
    parts = [(x[:2], y[:2]), (x[2:6], y[2:6]), (x[6:], y[6:])]  # unequal micro-batches

    def loss_of(f, t, k):
        # "mean": PyTorch's recipe, each micro-batch's mean over K (the hooks see ĝ/(n_k·K) and rescale by n_k·K,
        # so the factors are exact for unequal sizes too); "sum": each micro-batch's sum
        total = F.cross_entropy(f, t, reduction=reduction)
        return total / k if reduction == "mean" else total

    one = plain_copy(model, mlp)
    pre_one = kt.KFAC(one, damping=1e-2, damping_mode=damping_mode, fisher=fisher, loss="cross_entropy",
                      reduction=reduction, seed=4)
    # the one-batch reference: labels for MC are drawn per forward pass, so the reference takes the
    # accumulated run's draws (below) and compares factors built from the same rows
    pre_acc = kt.KFAC(model, damping=1e-2, damping_mode=damping_mode, fisher=fisher, loss="cross_entropy",
                      reduction=reduction, seed=4, accumulation_steps=3)
    model.zero_grad(set_to_none=True)
    drawn = []
    for xs, ys in parts:
        loss_of(model(xs), ys, 3).backward()
        if fisher == "mc":
            drawn.append(pre_acc.sampled_targets.clone())
    acc_grads = [grad_block(m) for m in layers_of(model)]
    pre_acc.step()
    # the same batch in one pass, preconditioning the accumulated gradient (for unequal micro-batches the
    # recipe's gradient is not the batch mean's; the factors are the batch's either way)
    one.zero_grad(set_to_none=True)
    F.cross_entropy(one(x), y, reduction=reduction).backward()
    for m, G in zip(layers_of(one), acc_grads):
        Gw = G[:, : m.weight.reshape(m.weight.shape[0], -1).shape[1]]
        m.weight.grad.copy_(Gw.reshape(m.weight.shape))
        if m.bias is not None:
            m.bias.grad.copy_(G[:, -1])
    if fisher == "mc":
        pre_one.remove_hooks()
        acts, errs, _ = per_example(one, x, torch.cat(drawn), "cross_entropy", reduction)
        c = 1.0 if reduction == "mean" else x.shape[0]
        for m, (A, G) in zip(layers_of(model), dense_factors(acts, errs, c)):
            close(pre_acc.factors(m)[0].numpy(), A, RTOL64)
            close(pre_acc.factors(m)[1].numpy(), G, RTOL64)
        return
    pre_one.step()
    for ma, mo in zip(layers_of(model), layers_of(one)):
        for u, v in zip(pre_acc.factors(ma), pre_one.factors(mo)):
            close(u.numpy(), v.numpy(), RTOL64)
        close(grad_block(ma).numpy(), grad_block(mo).numpy(), SOLVE64)


def test_accumulation_counts_are_checked_and_reuse_in_one_pass_is_refused():
    model = mlp()
    x, y = batch(model, N=6)
    pre = kt.KFAC(model, damping=1e-2, accumulation_steps=2)
    model.zero_grad(set_to_none=True)
    F.cross_entropy(model(x), y).backward()
    with pytest.raises(RuntimeError, match=r"ran 1 time with .* accumulation_steps=2: call step\(\) after every 2"):
        pre.step()
    pre.remove_hooks()
    # steps that fold no statistics in (update_period) count the passes too
    pre = kt.KFAC(model, damping=1e-2, accumulation_steps=2, update_period=2)
    model.zero_grad(set_to_none=True)
    for sl in (slice(0, 3), slice(3, 6)):
        (F.cross_entropy(model(x[sl]), y[sl]) / 2).backward()
    pre.step()  # step 0 folds the statistics in; step 1 only preconditions
    model.zero_grad(set_to_none=True)
    F.cross_entropy(model(x), y).backward()
    with pytest.raises(RuntimeError, match=r"ran 1 time with .* accumulation_steps=2"):
        pre.step()
    pre.remove_hooks()
    with pytest.raises(ValueError, match="accumulation_steps"):
        kt.KFAC(mlp(), accumulation_steps=0)
    with pytest.raises(ValueError, match="accumulation_steps"):
        kt.NaturalGradient(mlp(), damping=1.0, accumulation_steps=1.5)

    class Twice(nn.Module):  # one Linear applied twice in one forward pass
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(3, 3).double()

        def forward(self, x):
            return self.lin(torch.tanh(self.lin(x)))

    net = Twice()
    pre = kt.KFAC(net, damping=1e-2, accumulation_steps=2)
    z = torch.randn(4, 3, dtype=torch.float64)
    F.cross_entropy(net(z), torch.tensor([0, 1, 2, 0])).backward()
    with pytest.raises(RuntimeError, match="several times in one forward pass"):
        pre.step()


def test_natural_gradient_accumulates_like_one_batch():
    model, one = mlp(), mlp()
    x, y = batch(model, N=8)
    ng = kt.NaturalGradient(model, damping=0.3, accumulation_steps=2)
    model.zero_grad(set_to_none=True)
    for sl in (slice(0, 4), slice(4, 8)):
        (F.cross_entropy(model(x[sl]), y[sl]) / 2).backward()
    ng.step()
    ref = kt.NaturalGradient(one, damping=0.3)
    one.zero_grad(set_to_none=True)
    F.cross_entropy(one(x), y).backward()  # equal micro-batches: the recipe's gradient is the batch mean's
    ref.step()
    for ma, mo in zip(layers_of(model), layers_of(one)):
        close(grad_block(ma).numpy(), grad_block(mo).numpy(), SOLVE64)
