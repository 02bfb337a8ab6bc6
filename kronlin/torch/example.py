"""Train a torch MLP and a small CNN on scikit-learn's 8×8 digits with SGD, Adam, K-FAC and the natural gradient.

    python -m kronlin.torch.example [--steps 300] [--out kronlin_torch_example.png] [--threads 1]

Prints a table (final training loss on the whole training set, test accuracy,
milliseconds per step) and writes a plot of the mini-batch loss against steps.
Every optimizer starts from the same weights and sees the same mini-batches.
K-FAC and the natural gradient precondition the gradient; SGD with momentum
then steps on it.  Needs scikit-learn and matplotlib (``pip install ".[train,torch]"`` in the kronlin source folder).
"""

from __future__ import annotations

import argparse
import copy
import time

import numpy as np
import torch
from torch import nn
import torch.nn.functional as F

import kronlin.torch as kt

# name -> (optimizer factory, preconditioner factory or None)
METHODS = {
    "SGD": (lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9), None),
    "Adam": (lambda p: torch.optim.Adam(p, lr=3e-3), None),
    "KFAC": (lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9),
             lambda m: kt.KFAC(m, damping=1e-1, damping_mode="factored", refresh_period=10)),
    "NaturalGradient": (lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9),
                        lambda m: kt.NaturalGradient(m, damping=1.0)),
}


def models():
    torch.manual_seed(0)
    mlp = nn.Sequential(nn.Flatten(), nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 10))
    cnn = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.ReLU(),
                        nn.Flatten(), nn.Linear(16 * 4 * 4, 10))
    return {"MLP": mlp, "CNN": cnn}


def data(seed=0):
    from sklearn.datasets import load_digits

    X, Y = load_digits(return_X_y=True)
    rng = np.random.default_rng(seed)
    perm = rng.permutation(len(X))
    X = torch.tensor(X[perm] / 16.0, dtype=torch.float32).reshape(-1, 1, 8, 8)
    Y = torch.tensor(Y[perm])
    n = int(0.8 * len(X))
    return (X[:n], Y[:n]), (X[n:], Y[n:])


def train(model, method, train_set, test_set, batches):
    make_opt, make_pre = METHODS[method]
    opt = make_opt(model.parameters())
    pre = make_pre(model) if make_pre else None
    X, Y = train_set
    losses, t0 = [], time.perf_counter()
    for idx in batches:
        opt.zero_grad(set_to_none=True)
        loss = F.cross_entropy(model(X[idx]), Y[idx])
        loss.backward()
        if pre is not None:
            pre.step()
        opt.step()
        losses.append(loss.item())
    ms = (time.perf_counter() - t0) / len(batches) * 1e3
    if pre is not None:
        pre.remove_hooks()
    with torch.no_grad():
        train_loss = F.cross_entropy(model(X), Y).item()
        acc = (model(test_set[0]).argmax(1) == test_set[1]).double().mean().item()
    return {"losses": losses, "train_loss": train_loss, "test_acc": acc, "ms": ms}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--threads", type=int, default=1, help="torch and BLAS threads (default 1)")
    ap.add_argument("--out", default="kronlin_torch_example.png", help="where to write the plot")
    ap.add_argument("--methods", default=",".join(METHODS), help="comma-separated subset of " + ",".join(METHODS))
    args = ap.parse_args(argv)
    from threadpoolctl import threadpool_limits

    torch.set_num_threads(args.threads)
    train_set, test_set = data()
    g = torch.Generator().manual_seed(1)
    batches = [torch.randint(0, len(train_set[0]), (args.batch,), generator=g) for _ in range(args.steps)]
    methods = args.methods.split(",")
    results = {}
    with threadpool_limits(args.threads):
        for mname, model in models().items():
            for method in methods:
                results[mname, method] = train(copy.deepcopy(model), method, train_set, test_set, batches)
    print(f"digits 8x8, {args.steps} steps of batch {args.batch}, float32, {args.threads} thread(s)")
    print(f"{'model':5} {'method':16} {'train loss':>10} {'test acc':>9} {'ms/step':>8} {'vs SGD':>7}")
    for (mname, method), r in results.items():
        base = results.get((mname, "SGD"), r)["ms"]
        print(f"{mname:5} {method:16} {r['train_loss']:10.4f} {r['test_acc']:9.3f} {r['ms']:8.2f} {r['ms'] / base:6.2f}x")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
    for ax, mname in zip(axes, models()):
        for method in methods:
            ls = np.asarray(results[mname, method]["losses"])
            k = 10
            smooth = np.convolve(ls, np.ones(k) / k, mode="valid")
            ax.plot(np.arange(k, len(ls) + 1), smooth, label=method)
        ax.set_title(f"{mname} on digits")
        ax.set_xlabel("step")
        ax.set_yscale("log")
        ax.legend()
    axes[0].set_ylabel("mini-batch loss (10-step mean)")
    fig.tight_layout()
    fig.savefig(args.out, dpi=100)
    print(f"wrote {args.out}")
    return results


if __name__ == "__main__":
    main()
