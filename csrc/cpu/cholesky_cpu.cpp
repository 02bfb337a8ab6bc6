// CPU kernels of the Cholesky family: a stack's Cholesky factors and SPD inverses, the LAPACK calls of a
// Python loop made from one C++ loop.  NumPy references: kronlin/_kernels/cholesky.py::potrf_stack_reference
// and ::potri_stack_reference, which make the same LAPACK calls on the same memory layout, so the kernels
// are bit-identical to them.  At 200 x 64², a Python loop spends 10-30% of the LAPACK time on the wrapper
// calls, a bulk copy before and a mirror pass after (bench/results/block_stacks.md); here the copy and the
// mirror happen matrix by matrix while the matrix is in cache.
#include "cpu/cholesky_cpu.h"
#include "cpu/symmetric_cpu.h"

#include <cstring>

namespace kronlin {

template <typename T>
void potrf_stack_cpu(const T* S, T* out, std::int64_t B, std::int64_t n, lapack_chol_fn<T> potrf,
                     std::int32_t* info) {
  int N = static_cast<int>(n), lda = static_cast<int>(n);
  char uplo = 'U';  // the Fortran view's upper triangle is the C lower one
  for (std::int64_t b = 0; b < B; ++b) {
    const T* s = S + b * n * n;
    T* o = out + b * n * n;
    for (std::int64_t i = 0; i < n; ++i) {  // the lower triangle, and zeros above it (the reference's clean=1)
      if (o != s) std::memcpy(o + i * n, s + i * n, sizeof(T) * static_cast<std::size_t>(i + 1));
      std::memset(o + i * n + i + 1, 0, sizeof(T) * static_cast<std::size_t>(n - i - 1));
    }
    int inf = 0;
    potrf(&uplo, &N, o, &lda, &inf);
    info[b] = inf;
  }
}

template <typename T>
void potri_stack_cpu(T* L, std::int64_t B, std::int64_t n, lapack_chol_fn<T> potri, std::int32_t* info) {
  int N = static_cast<int>(n), lda = static_cast<int>(n);
  char uplo = 'U';
  for (std::int64_t b = 0; b < B; ++b) {
    T* m = L + b * n * n;
    int inf = 0;
    potri(&uplo, &N, m, &lda, &inf);
    info[b] = inf;
    if (inf != 0) continue;
    mirror_lower_cpu<T>(m, 1, n);  // the inverse's lower triangle onto its upper one, while in cache
  }
}

template void potrf_stack_cpu<float>(const float*, float*, std::int64_t, std::int64_t, lapack_chol_fn<float>,
                                     std::int32_t*);
template void potrf_stack_cpu<double>(const double*, double*, std::int64_t, std::int64_t, lapack_chol_fn<double>,
                                      std::int32_t*);
template void potri_stack_cpu<float>(float*, std::int64_t, std::int64_t, lapack_chol_fn<float>, std::int32_t*);
template void potri_stack_cpu<double>(double*, std::int64_t, std::int64_t, lapack_chol_fn<double>, std::int32_t*);

}  // namespace kronlin
