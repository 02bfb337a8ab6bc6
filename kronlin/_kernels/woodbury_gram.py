"""Per-example Gram matrices of the Woodbury Fisher (Benzing 2022, app. I.3 eq. 22).

Layout (docs/design.md §1): activations ``A`` of shape ``(N, T, d_in)`` and errors
``E`` of shape ``(N, S, T, d_out)``: ``N`` inputs, ``S`` labels per input
(columns ``c = i*S + s``), ``T`` weight-sharing positions (``T = 1`` for a
dense layer).  Column ``c`` has the gradient ``g_c = Σ_t e_{c,t} a_{i,t}ᵀ`` and
the Gram entry of two columns is ``K[c1, c2] = <g_c1, g_c2>``.

Dense layers (``T = 1``)
    ``K = (A Aᵀ ⊗ 1_S 1_Sᵀ) ⊙ (E Eᵀ)`` — two GEMMs and a Hadamard product
    (:func:`gram_dense`).

Weight-sharing layers: two exact methods with different costs (multiply-adds)
    ``"pairs"``  ``K[c1, c2] = Σ_{t,t'} (A_i1 A_i2ᵀ)_{tt'} (E_c1 E_c2ᵀ)_{tt'}``:
    ``N(N+1)/2 · T² · (d_in + S²·d_out)``, no gradient memory.  Two
    implementations: the compiled kernels (``csrc/cpu/woodbury_gram_cpu.cpp``,
    ``csrc/cuda/woodbury_gram_cuda.cu``), which tile over ``(t, t')`` with a
    register-blocked micro-kernel and never store a ``T × T`` block, and
    :func:`gram_shared_reference`, the einsum/GEMM composition they are tested
    against, which forms ``A_I A_Jᵀ`` and ``E_I E_Jᵀ`` for blocks of example
    pairs (one block = the full ``(N·T) × (N·T)`` composition).

    ``"grad"``  form the per-example gradients ``g_c = E_cᵀ A_i`` and take
    ``K = g gᵀ``: ``N·S·T·d_in·d_out + (N·S)²·d_in·d_out / 2``, cheapest when
    ``d_in·d_out`` is small against ``T²(d_in + d_out)/N`` (most convolutions
    with many positions).  It is chunked over output features so at most
    :data:`BLOCK_BYTES` of gradients exist at once — it never forms the whole
    ``P_k × N`` matrix of a large layer (:func:`gram_shared_grad`).

Cost model (:func:`choose_method`, measured on one core of a Xeon with
AVX-512, OpenBLAS): ``"grad"`` costs its multiply-adds with the inner dimension
``T`` counted as at least :data:`GRAD_MIN_T` (a GEMM with a short inner
dimension is bound by writing its ``N·S·d_in·d_out`` output);
``"pairs"`` costs its multiply-adds, times :data:`REFERENCE_PENALTY` when only
the composition is available.  Within ``"pairs"`` the compiled kernel is used
where it beats the composition (:func:`use_kernel`): it runs at 50–75 GFLOP/s
in float64 and keeps memory flat, 4–15x faster than the composition for
``d_in + d_out <= 512`` and ``T`` from 16 to 1024 (which is bound by the
memory traffic of its ``(N·T)²`` intermediates), but for very wide layers
(``d_in + S²·d_out`` above :data:`KERNEL_MAX_WIDTH`) or very few positions
(``T`` below :data:`KERNEL_MIN_T`, where its 8/16-position panels are mostly
padding) BLAS's cache-blocked GEMMs win, and the composition is used.

No fused ``Gᵀu`` kernel is provided: ``Gᵀu = Σ_k rowsum((A_k U_kᵀ) ⊙ E_k)`` is
one GEMM ``(N·T, d_in) × (d_in, d_out)`` plus an elementwise product and a row
sum over an ``(N·T, d_out)`` array the size of ``E`` — a few percent of the
GEMM for a 2000 × 2000 layer at N = 64 (``bench/test_bench_woodbury.py``, family
``gtu``), so a fused kernel has nothing to save (docs/design.md §4).  It never forms the
``N × N`` product ``A Uᵀ Eᵀ`` whose diagonal it needs.
"""

from __future__ import annotations

import math

from .._backend import mT, native_float
from ._dispatch import kernel

__all__ = [
    "BLOCK_BYTES",
    "GRAD_MIN_T",
    "REFERENCE_PENALTY",
    "KERNEL_MAX_WIDTH",
    "KERNEL_MIN_T",
    "gram_dense",
    "gram_shared",
    "gram_shared_reference",
    "gram_shared_grad",
    "shared_costs",
    "choose_method",
    "use_kernel",
    "kernel_available",
]

#: Largest intermediate (bytes) the reference composition and the ``"grad"``
#: method allocate at once: one ``A_I A_Jᵀ`` block (its ``E`` twin and their
#: product are the same size), one chunk of per-example gradients.
BLOCK_BYTES = 64 * 2**20

#: ``"grad"``'s first GEMM (``E_cᵀ A_i``, inner dimension ``T``) runs at about
#: the speed of one with inner dimension ``max(T, GRAD_MIN_T)``.
GRAD_MIN_T = 64

#: The composition of ``"pairs"`` is about this much slower than its flop count
#: suggests (measured 4–15x slower than the compiled kernel for moderate widths).
REFERENCE_PENALTY = 4.0

#: The compiled ``"pairs"`` kernel is used for ``d_in + S²·d_out`` up to this
#: (beyond it its L2-bound micro-kernel loses to BLAS's cache-blocked GEMMs) ...
KERNEL_MAX_WIDTH = 1536

#: ... and for at least this many positions (fewer fill little of one 8/16-wide panel).
KERNEL_MIN_T = 8


def _itemsize(xp, dtype) -> int:
    return 8 if dtype == xp.float64 else 4


def gram_dense(xp, A, E):
    """``K`` (N·S, N·S) of a dense layer: ``A`` (N, d_in), ``E`` (N, S, d_out)."""
    N, S = E.shape[0], E.shape[1]
    AA = A @ mT(A)
    Ef = xp.reshape(E, (N * S, E.shape[-1]))
    EE = Ef @ mT(Ef)
    if S == 1:
        return AA * EE
    K = xp.reshape(AA, (N, 1, N, 1)) * xp.reshape(EE, (N, S, N, S))
    return xp.reshape(K, (N * S, N * S))


def shared_costs(N: int, S: int, T: int, da: int, de: int) -> dict:
    """Multiply-adds of the two exact methods for a weight-sharing layer."""
    M = N * S
    return {
        "pairs": N * (N + 1) // 2 * T * T * (da + S * S * de),
        "grad": M * T * da * de + M * M * da * de // 2,
    }


def kernel_available(xp) -> bool:
    """True when a compiled ``"pairs"`` kernel serves namespace ``xp``."""
    return kernel(xp, "woodbury_gram_shared") is not None


def use_kernel(xp, S: int, T: int, da: int, de: int) -> bool:
    """Whether ``"pairs"`` runs the compiled kernel (available, and where it beats the composition)."""
    return kernel_available(xp) and T >= KERNEL_MIN_T and da + S * S * de <= KERNEL_MAX_WIDTH


def choose_method(xp, N: int, S: int, T: int, da: int, de: int) -> str:
    """``"pairs"`` or ``"grad"`` for a weight-sharing layer, by the cost model above."""
    M = N * S
    pairs = shared_costs(N, S, T, da, de)["pairs"]
    if not use_kernel(xp, S, T, da, de):
        pairs *= REFERENCE_PENALTY
    grad = M * da * de * (max(T, GRAD_MIN_T) + M / 2)
    return "pairs" if pairs <= grad else "grad"


def gram_shared_reference(xp, A, E, block_bytes: int | None = None):
    """GEMM composition of the ``"pairs"`` Gram, one block of example pairs at a time.

    ``A`` (N, T, d_in), ``E`` (N, S, T, d_out).  For blocks ``I``, ``J`` of
    ``b`` examples (``J >= I``; the lower blocks are transposes) it forms
    ``A_I A_Jᵀ`` (b·T, b·T) and ``E_I E_Jᵀ`` (b·S·T, b·S·T), multiplies them
    entrywise and sums each ``T × T`` block; ``b`` is the largest that keeps
    one product below ``block_bytes`` (``b = N``, a single block, is the full
    ``(N·T) × (N·T)`` einsum/GEMM composition, where NumPy's ``X @ X.T`` uses
    the symmetric rank-k update).
    """
    N, S, T = E.shape[0], E.shape[1], E.shape[2]
    M = N * S
    if block_bytes is None:
        block_bytes = BLOCK_BYTES
    per_pair = max(S * S * T * T * _itemsize(xp, A.dtype), 1)
    b = int(max(1, min(N, math.isqrt(max(block_bytes // per_pair, 1)))))
    Af = xp.reshape(A, (N * T, A.shape[-1]))
    Ef = xp.reshape(E, (M * T, E.shape[-1]))
    starts = list(range(0, N, b))
    blocks = {}
    for bi, i0 in enumerate(starts):
        i1 = min(N, i0 + b)
        Ai, Ei = Af[i0 * T : i1 * T, :], Ef[i0 * S * T : i1 * S * T, :]
        for bj in range(bi, len(starts)):
            j0 = starts[bj]
            j1 = min(N, j0 + b)
            if bj == bi:
                Aj, Ej = Ai, Ei
            else:
                Aj, Ej = Af[j0 * T : j1 * T, :], Ef[j0 * S * T : j1 * S * T, :]
            ni, nj = i1 - i0, j1 - j0
            AA = xp.reshape(Ai @ mT(Aj), (ni, 1, T, nj, 1, T))
            EE = xp.reshape(Ei @ mT(Ej), (ni, S, T, nj, S, T))
            blk = xp.reshape(xp.sum(AA * EE, axis=(2, 5)), (ni * S, nj * S))
            if bj == bi:
                # exactly symmetric, like the kernels: a GEMM X Xᵀ is symmetric only to rounding on
                # cuBLAS (NumPy's syrk is exact), so the diagonal blocks take their upper triangle
                blk = xp.triu(blk) + mT(xp.triu(blk, k=1))
            blocks[bi, bj] = blk
    if len(starts) == 1:
        return blocks[0, 0]
    rows = []
    for bi in range(len(starts)):
        parts = [mT(blocks[bj, bi]) for bj in range(bi)] + [blocks[bi, bj] for bj in range(bi, len(starts))]
        rows.append(xp.concat(parts, axis=1))
    return xp.concat(rows, axis=0)


def gram_shared_grad(xp, A, E, block_bytes: int | None = None):
    """The Gram through explicit per-example gradients, chunked over output features.

    ``g[c, o, :] = Σ_t E[c, t, o] A[i, t, :]``; ``K = Σ_chunks g_chunk g_chunkᵀ``
    with chunks of output features small enough that ``g_chunk`` (N·S, chunk,
    d_in) stays below ``block_bytes``.
    """
    N, S, T, de = E.shape[0], E.shape[1], E.shape[2], E.shape[3]
    da = A.shape[-1]
    M = N * S
    if block_bytes is None:
        block_bytes = BLOCK_BYTES
    per_feature = max(M * da * _itemsize(xp, A.dtype), 1)
    chunk = int(max(1, min(de, block_bytes // per_feature)))
    A5 = xp.reshape(A, (N, 1, T, da))
    K = None
    for o0 in range(0, de, chunk):
        o1 = min(de, o0 + chunk)
        g = mT(E[..., o0:o1]) @ A5  # (N, S, chunk, da)
        g = xp.reshape(g, (M, (o1 - o0) * da))
        part = g @ mT(g)
        K = part if K is None else K + part
    if K is None:  # d_out == 0
        K = xp.zeros((M, M), dtype=A.dtype)
    return K


def gram_shared(xp, A, E, method: str = "auto"):
    """``K`` (N·S, N·S) of a weight-sharing layer, unscaled.

    ``method``: ``"auto"`` (:func:`choose_method`), ``"pairs"`` (the compiled
    kernel where :func:`use_kernel` says it wins, else the composition),
    ``"kernel"`` (the compiled kernel whenever one is available),
    ``"reference"`` (:func:`gram_shared_reference`) or ``"grad"``
    (:func:`gram_shared_grad`).
    """
    N, S, T, de = E.shape[0], E.shape[1], E.shape[2], E.shape[3]
    da = A.shape[-1]
    if method == "auto":
        method = choose_method(xp, N, S, T, da, de)
    if method == "grad":
        return gram_shared_grad(xp, A, E)
    if method == "reference" or (method == "pairs" and not use_kernel(xp, S, T, da, de)):
        return gram_shared_reference(xp, A, E)
    if method not in ("pairs", "kernel"):
        raise ValueError(f"method must be 'auto', 'pairs', 'kernel', 'grad' or 'reference'; got {method!r}")
    M = N * S
    run = kernel(xp, "woodbury_gram_shared")
    if M > 0 and run is not None and native_float(A) and native_float(E):
        Ac = xp.ascontiguousarray(A)
        Ec = xp.ascontiguousarray(xp.reshape(E, (M, T, de)))
        if run.device == "cpu":
            return run(Ac, Ec, 1.0)
        K = xp.empty((M, M), dtype=A.dtype)
        run(Ac, Ec, K, 1.0)
        return K
    return gram_shared_reference(xp, A, E)
