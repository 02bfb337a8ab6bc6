#pragma once
#include <cstdint>

#include "cpu/block_apply_cpu.h"  // blas_gemm_fn

namespace kronlin {

// LAPACK ?potrf / ?potri as C functions (uplo, n, a, lda, info): SciPy's scipy.linalg.cython_lapack
// exports them (the package passes their addresses), so the extension links no LAPACK of its own and
// calls the very routines of the Python-loop reference.
template <typename T>
using lapack_chol_fn = void (*)(char* uplo, int* n, T* a, int* lda, int* info);

// LAPACK ?trtri (uplo, diag, n, a, lda, info), SciPy's as the others.
template <typename T>
using lapack_trtri_fn = void (*)(char* uplo, char* diag, int* n, T* a, int* lda, int* info);

// The routines of the SPD inverse by halves (potri_stack_cpu above order kRecursiveLeaf): the triangular inverse
// by halves, whose products are ?gemm calls (the leaves ?trtri), then ?lauum.
template <typename T>
struct RecursiveInverse {
  blas_gemm_fn<T> gemm;
  lapack_trtri_fn<T> trtri;
  lapack_chol_fn<T> lauum;
};

// The order up to which trtri_lower_cpu is ?trtri itself (and potri_stack_cpu ?potri), and of the triangular
// blocks its products take whole, as ?gemm operands with their strict upper triangle zero
// (kronlin/_kernels/cholesky.py: RECURSIVE_LEAF).  Measured on one thread against OpenBLAS's ?trtri: these
// ?gemm leaves take the triangular inverse 0.17-0.29x its time at 64²-256² and 0.70-0.73x at 2048², where
// ?trmm leaves of the same order took 0.27-0.41x and 0.80-0.86x; leaves of 32 or 48 were no faster.
constexpr std::int64_t kRecursiveLeaf = 16;

// In place on the C-contiguous lower triangular n x n matrix L (row stride ld): L becomes L⁻¹.  By halves:
// L11⁻¹ and L22⁻¹, then L21 <- -L22⁻¹ (L21 L11⁻¹), each product by halves again down to kRecursiveLeaf blocks,
// so that all the products are ?gemm calls (OpenBLAS's ?trtri runs at a third of ?gemm's speed at 512²-1024²).
// The entries less than kRecursiveLeaf above the diagonal are set to zero first (the leaf blocks' strict upper
// triangles, which ?gemm reads); the rest of the strict upper triangle is neither read nor written.  work holds
// at least (n - n1) * n1 elements, n1 = first_half(n) (cholesky_cpu.cpp).  Returns ?trtri's info (0, or the
// 1-based index of a zero diagonal entry).
template <typename T>
int trtri_lower_cpu(T* L, std::int64_t n, std::int64_t ld, T* work, const RecursiveInverse<T>& r);

// For each matrix b of a C-contiguous (B, n, n) stack S: out[b] = the lower Cholesky factor L (C order, the
// upper triangle zero) of S[b]'s lower triangle, by ?potrf on the Fortran view: at orders 48-256 uplo 'L' on
// the lower triangle transposed into the C upper one (then L transposed back), else uplo 'U' (the C lower
// triangle).  info[b] is LAPACK's info (0, or the order of the leading minor that is not positive definite;
// out[b] is undefined then).  out is S (in place) or does not overlap it.
template <typename T>
void potrf_stack_cpu(const T* S, T* out, std::int64_t B, std::int64_t n, lapack_chol_fn<T> potrf, std::int32_t* info);

// In place on a C-contiguous (B, n, n) stack of lower Cholesky factors: L[b] becomes (L Lᵀ)⁻¹, exactly
// symmetric, by ?potri (uplo 'U' on the Fortran view), or above order kRecursiveLeaf (when rec is given) by
// trtri_lower_cpu and ?lauum (what ?potri does, with the triangular inverse by halves), and the mirror of its
// triangle while the matrix is in cache.  info[b] as LAPACK's (a matrix with info != 0 is left as LAPACK
// left it, unmirrored).
template <typename T>
void potri_stack_cpu(T* L, std::int64_t B, std::int64_t n, lapack_chol_fn<T> potri, const RecursiveInverse<T>* rec,
                     std::int32_t* info);

}  // namespace kronlin
