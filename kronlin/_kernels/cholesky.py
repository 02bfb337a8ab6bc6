"""Stacks of Cholesky factors and SPD inverses by LAPACK ``?potrf`` / ``?potri``, one matrix after another.

* :func:`potrf_stack` writes the lower Cholesky factor of every matrix of a
  C-contiguous ``(B, n, n)`` float stack (its lower triangle read) into a new
  C-ordered stack, the upper triangles zero, and returns LAPACK's ``info`` per
  matrix;
* :func:`potri_stack` turns such factors, in place, into the exactly symmetric
  inverses ``(L Lᵀ)⁻¹`` and returns ``info`` per matrix.

The references are Python loops over SciPy's LAPACK wrappers (each matrix's
transpose is Fortran-ordered, so LAPACK works on the stack's own memory: ``?potri``
with ``uplo='U'``, ``?potrf`` with ``'U'`` or, at :data:`POTRF_LOWER_ORDERS`, with
``'L'`` on the lower triangle transposed into the upper one), then one mirror of the
stack.  The compiled kernels
(``csrc/cpu/cholesky_cpu.cpp``) make the same LAPACK calls, SciPy's own
routines reached through ``scipy.linalg.cython_lapack``, on the same layout,
from one C++ loop, copying and mirroring each matrix while it is in cache:
bit-identical results.  At 200 × 64² the loop's wrapper calls, bulk copy and
mirror cost 10-30% of the LAPACK time (bench/results/block_stacks.md).
"""

from __future__ import annotations

import numpy as np

from .._backend import native_float
from ._dispatch import kernel
from ._scipy_capi import routine_address
from .symmetric import mirror_lower

__all__ = ["compiled_stacks", "potrf_stack", "potrf_stack_reference", "potri_stack", "potri_stack_reference", "in_place"]


def lapack_address(name: str) -> int | None:
    """The address of SciPy's C-callable LAPACK routine ``name`` (``"spotrf"``, ...), or None when
    ``scipy.linalg.cython_lapack`` does not export it with the ``(char*, int*, T*, int*, int*)`` signature
    the kernels call."""
    return routine_address("cython_lapack", name,
                           lambda sig: sig.startswith("void (char *, int *, ") and sig.endswith(" *, int *, int *)"))


def _compiled(name: str, M):
    """The compiled kernel ``name`` with the LAPACK routine's address for ``M``'s dtype, or None."""
    if not (isinstance(M, np.ndarray) and M.ndim >= 3 and native_float(M) and M.flags.c_contiguous and M.size):
        return None
    run = kernel(np, name)
    address = lapack_address(("s" if M.dtype == np.float32 else "d") + name.split("_")[0])
    return None if run is None or address is None else (run, address)


def compiled_stacks(M) -> bool:
    """Whether :func:`potrf_stack` and :func:`potri_stack` run compiled for the stack ``M``."""
    return _compiled("potrf_stack", M) is not None and _compiled("potri_stack", M) is not None


def in_place(R, x) -> None:
    """Make sure the LAPACK result ``R`` (Fortran-ordered, asked to overwrite ``x.T``) is in ``x``."""
    if not np.shares_memory(R, x):  # the wrapper copied after all (it does not for aligned Fortran arrays)
        x[...] = R.T


#: Orders for which the stacked Cholesky factorization calls ``?potrf`` on the Fortran view's lower triangle
#: (``uplo='L'``, the matrices' lower triangles transposed into the C upper ones, the factor transposed back):
#: SciPy's OpenBLAS runs it in 0.66-0.83x the time of ``'U'`` there (``bench/results/potrf_uplo.md``).  The
#: compiled kernel's constants ``kLowerMinN``, ``kLowerMaxN`` (``csrc/cpu/cholesky_cpu.cpp``) are the same.
POTRF_LOWER_ORDERS = range(48, 257)


def potrf_stack_reference(S, overwrite: bool = False):
    """``(L, info)``: the loop of SciPy ``?potrf`` calls the compiled kernel replaces, on the same data with
    the same ``uplo`` (:data:`POTRF_LOWER_ORDERS`): bit-identical results.  A matrix with ``info != 0`` ends the
    loop (it and the matrices after it are undefined)."""
    from scipy.linalg import lapack

    potrf = lapack.get_lapack_funcs("potrf", dtype=S.dtype)
    L = S if overwrite and S.flags.c_contiguous else np.array(S, order="C", copy=True)
    info = np.zeros(L.shape[0], dtype=np.int32)
    lower = L.shape[-1] in POTRF_LOWER_ORDERS
    for b, l_ in enumerate(L):
        if lower:
            l_[...] = np.tril(l_) + np.tril(l_, -1).T  # the lower triangle transposed into the upper one
            F, info[b] = potrf(l_.T, lower=1, clean=0, overwrite_a=1)
        else:
            F, info[b] = potrf(l_.T, lower=0, clean=1, overwrite_a=1)
        if info[b] != 0:
            break
        in_place(F, l_)
        if lower:
            l_[...] = np.tril(l_.T)  # L lies transposed in the C upper triangle
    return L, info


def potrf_stack(S, overwrite: bool = False):
    """``(L, info)``: the lower Cholesky factors (C order, upper triangles zero) of a ``(B, n, n)`` NumPy float
    stack, and LAPACK's info per matrix (nonzero: that matrix is not positive definite, and ``L`` is
    undefined there).  ``overwrite``: in ``S``'s own memory where it is C-contiguous (no fresh stack, whose
    first-touch page faults cost about as much as the copy on these machines); ``S`` is then consumed,
    whatever the info."""
    compiled = _compiled("potrf_stack", S)
    if compiled is None:
        return potrf_stack_reference(S, overwrite)
    run, address = compiled
    L = S if overwrite else np.empty_like(S, order="C")
    return L, run(S, L, address)


def potri_stack_reference(L):
    """The loop of SciPy ``?potri`` calls the compiled kernel replaces, then one mirror; returns ``info``."""
    from scipy.linalg import lapack

    potri = lapack.get_lapack_funcs("potri", dtype=L.dtype)
    info = np.zeros(L.shape[0], dtype=np.int32)
    for b, t_ in enumerate(L):
        C, info[b] = potri(t_.T, lower=0, overwrite_c=1)
        if info[b] != 0:
            return info
        in_place(C, t_)  # C-ordered: the inverse's lower triangle, above it the factor's zeros
    mirror_lower(np, L)
    return info


def potri_stack(L):
    """In place on a ``(B, n, n)`` NumPy float stack of lower Cholesky factors: ``L[b]`` becomes ``(L Lᵀ)⁻¹``,
    exactly symmetric; returns LAPACK's info per matrix (nonzero: that inverse is undefined)."""
    compiled = _compiled("potri_stack", L)
    if compiled is None:
        return potri_stack_reference(L)
    run, address = compiled
    return run(L, address)
