"""Training tasks that need no network access.

=============  ===========================================================================
``digits-clf`` scikit-learn's bundled 8×8 digits (1797 images, pixels scaled to [0, 1]),
               10-class softmax cross-entropy, MLP 64-128-64-10 (tanh).
``digits-ae``  the same images, deep autoencoder 64-128-64-32-8-32-64-128-64 with
               sigmoid binary cross-entropy: the papers' MNIST autoencoder
               784-1000-500-250-30 (Hinton & Salakhutdinov 2006; K-FAC §13; Botev
               et al. §6) with every width scaled by ≈ 1/8 to the 64-pixel input.
``curves-ae``  seeded 28×28 CURVES-style images (:func:`make_curves`), deep
               autoencoder 784-200-100-50-25-12-6-12-25-50-100-200-784 with sigmoid
               binary cross-entropy: the papers' CURVES architecture
               784-400-200-100-50-25-6 (mirrored) with the hidden widths halved
               (the 6-unit code kept).
``digits-conv`` a small weight-sharing classifier on the digits: Conv2D(1×8×8 → 8, 3×3)
               → Conv2D(8×6×6 → 16, 3×3, stride 2) → Dense(64 → 10), tanh.
=============  ===========================================================================

Autoencoders use tanh hidden units and a linear code layer (the middle layer,
as in the papers); every network's last layer is linear (logits).  Initial
weights are scaled Gaussians ``N(0, 1/d_in)`` with zero biases
(:class:`~kronlin.train.net.Net`, ``init="gaussian"``).  The sparse
initialisation of Martens (2010) that K-FAC's experiments use is available
with the task option ``init="sparse"`` (``--data init=sparse``); with tanh
units it starts the autoencoders saturated (digits-ae: loss ≈ 90 instead of
≈ 42) and first-order methods then stall on a higher plateau.

All randomness is explicit: the data of ``curves-ae`` come from the ``seed``
given to :func:`load_task`, initial weights from the ``rng`` given to
``task.net_factory`` and mini-batches from the ``rng`` given to
``task.sample_batch`` / ``task.batches``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from collections.abc import Callable, Iterator

import numpy as np

from .losses import Loss, get_loss
from .net import Conv2D, Dense, Net

__all__ = ["Task", "load_task", "make_curves", "TASKS", "mlp"]

TASKS = ("digits-clf", "digits-ae", "curves-ae", "digits-conv")


@dataclass
class Task:
    """A data set, its loss and its default architecture.

    Attributes
    ----------
    name : str
    X_train : ndarray ``(n, d)``
    Y_train : ndarray — class labels ``(n,)`` for classifiers, ``X_train`` for autoencoders
    loss : Loss
    net_factory : callable ``rng -> Net`` building the default architecture
    description : str
    X_test, Y_test : ndarray or None
        The held-out examples (task option ``holdout``); ``None`` without a split.
    """

    name: str
    X_train: np.ndarray
    Y_train: np.ndarray
    loss: Loss
    net_factory: Callable[[np.random.Generator], Net]
    description: str = ""
    options: dict = field(default_factory=dict)
    X_test: np.ndarray | None = None
    Y_test: np.ndarray | None = None

    @property
    def n_train(self) -> int:
        return int(self.X_train.shape[0])

    @property
    def is_classifier(self) -> bool:
        """Whether the targets are class labels (softmax cross-entropy): a classification error is defined."""
        return self.loss.name == "softmax_ce"

    def split(self, holdout: float, seed: int) -> "Task":
        """This task with a fraction ``holdout`` of its examples held out as a test set.

        The test examples are the last ``round(holdout·n)`` of a permutation drawn from
        ``default_rng(seed)`` (the data seed), so the split depends only on the data and the seed.
        """
        n = self.n_train
        n_test = int(round(holdout * n))
        if not 0 <= n_test < n:
            raise ValueError(f"holdout={holdout!r} must leave at least one training example (0 <= holdout < 1)")
        if n_test == 0:
            return self
        perm = np.random.default_rng(seed).permutation(n)
        tr, te = np.sort(perm[: n - n_test]), np.sort(perm[n - n_test:])
        return Task(self.name, self.X_train[tr], self.Y_train[tr], self.loss, self.net_factory, self.description,
                    dict(self.options), self.X_train[te], self.Y_train[te])  # fmt: skip

    def sample_batch(self, batch: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        """A mini-batch of ``batch`` distinct examples drawn uniformly by ``rng``.

        Every call is an independent draw (no epoch bookkeeping), so the state
        of ``rng`` alone determines all later batches.  ``batch >= n_train``
        returns the whole training set in order and leaves ``rng`` untouched.
        """
        batch = int(batch)
        if batch < 1:
            raise ValueError(f"batch must be >= 1; got {batch}")
        if batch >= self.n_train:
            return self.X_train, self.Y_train
        idx = rng.choice(self.n_train, size=batch, replace=False)
        return self.X_train[idx], self.Y_train[idx]

    def batches(self, batch: int, rng: np.random.Generator) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """Mini-batches forever (:meth:`sample_batch` repeatedly)."""
        while True:
            yield self.sample_batch(batch, rng)


#: How to install what the tasks and ``compare``'s plot need (the README installs kronlin from its source folder).
INSTALL_TRAIN = 'pip install ".[train]" in the kronlin source folder'


def mlp(widths, activation: str = "tanh", linear_layers=()) -> list[Dense]:
    """Dense layers ``widths[0] → … → widths[-1]``; the last and those in ``linear_layers`` are linear."""
    n = len(widths) - 1
    return [
        Dense(widths[i], widths[i + 1], "linear" if (i == n - 1 or i in linear_layers) else activation)
        for i in range(n)
    ]


def _digits() -> tuple[np.ndarray, np.ndarray]:
    try:
        from sklearn.datasets import load_digits
    except ImportError as exc:  # pragma: no cover - sklearn is in the [train] extra
        raise ImportError(f"the digits tasks need scikit-learn: {INSTALL_TRAIN}") from exc
    d = load_digits()
    return np.asarray(d.data, dtype=np.float64) / 16.0, np.asarray(d.target, dtype=np.int64)


def make_curves(n: int = 5000, seed: int = 0, size: int = 28, width: float = 0.8, samples: int = 256) -> np.ndarray:
    """``n`` CURVES-style images ``(n, size²)`` with intensities in [0, 1].

    Like the CURVES set of Hinton & Salakhutdinov (2006) (three random points
    per image), each image is a smooth curve through three control points
    ``P0, P1, P2`` drawn uniformly from ``[2, size−3]²``: the quadratic
    ``c(t) = P0·L0(t) + P1·L1(t) + P2·L2(t)`` with the Lagrange basis on the
    nodes ``t = 0, ½, 1``, so the curve passes through all three points (parts
    that leave the frame are cut off).  It is drawn with a Gaussian pen of
    width ``w``: pixel ``x`` (centres on the integer grid) gets the line
    integral ``∫ exp(−|x − c|² / (2w²)) ds / (√(2π) w)`` along the curve,
    which is ``exp(−d² / (2w²))`` at distance ``d`` from a straight stroke,
    clipped to 1 where strokes overlap.  The integral is a sum over
    ``samples`` points (weights: arc length), separable in rows and columns,
    so each image is one small matrix product.  Pixels are row-major.  The
    images depend only on ``(n, seed, size, width, samples)``.
    """
    rng = np.random.default_rng(seed)
    P = rng.uniform(2.0, size - 3.0, size=(n, 3, 2))
    t = np.linspace(0.0, 1.0, samples)
    L = np.stack([2 * (t - 0.5) * (t - 1), -4 * t * (t - 1), 2 * t * (t - 0.5)])  # (3, samples)
    curve = np.einsum("pm,npc->nmc", L, P)  # (n, samples, 2) as (row, col)
    seg = np.linalg.norm(np.diff(curve, axis=1), axis=2)  # (n, samples-1)
    ds = np.zeros((n, samples))
    ds[:, 1:] += seg / 2
    ds[:, :-1] += seg / 2  # trapezoid weights
    grid = np.arange(size, dtype=np.float64)
    rows = np.exp(-((grid[None, :, None] - curve[:, None, :, 0]) ** 2) / (2 * width * width))  # (n, size, samples)
    cols = np.exp(-((grid[None, :, None] - curve[:, None, :, 1]) ** 2) / (2 * width * width))
    img = (rows * (ds / (np.sqrt(2 * np.pi) * width))[:, None, :]) @ cols.transpose(0, 2, 1)
    return np.clip(img, 0.0, 1.0).reshape(n, size * size)


TASK_OPTIONS = ("n", "activation", "init", "init_scale", "holdout")


def load_task(name: str, seed: int = 0, **options) -> Task:
    """The task ``name`` (one of :data:`TASKS`); ``seed`` fixes generated data (``curves-ae``) and the split.

    Options: ``n`` (number of ``curves-ae`` images, default 5000);
    ``activation`` (hidden units, default ``"tanh"``); ``init``
    (``"gaussian"``, the default, or ``"sparse"``) and ``init_scale`` (default 1)
    for :class:`~kronlin.train.net.Net`; ``holdout`` (default 0): the fraction
    of the examples held out as a test set (:meth:`Task.split`).
    """
    unknown = sorted(set(options) - set(TASK_OPTIONS))
    if unknown:
        raise ValueError(f"unknown task option(s) {unknown}; known: {', '.join(TASK_OPTIONS)}")
    holdout = options.get("holdout", 0.0)
    if isinstance(holdout, bool) or not isinstance(holdout, (int, float)) or not 0 <= holdout < 1:
        raise ValueError(f"task option holdout must be a number in [0, 1); got {holdout!r}")
    return _load(name, seed, options).split(float(holdout), seed)


def _load(name: str, seed: int, options: dict) -> Task:
    act = options.get("activation", "tanh")
    init, scale = options.get("init", "gaussian"), float(options.get("init_scale", 1.0))
    if name == "digits-clf":
        X, y = _digits()
        widths = [64, 128, 64, 10]
        return Task(
            name, X, y, get_loss("softmax_ce"),
            lambda rng: Net(mlp(widths, act), rng, init=init, scale=scale),
            "sklearn 8x8 digits, 10-class softmax CE, MLP 64-128-64-10", dict(options),
        )  # fmt: skip
    if name == "digits-ae":
        X, _ = _digits()
        widths = [64, 128, 64, 32, 8, 32, 64, 128, 64]
        return Task(
            name, X, X, get_loss("sigmoid_bce"),
            lambda rng: Net(mlp(widths, act, linear_layers=(3,)), rng, init=init, scale=scale),
            "sklearn 8x8 digits, deep autoencoder 64-128-64-32-8-32-64-128-64, sigmoid BCE", dict(options),
        )  # fmt: skip
    if name == "curves-ae":
        X = make_curves(int(options.get("n", 5000)), seed)
        widths = [784, 200, 100, 50, 25, 12, 6, 12, 25, 50, 100, 200, 784]
        return Task(
            name, X, X, get_loss("sigmoid_bce"),
            lambda rng: Net(mlp(widths, act, linear_layers=(5,)), rng, init=init, scale=scale),
            "28x28 CURVES-style images, deep autoencoder 784-200-100-50-25-12-6-(mirror)-784, sigmoid BCE",
            dict(options),
        )  # fmt: skip
    if name == "digits-conv":
        X, y = _digits()

        def factory(rng):
            layers = [
                Conv2D((1, 8, 8), 8, kernel=(3, 3), activation=act),
                Conv2D((8, 6, 6), 16, kernel=(3, 3), stride=2, activation=act),
                Dense(64, 10, "linear"),
            ]
            return Net(layers, rng, init=init, scale=scale)

        return Task(name, X, y, get_loss("softmax_ce"), factory,
                    "sklearn 8x8 digits, Conv(8,3x3)-Conv(16,3x3,s2)-Dense(10), softmax CE", dict(options))  # fmt: skip
    raise ValueError(f"unknown task {name!r}; choose one of {TASKS}")
