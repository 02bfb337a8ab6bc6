"""kronlin.train: a small, exact NumPy training substrate for Kronecker-factored optimizers.

* :mod:`~kronlin.train.net` — :class:`Net` of :class:`Dense` and :class:`Conv2D`
  layers with homogeneous-coordinate weights ``W_i`` ``(d_out, d_in+1)`` (bias
  last, K-FAC §2.1); forward/backward passes exposing ``ā_{i-1}``, ``s_i`` and
  ``g_i``; Jacobian-vector products, Gauss-Newton/Fisher products and
  ``vᵀ F w`` (K-FAC appendix C).
* :mod:`~kronlin.train.losses` — softmax cross-entropy, sigmoid binary
  cross-entropy and squared error with value, gradient, predictive samples,
  Hessian, Hessian factor and Hessian-vector product.
* :mod:`~kronlin.train.data` — offline tasks: ``digits-clf``, ``digits-ae``,
  ``curves-ae``, ``digits-conv``.
* :mod:`~kronlin.train.optim` — the optimizer interface and registry (SGD with
  Nesterov momentum, Adam, and the K-FAC family).
* ``python -m kronlin.train`` — the command-line trainer (:mod:`~kronlin.train.cli`).

Only NumPy and SciPy are needed to import it; the digits tasks need
scikit-learn and ``compare``'s plot needs matplotlib (the ``train`` extra).
"""

from __future__ import annotations

from .losses import LOSSES, Loss, SigmoidBinaryCrossEntropy, SoftmaxCrossEntropy, SquaredError, get_loss
from .net import ACTIVATIONS, Conv2D, Dense, Net, Trace, col2im, im2col
from .data import TASKS, Task, load_task, make_curves
from .optim import OPTIMIZERS, SGD, Adam, Optimizer, get_optimizer, register

__all__ = [
    "Loss",
    "SoftmaxCrossEntropy",
    "SigmoidBinaryCrossEntropy",
    "SquaredError",
    "get_loss",
    "LOSSES",
    "Dense",
    "Conv2D",
    "Net",
    "Trace",
    "ACTIVATIONS",
    "im2col",
    "col2im",
    "Task",
    "load_task",
    "make_curves",
    "TASKS",
    "Optimizer",
    "SGD",
    "Adam",
    "OPTIMIZERS",
    "register",
    "get_optimizer",
]
