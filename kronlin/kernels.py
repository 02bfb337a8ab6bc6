"""The compiled kernels, their array-API references, and which of the two runs (docs/design.md §4).

kronlin's operators choose between a compiled kernel (``kronlin._C`` on the
CPU, ``kronlin._cuda`` for CuPy arrays) and its NumPy/array-API reference by
themselves.  This module is for callers that want to see or steer that
choice — benchmarks that time a kernel against the composition it replaces,
tests that compare the two, users checking what their build runs:

* the kernel families, each as its dispatching entry point and its reference:
  :func:`eig_scale` / :func:`eig_scale_reference` (the eigenbasis divide of
  ``KronEigh`` and ``KronSumInverse(method="eig")``),
  :func:`gram_shared` / :func:`gram_shared_reference` / :func:`gram_shared_grad`
  (the weight-sharing Gram of ``WoodburyFisher``), :func:`gsylv_backsub` /
  :func:`gsylv_backsub_reference` (the back-substitution of
  ``KronSumInverse(method="schur")``), :func:`asymmetry` /
  :func:`asymmetry_reference`, :func:`stack_asymmetry` /
  :func:`stack_asymmetry_reference` (matrices stacked and measured in one pass)
  and :func:`mirror_lower` / :func:`mirror_lower_reference` (the symmetry check
  of every symmetric input and the mirror after LAPACK ``potri``); every one
  takes the array namespace ``xp`` first; and :func:`potrf_stack` / :func:`potrf_stack_reference`,
  :func:`potri_stack` / :func:`potri_stack_reference` (the Cholesky factors and
  SPD inverses of NumPy stacks, SciPy's LAPACK called from one C++ loop, the
  inverses' triangular inverse by halves in ``?gemm`` calls; these take the
  stack only), :func:`block_apply` / :func:`block_apply_reference`
  (``BlockDiagInverse.apply``'s products ``G⁻¹ V A⁻ᵀ`` of a group of equal-shaped
  layers and the finiteness test of their results, SciPy's ``?gemm`` from one
  C++ loop; NumPy arrays only, no namespace argument), and :func:`norm1` /
  :func:`norm1_reference` (the 1-norm the condition test of a doubtful Cholesky
  pivot ratio takes; one NumPy matrix, no namespace argument);
* :func:`kernel` (a compiled function bound to its backend, or ``None``) and
  :func:`compiled` (the compiled module serving a namespace, or ``None``);
* :func:`disabled`, a context manager that forces the references, and
  :func:`enabled`; the environment variable ``KRONLIN_DISABLE_EXT=1`` does the
  same for a whole process (:data:`DISABLED_BY_ENV`);
* :func:`load_info` (which compiled files were loaded, or why not) and
  :func:`openmp_max_threads`.  :func:`kronlin.extension_info` summarises what
  was built and is in use.

Examples
--------
>>> import numpy as np
>>> from kronlin import kernels
>>> Y, lg, la = np.ones((1, 2, 3)), np.array([[1.0, 2.0]]), np.array([[1.0, 1.0, 4.0]])
>>> with kernels.disabled():
...     assert kernels.compiled(np) is None
...     ref = kernels.eig_scale_reference(np, Y, lg, la, 0.0, -1.0)
>>> np.allclose(kernels.eig_scale(np, Y.copy(), lg, la, 0.0, -1.0), ref)
True
"""

from __future__ import annotations

from . import _ext
from ._ext import disabled, enabled
from ._kernels._dispatch import Kernel, kernel, module_for
from ._kernels.block_apply import block_apply, block_apply_reference
from ._kernels.cholesky import potrf_stack, potrf_stack_reference, potri_stack, potri_stack_reference
from ._kernels.eig_scale import eig_scale, eig_scale_reference
from ._kernels.gsylv import gsylv_backsub, gsylv_backsub_reference
from ._kernels.norms import norm1, norm1_reference
from ._kernels.symmetric import (asymmetry, asymmetry_reference, mirror_lower, mirror_lower_reference, stack_asymmetry,
                                 stack_asymmetry_reference)
from ._kernels.woodbury_gram import gram_shared, gram_shared_grad, gram_shared_reference

__all__ = [
    "DISABLED_BY_ENV",
    "Kernel",
    "asymmetry",
    "asymmetry_reference",
    "block_apply",
    "block_apply_reference",
    "compiled",
    "disabled",
    "eig_scale",
    "eig_scale_reference",
    "enabled",
    "gram_shared",
    "gram_shared_grad",
    "gram_shared_reference",
    "gsylv_backsub",
    "gsylv_backsub_reference",
    "kernel",
    "load_info",
    "mirror_lower",
    "mirror_lower_reference",
    "norm1",
    "norm1_reference",
    "openmp_max_threads",
    "potrf_stack",
    "potrf_stack_reference",
    "potri_stack",
    "potri_stack_reference",
    "stack_asymmetry",
    "stack_asymmetry_reference",
]

#: True when ``KRONLIN_DISABLE_EXT`` was set (not ``0``/``false``/``no``) when kronlin was imported.
DISABLED_BY_ENV: bool = _ext.ext_disabled_by_env


def compiled(xp):
    """The compiled module serving namespace ``xp``, or ``None`` (absent, disabled, or no such module).

    ``kronlin._C`` for NumPy, ``kronlin._cuda`` for CuPy (when a device is
    visible); ``None`` for every other namespace, which always runs the
    references.
    """
    return module_for(xp)[0]


def load_info() -> dict:
    """Which compiled files were loaded at import, or why not.

    Returns
    -------
    dict
        ``cpu_file`` / ``cuda_file``: the path of ``kronlin._C`` /
        ``kronlin._cuda`` (``None`` when it did not import, whether or not
        the kernels are disabled now); ``cpu_import_error`` /
        ``cuda_import_error``: the import error as text, or ``None``;
        ``disabled_by_env``: :data:`DISABLED_BY_ENV`.
    """
    out = {}
    for name, mod, err in (("cpu", _ext._cpu_module, _ext.cpu_import_error),
                           ("cuda", _ext._cuda_module, _ext.cuda_import_error)):
        out[f"{name}_file"] = getattr(mod, "__file__", None)
        out[f"{name}_import_error"] = None if err is None else f"{type(err).__name__}: {err}"
    out["disabled_by_env"] = DISABLED_BY_ENV
    return out


def openmp_max_threads():
    """``omp_get_max_threads()`` of ``kronlin._C``'s OpenMP runtime now, or ``None`` without the CPU module.

    Asked of the loaded module even while :func:`disabled` is in effect, so a
    benchmark can check that its thread limit reached kronlin's kernels.
    """
    fn = getattr(_ext._cpu_module, "openmp_max_threads", None)
    return int(fn()) if fn is not None else None
