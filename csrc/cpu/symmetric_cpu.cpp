// CPU kernels of the symmetric-matrix family (the symmetry check of every symmetric input and the
// mirror after LAPACK potri); NumPy references: kronlin/_kernels/symmetric.py::asymmetry_reference
// and ::mirror_lower_reference.
#include "cpu/symmetric_cpu.h"

#include <algorithm>
#include <cmath>

namespace kronlin {
namespace {

// Tiles of kTile x kTile: the transposed reads of a tile pair stay in L1/L2 (two 64² float64 tiles
// are 64 KiB), where reading a whole row against a whole column misses the cache once per element.
constexpr std::int64_t kTile = 64;

// Memory-bound, O(n²) beside the O(n³) factorizations around it: serial below this many entries
// (32 MiB of float64), for the reason given in eig_scale_cpu.cpp (an OpenMP team that ran here
// keeps spinning and steals the cores of the LAPACK call that follows).
constexpr std::int64_t kParallelThreshold = std::int64_t(1) << 22;

// Lanes of the max reductions: elementwise selects over kLanes independent maxima vectorise without
// -ffast-math (a single running max is a loop-carried dependency the compiler must keep in order).
constexpr std::int64_t kLanes = 16;

// Fold |a - b| and max(|a|, |b|) of k pairs into the lane maxima; NaN pairs set `nan`.
template <typename T>
inline void fold(const T* a, const T* b, std::int64_t k, T* am, T* sm, bool& nan) {
  std::int64_t j = 0;
  for (; j + kLanes <= k; j += kLanes) {
    bool bad = false;
    for (std::int64_t l = 0; l < kLanes; ++l) {
      const T x = a[j + l], y = b[j + l];
      const T d = std::abs(x - y), m = std::abs(x) > std::abs(y) ? std::abs(x) : std::abs(y);
      bad |= d != d;
      am[l] = am[l] < d ? d : am[l];
      sm[l] = sm[l] < m ? m : sm[l];
    }
    nan |= bad;
  }
  for (; j < k; ++j) {
    const T x = a[j], y = b[j];
    const T d = std::abs(x - y), m = std::abs(x) > std::abs(y) ? std::abs(x) : std::abs(y);
    nan |= d != d;
    am[0] = am[0] < d ? d : am[0];
    sm[0] = sm[0] < m ? m : sm[0];
  }
}

// One tile row (rows i0..i1) of matrix m against its mirror image: each block m[j0:j1, i0:i1] is
// transposed into buf once (row reads), then compared row by row with m[i, j0:j1] (contiguous).
template <typename T>
void tile_row(const T* m, std::int64_t n, std::int64_t i0, std::int64_t i1, T* buf, T* am, T* sm, bool& nan) {
  for (std::int64_t j0 = i0; j0 < n; j0 += kTile) {
    const std::int64_t j1 = std::min(j0 + kTile, n), w = j1 - j0;
    for (std::int64_t j = j0; j < j1; ++j) {
      const T* row = m + j * n;
      for (std::int64_t i = i0; i < i1; ++i) buf[(i - i0) * kTile + (j - j0)] = row[i];
    }
    for (std::int64_t i = i0; i < i1; ++i) {
      // on the diagonal block only j > i: the pairs below it are the same pairs seen from the other side
      const std::int64_t s = j0 == i0 ? i - i0 + 1 : 0;
      if (s < w) fold(m + i * n + j0 + s, buf + (i - i0) * kTile + s, w - s, am, sm, nan);
    }
  }
}

}  // namespace

template <typename T>
void asymmetry_cpu(const T* x, std::int64_t B, std::int64_t n, double* asym, double* scale) {
  const std::int64_t tiles = (n + kTile - 1) / kTile;
  const std::int64_t work = B * tiles;  // (matrix, tile row) pairs
  T a_max = 0, s_max = 0;
  bool nan = false;
#if defined(KRONLIN_HAVE_OPENMP)
#pragma omp parallel for schedule(dynamic) reduction(max : a_max, s_max) reduction(|| : nan) \
    if (B * n * n >= kParallelThreshold)
#endif
  for (std::int64_t w = 0; w < work; ++w) {
    const T* m = x + (w / tiles) * n * n;
    const std::int64_t i0 = (w % tiles) * kTile, i1 = std::min(i0 + kTile, n);
    T buf[kTile * kTile];
    T am[kLanes] = {}, sm[kLanes] = {};
    bool bad = false;
    tile_row(m, n, i0, i1, buf, am, sm, bad);
    // the diagonal entries pair with themselves: they count for the scale only
    for (std::int64_t i = i0; i < i1; ++i) {
      const T d = std::abs(m[i * n + i]);
      bad |= d != d;
      sm[0] = sm[0] < d ? d : sm[0];
    }
    for (std::int64_t l = 0; l < kLanes; ++l) {
      a_max = std::max(a_max, am[l]);
      s_max = std::max(s_max, sm[l]);
    }
    nan = nan || bad;
  }
  const bool finite = !nan && std::isfinite(s_max);  // a NaN shows in some |a - b|, an infinity in s_max
  *asym = finite ? static_cast<double>(a_max) : NAN;
  *scale = finite ? static_cast<double>(s_max) : NAN;
}

template <typename T>
void mirror_lower_cpu(T* x, std::int64_t B, std::int64_t n) {
  const std::int64_t tiles = (n + kTile - 1) / kTile;
  const std::int64_t work = B * tiles;
#if defined(KRONLIN_HAVE_OPENMP)
#pragma omp parallel for schedule(dynamic) if (B * n * n >= kParallelThreshold)
#endif
  for (std::int64_t w = 0; w < work; ++w) {
    T* m = x + (w / tiles) * n * n;
    const std::int64_t i0 = (w % tiles) * kTile, i1 = std::min(i0 + kTile, n);
    // tile row i0 of the upper triangle (rows i0..i1, columns >= i) from the lower one
    for (std::int64_t j0 = i0; j0 < n; j0 += kTile) {
      const std::int64_t j1 = std::min(j0 + kTile, n);
      for (std::int64_t i = i0; i < i1; ++i) {
        T* row = m + i * n;
        for (std::int64_t j = std::max(j0, i + 1); j < j1; ++j) row[j] = m[j * n + i];
      }
    }
  }
}

template void asymmetry_cpu<float>(const float*, std::int64_t, std::int64_t, double*, double*);
template void asymmetry_cpu<double>(const double*, std::int64_t, std::int64_t, double*, double*);
template void mirror_lower_cpu<float>(float*, std::int64_t, std::int64_t);
template void mirror_lower_cpu<double>(double*, std::int64_t, std::int64_t);

}  // namespace kronlin
