"""kronlin.torch: K-FAC and the exact subsampled natural gradient for torch.nn models.

A thin binding over kronlin's core (as ``pykeops.torch`` is over KeOps'):
hooks collect each supported layer's inputs and output gradients, the
statistics, damped inverses and solves are kronlin's (:class:`kronlin.FactorEstimator`,
:class:`kronlin.DampedKron`, :class:`kronlin.BlockTridiagInverse`,
:class:`kronlin.WoodburyFisher`), and the result replaces ``.grad`` so that any
torch optimizer steps on it::

    pre = kronlin.torch.KFAC(model, damping=1e-3)      # or NaturalGradient(model, damping=1e-2)
    loss_fn(model(x), y).backward()
    pre.step(); opt.step()

CPU tensors reach the core zero-copy as NumPy arrays; CUDA tensors through
DLPack as CuPy arrays (CuPy must be installed).  ``import kronlin`` does not
import torch; only ``import kronlin.torch`` does.

Conventions (bias column, mean vs sum reduction, MSE's ``2/C``, MC sampling)
are in :mod:`kronlin.torch._hooks` and the README's "PyTorch" section.
"""

from __future__ import annotations

try:
    import torch as _torch  # noqa: F401
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError('kronlin.torch needs PyTorch: pip install ".[torch]" in the kronlin source folder '
                      "(torch==2.13.0, a CPU wheel)") from exc

from .._threads import load_thread_pools  # noqa: E402
from .kfac import KFAC  # noqa: E402
from .natural_gradient import NaturalGradient  # noqa: E402

__all__ = ["KFAC", "NaturalGradient"]

# torch.set_num_threads limits torch's pool only: load the core's own pools now, so that a threadpoolctl limit
# the user sets afterwards covers them
load_thread_pools()
