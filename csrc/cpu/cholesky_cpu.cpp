// CPU kernels of the Cholesky family: a stack's Cholesky factors and SPD inverses, the LAPACK calls of a
// Python loop made from one C++ loop.  NumPy references: kronlin/_kernels/cholesky.py::potrf_stack_reference
// and ::potri_stack_reference, which make the same LAPACK calls on the same memory layout, so the kernels
// are bit-identical to them.  At 200 x 64², a Python loop spends 10-30% of the LAPACK time on the wrapper
// calls, a bulk copy before and a mirror pass after (bench/results/block_stacks.md); here the copy and the
// mirror happen matrix by matrix while the matrix is in cache.  The SPD inverse inverts its triangle by halves
// in ?gemm calls (trtri_lower_cpu; reference ::trtri_lower_reference, the same BLAS calls): 0.35-0.92x ?potri's
// time from 32² to 2048² (bench/results/potri_recursive.md).
#include "cpu/cholesky_cpu.h"
#include "cpu/symmetric_cpu.h"

#include <algorithm>
#include <cstring>
#include <vector>

namespace kronlin {

namespace {

// Orders from which up to which ?potrf factors the Fortran view's lower triangle ('L') rather than its upper one
// ('U'): SciPy's OpenBLAS (0.3.30, one thread) runs 'L' in 0.66-0.83x the time of 'U' from 48² to 256²
// (bench/results/potrf_uplo.md), and with the two in-cache transposes it costs here this loop takes 0.79-0.98x
// its time with 'U' there (1.01x at 256² float64 into a fresh stack); at 16² and 32² (float64) the transposes cost more than 'L' saves, and above 256² the
// gain shrinks (0.72-0.80 at 512², 0.83-0.89 at 1024²) while the transposes leave the cache.  ?potri stays 'U'
// (its 'L' takes 1.10-1.21x the time from 48² to 512²).
constexpr std::int64_t kLowerMinN = 48, kLowerMaxN = 256;

// o[j, i] = s[i, j] for j <= i (the lower triangle of s transposed into the upper one of o; s may be o), in
// kBlock x kBlock blocks so that the strided side of each block stays in L1.  For s == o this is
// mirror_lower_cpu's work, but its tiles and buffer cost more on these small matrices: a copy of the lower
// triangle and mirror_lower_cpu took the stacked loop 1.08-1.19x this at 48² and 64², 0.95-1.06x at 128²-256².
constexpr std::int64_t kBlock = 16;

template <typename T>
void lower_to_upper(const T* s, T* o, std::int64_t n) {
  for (std::int64_t i0 = 0; i0 < n; i0 += kBlock) {
    const std::int64_t i1 = std::min(i0 + kBlock, n);
    for (std::int64_t j0 = 0; j0 <= i0; j0 += kBlock) {
      for (std::int64_t i = i0; i < i1; ++i) {
        const std::int64_t j1 = std::min(j0 + kBlock, i + 1);
        for (std::int64_t j = j0; j < j1; ++j) o[j * n + i] = s[i * n + j];
      }
    }
  }
}

// The factor ?potrf 'L' left transposed in the C upper triangle of o, moved to the lower one (o[i, j] = o[j, i]
// for i > j, block by block), and zeros above the diagonal.
template <typename T>
void upper_to_lower(T* o, std::int64_t n) {
  for (std::int64_t j0 = 0; j0 < n; j0 += kBlock) {
    const std::int64_t j1 = std::min(j0 + kBlock, n);
    for (std::int64_t i0 = j0; i0 < n; i0 += kBlock) {
      const std::int64_t i1 = std::min(i0 + kBlock, n);
      for (std::int64_t j = j0; j < j1; ++j) {
        for (std::int64_t i = std::max(i0, j + 1); i < i1; ++i) o[i * n + j] = o[j * n + i];
      }
    }
  }
  for (std::int64_t i = 0; i + 1 < n; ++i) {
    std::memset(o + i * n + i + 1, 0, sizeof(T) * static_cast<std::size_t>(n - i - 1));
  }
}

// The split of an order k >= 2 into halves: the first a multiple of 16 where k allows (aligned sub-blocks for
// ?gemm's packing), never 0 or k.
std::int64_t first_half(std::int64_t k) {
  const std::int64_t h = k / 2;
  return h >= 16 ? h - h % 16 : h;
}

// Row-major O (m x k) = A (m x k) X, X lower triangular (k x k), its strict upper triangle zero within
// kRecursiveLeaf of the diagonal: by the halves of X, X11 and X22 recursively, X21 by ?gemm; the leaves take X
// whole.  O must not overlap A or X.
template <typename T>
void trmm_right(const RecursiveInverse<T>& r, std::int64_t m, std::int64_t k, const T* A, std::int64_t lda,
                const T* X, std::int64_t ldx, T* O, std::int64_t ldo) {
  if (k <= kRecursiveLeaf) {
    gemm_row_major<T>(r.gemm, m, k, k, T(1), A, lda, X, ldx, T(0), O, ldo);
    return;
  }
  const std::int64_t k1 = first_half(k), k2 = k - k1;
  trmm_right(r, m, k1, A, lda, X, ldx, O, ldo);                                              // O1 = A1 X11
  gemm_row_major<T>(r.gemm, m, k1, k2, T(1), A + k1, lda, X + k1 * ldx, ldx, T(1), O, ldo);  // O1 += A2 X21
  trmm_right(r, m, k2, A + k1, lda, X + k1 * ldx + k1, ldx, O + k1, ldo);                    // O2 = A2 X22
}

// Row-major O (m x n) = alpha X B, X lower triangular (m x m) as for trmm_right.  O must not overlap B or X.
template <typename T>
void trmm_left(const RecursiveInverse<T>& r, std::int64_t m, std::int64_t n, T alpha, const T* X, std::int64_t ldx,
               const T* B, std::int64_t ldb, T* O, std::int64_t ldo) {
  if (m <= kRecursiveLeaf) {
    gemm_row_major<T>(r.gemm, m, n, m, alpha, X, ldx, B, ldb, T(0), O, ldo);
    return;
  }
  const std::int64_t m1 = first_half(m), m2 = m - m1;
  trmm_left(r, m1, n, alpha, X, ldx, B, ldb, O, ldo);                                         // O1 = a X11 B1
  trmm_left(r, m2, n, alpha, X + m1 * ldx + m1, ldx, B + m1 * ldb, ldb, O + m1 * ldo, ldo);  // O2 = a X22 B2
  gemm_row_major<T>(r.gemm, m2, n, m1, alpha, X + m1 * ldx, ldx, B, ldb, T(1), O + m1 * ldo, ldo);  // O2 += a X21 B1
}

template <typename T>
int trtri_halves(T* L, std::int64_t n, std::int64_t ld, T* work, const RecursiveInverse<T>& r) {
  if (n <= kRecursiveLeaf) {  // the Fortran view of the C lower triangle is Lᵀ, upper: its inverse is (L⁻¹)ᵀ
    char uplo = 'U', diag = 'N';
    int N_ = static_cast<int>(n), la = static_cast<int>(ld), info = 0;
    r.trtri(&uplo, &diag, &N_, L, &la, &info);
    return info;
  }
  const std::int64_t n1 = first_half(n), n2 = n - n1;
  T* L21 = L + n1 * ld;
  T* L22 = L21 + n1;
  int info = trtri_halves(L, n1, ld, work, r);
  if (info != 0) return info;
  info = trtri_halves(L22, n2, ld, work, r);
  if (info != 0) return info + static_cast<int>(n1);
  trmm_right(r, n2, n1, L21, ld, L, ld, work, n1);          // work = L21 L11⁻¹
  trmm_left(r, n2, n1, T(-1), L22, ld, work, n1, L21, ld);  // L21 = -L22⁻¹ work
  return 0;
}

}  // namespace

template <typename T>
int trtri_lower_cpu(T* L, std::int64_t n, std::int64_t ld, T* work, const RecursiveInverse<T>& r) {
  for (std::int64_t i = 0; i + 1 < n; ++i) {  // the band the leaves' ?gemm reads above the diagonal
    std::fill(L + i * ld + i + 1, L + i * ld + std::min(n, i + kRecursiveLeaf), T(0));
  }
  return trtri_halves(L, n, ld, work, r);
}

template <typename T>
void potrf_stack_cpu(const T* S, T* out, std::int64_t B, std::int64_t n, lapack_chol_fn<T> potrf,
                     std::int32_t* info) {
  int N = static_cast<int>(n), lda = static_cast<int>(n);
  const bool lower = kLowerMinN <= n && n <= kLowerMaxN;
  char uplo = lower ? 'L' : 'U';  // 'U': the Fortran view's upper triangle is the C lower one
  for (std::int64_t b = 0; b < B; ++b) {
    const T* s = S + b * n * n;
    T* o = out + b * n * n;
    if (lower) {  // the Fortran view's lower triangle is the C upper one: the matrix's lower triangle, transposed
      lower_to_upper(s, o, n);
    } else {
      for (std::int64_t i = 0; i < n; ++i) {  // the lower triangle, and zeros above it (the reference's clean=1)
        if (o != s) std::memcpy(o + i * n, s + i * n, sizeof(T) * static_cast<std::size_t>(i + 1));
        std::memset(o + i * n + i + 1, 0, sizeof(T) * static_cast<std::size_t>(n - i - 1));
      }
    }
    int inf = 0;
    potrf(&uplo, &N, o, &lda, &inf);
    info[b] = inf;
    if (lower) upper_to_lower(o, n);
  }
}

template <typename T>
void potri_stack_cpu(T* L, std::int64_t B, std::int64_t n, lapack_chol_fn<T> potri, const RecursiveInverse<T>* rec,
                     std::int32_t* info) {
  int N = static_cast<int>(n), lda = static_cast<int>(n);
  char uplo = 'U';
  const bool recursive = rec != nullptr && n > kRecursiveLeaf;
  std::vector<T> work(recursive ? static_cast<std::size_t>((n - first_half(n)) * first_half(n)) : 0);
  for (std::int64_t b = 0; b < B; ++b) {
    T* m = L + b * n * n;
    int inf = 0;
    if (recursive) {  // ?potri is ?trtri then ?lauum on the same triangle
      inf = trtri_lower_cpu(m, n, n, work.data(), *rec);
      if (inf == 0) rec->lauum(&uplo, &N, m, &lda, &inf);
    } else {
      potri(&uplo, &N, m, &lda, &inf);
    }
    info[b] = inf;
    if (inf != 0) continue;
    mirror_lower_cpu<T>(m, 1, n);  // the inverse's lower triangle onto its upper one, while in cache
  }
}

template void potrf_stack_cpu<float>(const float*, float*, std::int64_t, std::int64_t, lapack_chol_fn<float>,
                                     std::int32_t*);
template void potrf_stack_cpu<double>(const double*, double*, std::int64_t, std::int64_t, lapack_chol_fn<double>,
                                      std::int32_t*);
template void potri_stack_cpu<float>(float*, std::int64_t, std::int64_t, lapack_chol_fn<float>,
                                     const RecursiveInverse<float>*, std::int32_t*);
template void potri_stack_cpu<double>(double*, std::int64_t, std::int64_t, lapack_chol_fn<double>,
                                      const RecursiveInverse<double>*, std::int32_t*);
template int trtri_lower_cpu<float>(float*, std::int64_t, std::int64_t, float*, const RecursiveInverse<float>&);
template int trtri_lower_cpu<double>(double*, std::int64_t, std::int64_t, double*, const RecursiveInverse<double>&);

}  // namespace kronlin
