"""Optimizers over :class:`kronlin.train.net.Net`, and their registry.

``OPTIMIZERS`` maps the command-line names to classes sharing the interface
of :class:`~kronlin.train.optim.base.Optimizer` (``step``, ``state_dict``,
``load_state_dict``, ``hparams``).  Add one with :func:`register`.
"""

from __future__ import annotations

from .adam import Adam
from .base import Optimizer, all_finite
from .sgd import SGD

__all__ = ["Optimizer", "SGD", "Adam", "OPTIMIZERS", "register", "get_optimizer", "all_finite"]

OPTIMIZERS: dict = {"sgd": SGD, "adam": Adam}


def register(name: str, cls) -> None:
    """Make ``cls`` (an :class:`Optimizer` subclass) available under ``name`` (e.g. ``--opt name``)."""
    if not (isinstance(cls, type) and issubclass(cls, Optimizer)):
        raise TypeError(f"register({name!r}, ...) needs an Optimizer subclass; got {cls!r}")
    OPTIMIZERS[name] = cls


def get_optimizer(name: str):
    """The optimizer class registered as ``name``."""
    try:
        return OPTIMIZERS[name]
    except KeyError:
        raise ValueError(f"unknown optimizer {name!r}; choose one of {sorted(OPTIMIZERS)}") from None


# ---------------------------------------------------------------------------
# Kronecker-factored optimizers (K-FAC, K-FAC block-tridiagonal, KFRA, KFLR).
# Their modules register themselves here; add one import line per module:
# >>> K-FAC family imports (owned by kfac.py / kfra.py) >>>
from . import kfac, kfra  # noqa: E402,F401  (register "kfac", "kfac-tridiag", "kfra", "kflr")
from . import foof, ngd  # noqa: E402,F401  (register "foof", "ngd")
from . import kbfgs  # noqa: E402,F401  (register "kbfgs", "kbfgs-l")
# <<< K-FAC family imports <<<
# ---------------------------------------------------------------------------
