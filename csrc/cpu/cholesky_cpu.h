#pragma once
#include <cstdint>

namespace kronlin {

// LAPACK ?potrf / ?potri as C functions (uplo, n, a, lda, info): SciPy's scipy.linalg.cython_lapack
// exports them (the package passes their addresses), so the extension links no LAPACK of its own and
// calls the very routines of the Python-loop reference.
template <typename T>
using lapack_chol_fn = void (*)(char* uplo, int* n, T* a, int* lda, int* info);

// For each matrix b of a C-contiguous (B, n, n) stack S: out[b] = the lower Cholesky factor L (C order, the
// upper triangle zero) of S[b]'s lower triangle, by ?potrf on the Fortran view: at orders 48-256 uplo 'L' on
// the lower triangle transposed into the C upper one (then L transposed back), else uplo 'U' (the C lower
// triangle).  info[b] is LAPACK's info (0, or the order of the leading minor that is not positive definite;
// out[b] is undefined then).  out is S (in place) or does not overlap it.
template <typename T>
void potrf_stack_cpu(const T* S, T* out, std::int64_t B, std::int64_t n, lapack_chol_fn<T> potrf, std::int32_t* info);

// In place on a C-contiguous (B, n, n) stack of lower Cholesky factors: L[b] becomes (L Lᵀ)⁻¹, exactly
// symmetric, by ?potri (uplo 'U' on the Fortran view) and the mirror of its triangle while the matrix is
// in cache.  info[b] as LAPACK's (a matrix with info != 0 is left as LAPACK left it, unmirrored).
template <typename T>
void potri_stack_cpu(T* L, std::int64_t B, std::int64_t n, lapack_chol_fn<T> potri, std::int32_t* info);

}  // namespace kronlin
