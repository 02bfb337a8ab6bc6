#pragma once
#include <cstdint>

namespace kronlin {

// BLAS ?gemm as a C function (transa, transb, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc): SciPy's
// scipy.linalg.cython_blas exports it (the package passes its address), so the extension links no BLAS of
// its own.
template <typename T>
using blas_gemm_fn = void (*)(char* transa, char* transb, int* m, int* n, int* k, T* alpha, T* a, int* lda, T* b,
                              int* ldb, T* beta, T* c, int* ldc);

// Row-major C (m x n) = alpha A (m x k) B (k x n) + beta C, each with its own row stride, by the column-major
// ?gemm: Cᵀ = Bᵀ Aᵀ on the same memory.  BLAS takes non-const pointers; it only reads A and B.
template <typename T>
inline void gemm_row_major(blas_gemm_fn<T> gemm, std::int64_t m, std::int64_t n, std::int64_t k, T alpha, const T* A,
                           std::int64_t lda, const T* B, std::int64_t ldb, T beta, T* C, std::int64_t ldc) {
  char N = 'N';
  int M_ = static_cast<int>(n), N_ = static_cast<int>(m), K_ = static_cast<int>(k);
  int la = static_cast<int>(lda), lb = static_cast<int>(ldb), lc = static_cast<int>(ldc);
  gemm(&N, &N, &M_, &N_, &K_, &alpha, const_cast<T*>(B), &lb, const_cast<T*>(A), &la, &beta, C, &lc);
}

// Y[b] = G[b] V[b] At[b] for b < B, all row-major and C-contiguous: G a (B, q, q) stack, V[b] separate
// (q, p) matrices, At a (B, p, p) stack, Y a (B, q, p) stack.  The intermediate G[b] V[b] goes into one
// (q, p) buffer; each result is tested finite while it is in cache.  Returns the first b whose Y[b] holds
// a NaN or an infinity, or -1.
template <typename T>
std::int64_t block_apply_cpu(const T* G, const T* const* V, const T* At, T* Y, std::int64_t B, std::int64_t q,
                             std::int64_t p, blas_gemm_fn<T> gemm);

}  // namespace kronlin
