"""Stubs of kronlin._C, the private CPU extension (C++17, OpenMP)."""

import numpy as np
import numpy.typing as npt

has_openmp: bool

def eig_scale(
    Y: npt.NDArray[np.floating], lg: npt.NDArray[np.floating], la: npt.NDArray[np.floating], shift: float, power: float
) -> None:
    """In place: ``Y[b, i, j] *= (lg[b, i] * la[b, j] + shift) ** power``.

    ``Y`` (B, q, p), ``lg`` (B, q), ``la`` (B, p): C-contiguous, one dtype (float32 or float64).
    """

def asymmetry(x: npt.NDArray[np.floating]) -> tuple[float, float]:
    """``(max|x − xᵀ|, max|x|)`` over a C-contiguous (B, n, n) stack (float32 or float64);
    ``(nan, nan)`` when an entry is NaN or infinite."""

def stack_asymmetry(xs: list[npt.NDArray[np.floating]], out: npt.NDArray[np.floating]) -> tuple[float, float] | None:
    """``out[b] = xs[b]`` (B (n, n) matrices into the C-contiguous (B, n, n) stack ``out``, float32 or float64)
    and :func:`asymmetry` of ``out``, each matrix measured while it is in cache; None, copying nothing, when
    some ``xs[b]`` is not a ``numpy.ndarray`` (no subclass), aligned, C-contiguous, of ``out``'s dtype."""

def mirror_lower(x: npt.NDArray[np.floating]) -> None:
    """In place: the lower triangle of each matrix of a C-contiguous (B, n, n) stack (float32 or
    float64) copied onto the upper one."""

def potrf_stack(S: npt.NDArray[np.floating], out: npt.NDArray[np.floating], potrf: int) -> npt.NDArray[np.int32]:
    """``out[b]`` = the lower Cholesky factor (C order, zeros above) of ``S[b]``'s lower triangle, by the
    ``?potrf`` at address ``potrf`` (``scipy.linalg.cython_lapack``); C-contiguous (B, n, n) stacks of one
    dtype (float32 or float64); returns LAPACK's info per matrix."""

def potri_stack(L: npt.NDArray[np.floating], potri: int, recursive: list[int]) -> npt.NDArray[np.int32]:
    """In place: the lower Cholesky factors ``L[b]`` become ``(L Lᵀ)⁻¹``, exactly symmetric, by the ``?potri``
    at address ``potri``, or, above order :data:`recursive_leaf` when ``recursive`` holds the addresses of
    ``?gemm``, ``?trtri`` and ``?lauum``, by the triangular inverse by halves and ``?lauum``;
    returns LAPACK's info per matrix."""

recursive_leaf: int

def block_apply(
    G: npt.NDArray[np.floating],
    V: list[npt.NDArray[np.floating]],
    At: npt.NDArray[np.floating],
    Y: npt.NDArray[np.floating],
    gemm: int,
) -> int:
    """``Y[b] = G[b] @ V[b] @ At[b]`` for C-contiguous stacks ``G`` (B, q, q), ``At`` (B, p, p), ``Y`` (B, q, p)
    and a list ``V`` of B C-contiguous (q, p) matrices, one dtype (float32 or float64), by the ``?gemm`` at
    address ``gemm`` (``scipy.linalg.cython_blas``); returns the first ``b`` whose ``Y[b]`` holds a NaN or an
    infinity, or -1; or -2, computing nothing, when some ``V[b]`` is not a ``numpy.ndarray`` (no subclass),
    aligned, C-contiguous, ``(q, p)``, of the stacks' dtype."""

def gsylv_backsub(
    S1: npt.NDArray[np.floating],
    T1: npt.NDArray[np.floating],
    S2: npt.NDArray[np.floating],
    T2: npt.NDArray[np.floating],
    W: npt.NDArray[np.floating],
    sign: int,
) -> float:
    """In place: ``W`` (B, q, p) becomes ``Y`` with ``S1 Y S2ᵀ + sign·T1 Y T2ᵀ = W``.

    ``S1`` (q, q) and ``S2`` (p, p) quasi-upper-triangular, ``T1`` (q, q) and ``T2`` (p, p)
    upper triangular (real generalized Schur form); C-contiguous, one dtype (float32 or
    float64); ``sign`` is +1 or -1.  Returns the smallest relative pivot
    ``min|pivot| / (max|S1|·max|S2| + max|T1|·max|T2|)`` (``inf`` when there is nothing to solve).
    """

def woodbury_gram_shared(
    A: npt.NDArray[np.floating], E: npt.NDArray[np.floating], scale: float, prepack_bytes: int = -1
) -> npt.NDArray[np.floating]:
    """Per-example Gram of a weight-sharing layer, ``K`` (N*S, N*S), exactly symmetric.

    ``K[c1, c2] = scale * Σ_{t,t'} (A[c1//S, t]·A[c2//S, t']) (E[c1, t]·E[c2, t'])`` for
    C-contiguous ``A`` (N, T, da) and ``E`` (N*S, T, de) of one dtype (float32 or float64).
    ``prepack_bytes``: largest shared packed copy of the inputs (negative: 256 MiB); beyond it
    each thread repacks per pair.
    """

def woodbury_gram_isa() -> str:
    """SIMD instruction set ``woodbury_gram_shared`` dispatches to: "avx512", "avx2" or "baseline"."""

def openmp_max_threads() -> int: ...
