"""kronlin: numerical linear algebra for Kronecker-factored curvature.

Conventions (docs/design.md §1): ``vec`` stacks columns; ``Kron(A, G)`` is ``A ⊗ G``
with the input factor ``A`` (p, p) and the output factor ``G`` (q, q), acting
on ``(..., q, p)`` weight-shaped arrays by ``G @ X @ A.T``.  Results come back
in the namespace and dtype of the inputs.
"""

from __future__ import annotations

from . import _ext
from ._linalg import PSD_CLIP_FACTOR
from ._validate import SYM_RTOL_FACTOR
from .damping import DampedKron, factored_damping, pi_factor
from .kron import DENSE_LIMIT, Kron
from .kron_eigh import KronEigh
from .stein import KronSumInverse, solve_kron_sum
from .factors import FactorEstimator, batch_factors
from ._jax import jax_callback
from .tridiag import BlockDiagInverse, BlockTridiagInverse
from .woodbury import WoodburyFisher

__version__ = "0.1.0"

__all__ = [
    "Kron",
    "KronEigh",
    "pi_factor",
    "factored_damping",
    "DampedKron",
    "solve_kron_sum",
    "KronSumInverse",
    "BlockDiagInverse",
    "BlockTridiagInverse",
    "WoodburyFisher",
    "FactorEstimator",
    "batch_factors",
    "jax_callback",
    "DENSE_LIMIT",
    "PSD_CLIP_FACTOR",
    "SYM_RTOL_FACTOR",
    "extension_info",
]


def extension_info() -> dict:
    """Which compiled kernels were built and are in use."""
    return _ext.info()
