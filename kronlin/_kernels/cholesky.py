"""Stacks of Cholesky factors and SPD inverses by LAPACK ``?potrf`` / ``?potri``, one matrix after another.

* :func:`potrf_stack` writes the lower Cholesky factor of every matrix of a
  C-contiguous ``(B, n, n)`` float stack (its lower triangle read) into a new
  C-ordered stack, the upper triangles zero, and returns LAPACK's ``info`` per
  matrix;
* :func:`potri_stack` turns such factors, in place, into the exactly symmetric
  inverses ``(L Lᵀ)⁻¹`` and returns ``info`` per matrix: what ``?potri`` computes
  (``?trtri`` then ``?lauum``), with the triangular inverse by halves in ``?gemm``
  calls above order :data:`RECURSIVE_LEAF` (:func:`trtri_lower_reference`).

The references are Python loops over SciPy's BLAS and LAPACK wrappers (each matrix's
transpose is Fortran-ordered, so LAPACK works on the stack's own memory: ``?potri``,
``?trtri`` and ``?lauum`` with ``uplo='U'``, ``?potrf`` with ``'U'`` or, at
:data:`POTRF_LOWER_ORDERS`, with ``'L'`` on the lower triangle transposed into the
upper one), then one mirror of the stack.  The compiled kernels
(``csrc/cpu/cholesky_cpu.cpp``) make the same calls, SciPy's own routines reached
through ``scipy.linalg.cython_lapack`` / ``cython_blas``, on the same layout, from one
C++ loop, copying and mirroring each matrix while it is in cache: bit-identical
results.  At 200 × 64² the loop's wrapper calls, bulk copy and
mirror cost 10-30% of the LAPACK time (bench/results/block_stacks.md).
"""

from __future__ import annotations

import numpy as np

from .._backend import native_float
from ._dispatch import kernel
from ._scipy_capi import routine_address
from .block_apply import gemm_address
from .symmetric import mirror_lower

__all__ = ["compiled_stacks", "potrf_stack", "potrf_stack_reference", "potri_stack", "potri_stack_reference", "in_place",
           "trtri_lower_reference"]


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


#: Order up to which the SPD inverse's triangular inverse is LAPACK's ``?trtri`` itself (and the whole inverse
#: ``?potri``), and of the triangular blocks its products take whole, as ``?gemm`` operands; above it,
#: :func:`trtri_lower_reference` splits it by halves.  The compiled kernel's ``kRecursiveLeaf``
#: (``csrc/cpu/cholesky_cpu.h``) is the same.
RECURSIVE_LEAF = 16


def first_half(k: int) -> int:
    """The split of an order ``k >= 2`` into halves: the first a multiple of 16 where ``k`` allows."""
    h = k // 2
    return h - h % 16 if h >= 16 else h


def _gemm_rm(blas, alpha, A, B, beta, C) -> None:
    """Row-major ``C = alpha A B + beta C`` on views: the column-major ``Cᵀ = Bᵀ Aᵀ`` call the kernel makes."""
    R = blas["gemm"](alpha, B.T, A.T, beta=beta, c=C.T, overwrite_c=1)
    in_place(R, C)


def _trmm_right(blas, A, X, O) -> None:
    """Row-major ``O = A X``, ``X`` lower triangular (zero above the diagonal within :data:`RECURSIVE_LEAF`), by
    halves of ``X``; the leaves take ``X`` whole."""
    k = X.shape[0]
    if k <= RECURSIVE_LEAF:
        _gemm_rm(blas, 1.0, A, X, 0.0, O)
        return
    k1 = first_half(k)
    _trmm_right(blas, A[:, :k1], X[:k1, :k1], O[:, :k1])
    _gemm_rm(blas, 1.0, A[:, k1:], X[k1:, :k1], 1.0, O[:, :k1])
    _trmm_right(blas, A[:, k1:], X[k1:, k1:], O[:, k1:])


def _trmm_left(blas, alpha, X, B, O) -> None:
    """Row-major ``O = alpha X B``, ``X`` lower triangular as for :func:`_trmm_right`, by halves."""
    m = X.shape[0]
    if m <= RECURSIVE_LEAF:
        _gemm_rm(blas, alpha, X, B, 0.0, O)
        return
    m1 = first_half(m)
    _trmm_left(blas, alpha, X[:m1, :m1], B[:m1], O[:m1])
    _trmm_left(blas, alpha, X[m1:, m1:], B[m1:], O[m1:])
    _gemm_rm(blas, alpha, X[m1:, :m1], B[:m1], 1.0, O[m1:])


def _trtri_halves(L, blas) -> int:
    """:func:`trtri_lower_reference`'s recursion, on a matrix whose leaf blocks are already zero above the
    diagonal (``trtri_halves`` in ``csrc/cpu/cholesky_cpu.cpp``)."""
    n = L.shape[0]
    if n <= RECURSIVE_LEAF:
        R, info = blas["trtri"](L.T, lower=0, overwrite_c=1)  # the Fortran view's upper Lᵀ: its inverse (L⁻¹)ᵀ
        in_place(R, L)
        return int(info)
    n1 = first_half(n)
    info = _trtri_halves(L[:n1, :n1], blas)
    if info:
        return info
    info = _trtri_halves(L[n1:, n1:], blas)
    if info:
        return info + n1
    W = np.empty((n - n1, n1), dtype=L.dtype)
    _trmm_right(blas, L[n1:, :n1], L[:n1, :n1], W)
    _trmm_left(blas, -1.0, L[n1:, n1:], W, L[n1:, :n1])
    return 0


def trtri_lower_reference(L, blas=None) -> int:
    """In place on one C-ordered lower triangular NumPy matrix (a view will do): ``L`` becomes ``L⁻¹``; returns
    ``?trtri``'s info (0, or the 1-based index of a zero diagonal entry).

    By halves: ``L₁₁⁻¹`` and ``L₂₂⁻¹``, then ``L₂₁ ← −L₂₂⁻¹ (L₂₁ L₁₁⁻¹)``, each triangular product by halves
    again down to blocks of :data:`RECURSIVE_LEAF`, so that all the products are ``?gemm`` calls (the leaves'
    inverses ``?trtri``).  The entries less than :data:`RECURSIVE_LEAF` above the diagonal are set to zero first
    (the leaf blocks' strict upper triangles, which ``?gemm`` reads); the rest of the strict upper triangle is
    neither read nor written.  The same calls as the compiled kernel (SciPy's BLAS and LAPACK).  OpenBLAS's
    ``?trtri`` runs at a third of ``?gemm``'s speed at 512²-1024² (``bench/results/potri_recursive.md``)."""
    blas = blas or _routines(L.dtype)
    n = L.shape[0]
    for i in range(n - 1):
        L[i, i + 1 : min(n, i + RECURSIVE_LEAF)] = 0
    return _trtri_halves(L, blas)


def _routines(dtype) -> dict:
    """SciPy's wrappers of the routines :func:`trtri_lower_reference` and :func:`potri_stack_reference` call."""
    from scipy.linalg import blas, lapack

    return {"gemm": blas.get_blas_funcs("gemm", dtype=dtype), "trtri": lapack.get_lapack_funcs("trtri", dtype=dtype),
            "lauum": lapack.get_lapack_funcs("lauum", dtype=dtype), "potri": lapack.get_lapack_funcs("potri", dtype=dtype)}


def potri_stack_reference(L, by_halves: bool = True):
    """The loop of SciPy calls the compiled kernel replaces, then one mirror; returns ``info``: ``?potri`` per
    matrix up to order :data:`RECURSIVE_LEAF` (or everywhere, ``by_halves=False``), above it what ``?potri``
    does, ``?trtri`` then ``?lauum``, with the triangular inverse by halves (:func:`trtri_lower_reference`)."""
    n = L.shape[-1]
    recursive = by_halves and n > RECURSIVE_LEAF
    routines = _routines(L.dtype)
    routine = routines["lauum" if recursive else "potri"]
    info = np.zeros(L.shape[0], dtype=np.int32)
    for b, t_ in enumerate(L):
        if recursive:
            info[b] = trtri_lower_reference(t_, routines)
            if info[b] != 0:
                return info
        C, info[b] = routine(t_.T, lower=0, overwrite_c=1)
        if info[b] != 0:
            return info
        in_place(C, t_)  # C-ordered: the inverse's lower triangle, above it the factor's zeros
    mirror_lower(np, L)
    return info


def _recursive_addresses(dtype) -> list | None:
    """The addresses of SciPy's ``?gemm`` (:func:`~kronlin._kernels.block_apply.gemm_address`), ``?trtri`` and
    ``?lauum`` for ``dtype``, or None."""
    p = "s" if dtype == np.float32 else "d"
    trtri = routine_address("cython_lapack", p + "trtri",
                            lambda sig: sig.startswith("void (char *, char *, int *, ") and sig.endswith(" *, int *, int *)"))
    addresses = [gemm_address(dtype), trtri, lapack_address(p + "lauum")]
    return None if None in addresses else addresses


def potri_stack(L, by_halves: bool = True):
    """In place on a ``(B, n, n)`` NumPy float stack of lower Cholesky factors: ``L[b]`` becomes ``(L Lᵀ)⁻¹``,
    exactly symmetric; returns LAPACK's info per matrix (nonzero: that inverse is undefined).

    Compiled, above order :data:`RECURSIVE_LEAF`, the triangular inverse goes by halves
    (:func:`trtri_lower_reference`'s calls from C++): 0.35-0.92x ``?potri``'s time from 32² to 2048², one
    thread (``bench/results/potri_recursive.md``); ``by_halves=False`` calls ``?potri`` itself (for
    comparisons).  Without the extension, the loop of ``?potri`` calls: the by-halves reference in Python is
    1.0-2.4x slower than that loop (SciPy's wrappers copy every sub-block view they are given)."""
    compiled = _compiled("potri_stack", L)
    recursive = _recursive_addresses(L.dtype) if compiled is not None and by_halves else []
    if compiled is None or recursive is None:
        return potri_stack_reference(L, by_halves=False)
    run, address = compiled
    return run(L, address, recursive)
