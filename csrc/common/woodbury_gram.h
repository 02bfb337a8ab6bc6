// Shared math of the weight-sharing Gram kernel family (CPU and CUDA).
//
// For a layer whose weights are shared over T positions (a convolution after
// patch extraction) the per-example gradient of column c is
//     g_c = sum_t e_{c,t} a_{i(c),t}^T              (d_out x d_in),
// with activations A (N, T, d_in), errors E (M, T, d_out), M = N * S columns
// (S labels per input, column c belongs to example i(c) = c / S).  The Gram
// entry of two columns is the Frobenius product of their gradients,
//     K[c1, c2] = <g_c1, g_c2> = sum_{t, t'} (a_{i1,t} . a_{i2,t'}) (e_{c1,t} . e_{c2,t'}),
// i.e. the sum of the Hadamard product of two T x T blocks.  The kernels tile
// over (t, t') and never hold the (N*T) x (N*T) products of the composition
// (A A^T) o (E E^T); the NumPy reference is
// kronlin/_kernels/woodbury_gram.py::gram_shared_reference.
#pragma once

#include <cmath>
#include <cstdint>

#include "common/hd.h"

namespace kronlin {

// Number of unordered example pairs (i1 <= i2) of n examples.
KRONLIN_HD std::int64_t pair_count(std::int64_t n) { return n * (n + 1) / 2; }

// Linear index of the first pair (r, r) of row r.
KRONLIN_HD std::int64_t pair_row_start(std::int64_t r, std::int64_t n) { return r * n - r * (r - 1) / 2; }

// The pair with linear index p in the row-major upper triangle:
// p = i1 * n - i1 * (i1 - 1) / 2 + (i2 - i1), 0 <= i1 <= i2 < n.  The square
// root gives the row up to rounding; the two loops correct it exactly.
KRONLIN_HD void pair_from_index(std::int64_t p, std::int64_t n, std::int64_t& i1, std::int64_t& i2) {
  const double b = 2.0 * static_cast<double>(n) + 1.0;
  std::int64_t i = static_cast<std::int64_t>((b - sqrt(b * b - 8.0 * static_cast<double>(p))) / 2.0);
  if (i < 0) i = 0;
  if (i > n - 1) i = n - 1;
  while (i > 0 && pair_row_start(i, n) > p) --i;
  while (i + 1 < n && pair_row_start(i + 1, n) <= p) ++i;
  i1 = i;
  i2 = i + (p - pair_row_start(i, n));
}

}  // namespace kronlin
