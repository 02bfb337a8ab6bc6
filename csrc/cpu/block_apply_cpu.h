#pragma once
#include <cstdint>

namespace kronlin {

// BLAS ?gemm as a C function (transa, transb, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc): SciPy's
// scipy.linalg.cython_blas exports it (the package passes its address), so the extension links no BLAS of
// its own.
template <typename T>
using blas_gemm_fn = void (*)(char* transa, char* transb, int* m, int* n, int* k, T* alpha, T* a, int* lda, T* b,
                              int* ldb, T* beta, T* c, int* ldc);

// Y[b] = G[b] V[b] At[b] for b < B, all row-major and C-contiguous: G a (B, q, q) stack, V[b] separate
// (q, p) matrices, At a (B, p, p) stack, Y a (B, q, p) stack.  The intermediate G[b] V[b] goes into one
// (q, p) buffer; each result is tested finite while it is in cache.  Returns the first b whose Y[b] holds
// a NaN or an infinity, or -1.
template <typename T>
std::int64_t block_apply_cpu(const T* G, const T* const* V, const T* At, T* Y, std::int64_t B, std::int64_t q,
                             std::int64_t p, blas_gemm_fn<T> gemm);

}  // namespace kronlin
