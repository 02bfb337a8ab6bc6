// CPU kernel of the block-apply family: the per-layer products G⁻¹ V A⁻ᵀ of a stack of equal-shaped K-FAC
// blocks (BlockDiagInverse.apply), the BLAS calls of a Python loop made from one C++ loop.  NumPy reference:
// kronlin/_kernels/block_apply.py::block_apply_reference.  At 200 x 64² float32 a Python loop of np.matmul
// calls, the finiteness sum over the results and the list handling cost 0.3-0.5x the products themselves
// (bench/results/block_stacks.md); here each product pair is two ?gemm calls and each result is tested
// finite while it is in L1.
#include "cpu/block_apply_cpu.h"

#include <cstdint>
#include <vector>

namespace kronlin {
namespace {

// Whether x[0:n] holds a NaN or an infinity: x - x is 0 for every finite x and NaN otherwise; an integer OR
// over the comparisons vectorises without reassociating floating-point sums.
template <typename T>
bool any_nonfinite(const T* x, std::int64_t n) {
  std::uint32_t bad = 0;
  for (std::int64_t i = 0; i < n; ++i) {
    const T d = x[i] - x[i];
    bad |= static_cast<std::uint32_t>(d != d);
  }
  return bad != 0;
}

}  // namespace

template <typename T>
std::int64_t block_apply_cpu(const T* G, const T* const* V, const T* At, T* Y, std::int64_t B, std::int64_t q,
                             std::int64_t p, blas_gemm_fn<T> gemm) {
  std::vector<T> tmp(static_cast<std::size_t>(q * p));
  std::int64_t first_bad = -1;
  for (std::int64_t b = 0; b < B; ++b) {
    T* y = Y + b * q * p;
    gemm_row_major<T>(gemm, q, p, q, T(1), G + b * q * q, q, V[b], p, T(0), tmp.data(), p);  // tmp = G[b] V[b]
    gemm_row_major<T>(gemm, q, p, p, T(1), tmp.data(), p, At + b * p * p, p, T(0), y, p);    // Y[b] = tmp At[b]
    if (first_bad < 0 && any_nonfinite(y, q * p)) first_bad = b;
  }
  return first_bad;
}

template std::int64_t block_apply_cpu<float>(const float*, const float* const*, const float*, float*, std::int64_t,
                                             std::int64_t, std::int64_t, blas_gemm_fn<float>);
template std::int64_t block_apply_cpu<double>(const double*, const double* const*, const double*, double*,
                                              std::int64_t, std::int64_t, std::int64_t, blas_gemm_fn<double>);

}  // namespace kronlin
