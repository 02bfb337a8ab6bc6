#pragma once
#include <cstdint>

namespace kronlin {

// ‖x‖₁ = max_j Σ_i |x[i, j]| of a C-contiguous m x n matrix, one pass over the rows into n column sums (kept
// in T, as the NumPy reference keeps them).  NaN if an entry is NaN, infinity if a sum overflows or an entry is
// infinite.
template <typename T>
double norm1_cpu(const T* x, std::int64_t m, std::int64_t n);

}  // namespace kronlin
