#pragma once
#include <cstdint>

namespace kronlin {

// Symmetry of a C-contiguous stack of B square n x n matrices, in one tiled pass:
// *asym = max |x[b, i, j] - x[b, j, i]| and *scale = max |x[b, i, j]| over the stack.
// A NaN or an infinity anywhere makes both NaN.
template <typename T>
void asymmetry_cpu(const T* x, std::int64_t B, std::int64_t n, double* asym, double* scale);

// out[b] = xs[b] for b < B (B separate C-contiguous n x n matrices into one C-contiguous stack), each matrix's
// symmetry measured while it is in cache: *asym and *scale as asymmetry_cpu's over the whole stack.
template <typename T>
void stack_asymmetry_cpu(const T* const* xs, std::int64_t B, std::int64_t n, T* out, double* asym, double* scale);

// In place on a C-contiguous stack of B square n x n matrices: x[b, i, j] = x[b, j, i] for j > i
// (the lower triangle copied onto the upper one), tile by tile.
template <typename T>
void mirror_lower_cpu(T* x, std::int64_t B, std::int64_t n);

}  // namespace kronlin
