// CPU kernels of the symmetric-matrix family (the symmetry check of every symmetric input and the
// mirror after LAPACK potri); NumPy references: kronlin/_kernels/symmetric.py::asymmetry_reference
// and ::mirror_lower_reference.
#include "cpu/symmetric_cpu.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <type_traits>

namespace kronlin {
namespace {

// Tiles of kTile x kTile: the transposed reads of a tile pair stay in L1/L2 (two 64² float64 tiles
// are 64 KiB), where reading a whole row against a whole column misses the cache once per element.
constexpr std::int64_t kTile = 64;

// Memory-bound, O(n²) beside the O(n³) factorizations around it: serial below this many entries
// (32 MiB of float64), for the reason given in eig_scale_cpu.cpp (an OpenMP team that ran here
// keeps spinning and steals the cores of the LAPACK call that follows).
constexpr std::int64_t kParallelThreshold = std::int64_t(1) << 22;

// The running maxima of |a - b| and max(|a|, |b|) over the pairs of a tile row, and whether a pair was NaN.
// A maximum is exact, so how the pairs are spread over lanes does not change the result: the kernel is
// bit-identical to the NumPy reference (NaN is flagged apart, and every value compared is an absolute
// value, so there are no ±0 ties).
#if (defined(__GNUC__) || defined(__clang__)) && !defined(KRONLIN_NO_VECTOR_EXTENSIONS)
// GCC/Clang 16-byte vectors (SSE2/NEON, the baseline every build targets), four of them per maximum so that
// consecutive maxima do not wait on each other.  They live across the whole tile row: GCC does not
// vectorise a plain lane loop here ("complicated access pattern"), and a scalar loop, or vectors loaded
// and reduced on every call, ran at 3-4× a copy (1024² float32: 1.3-3.0 ms against 0.4 ms).
template <typename T>
struct Maxima {
  using U = std::conditional_t<sizeof(T) == 4, std::uint32_t, std::uint64_t>;
  typedef T V __attribute__((vector_size(16)));
  typedef U VU __attribute__((vector_size(16)));
  static constexpr std::int64_t kWidth = 16 / sizeof(T), kStep = 4 * kWidth;
  V a[4] = {}, s[4] = {};
  VU bad = {};
  T a1 = 0, s1 = 0;  // pairs left over by the vectors
  bool bad1 = false;

  void fold(const T* x, const T* y, std::int64_t k) {
    const VU mask = VU{} + static_cast<U>(~(U(1) << (8 * sizeof(T) - 1)));  // clears the sign bit: |x|
    std::int64_t j = 0;
    for (; j + kStep <= k; j += kStep) {
      for (int u = 0; u < 4; ++u) {
        V p, q;
        std::memcpy(&p, x + j + u * kWidth, sizeof(V));
        std::memcpy(&q, y + j + u * kWidth, sizeof(V));
        const V d = (V)((VU)(p - q) & mask), ap = (V)((VU)p & mask), aq = (V)((VU)q & mask);
        const V m = ap > aq ? ap : aq;
        bad |= (VU)(d != d);
        a[u] = a[u] < d ? d : a[u];
        s[u] = s[u] < m ? m : s[u];
      }
    }
    for (; j < k; ++j) one(x[j], y[j]);
  }
  void one(T p, T q) {
    const T d = std::abs(p - q), m = std::abs(p) > std::abs(q) ? std::abs(p) : std::abs(q);
    bad1 |= d != d;
    a1 = a1 < d ? d : a1;
    s1 = s1 < m ? m : s1;
  }
  void result(T& a_max, T& s_max, bool& nan) const {
    a_max = a1, s_max = s1, nan = bad1;
    for (int u = 0; u < 4; ++u) {
      for (std::int64_t l = 0; l < kWidth; ++l) {
        a_max = a_max < a[u][l] ? a[u][l] : a_max;
        s_max = s_max < s[u][l] ? s[u][l] : s_max;
        nan |= bad[l] != 0;
      }
    }
  }
};
#else
// Other compilers: kLanes independent scalar maxima (no loop-carried dependency between them).
template <typename T>
struct Maxima {
  static constexpr std::int64_t kLanes = 16;
  T a[kLanes] = {}, s[kLanes] = {};
  bool bad1 = false;

  void fold(const T* x, const T* y, std::int64_t k) {
    std::int64_t j = 0;
    for (; j + kLanes <= k; j += kLanes) {
      for (std::int64_t l = 0; l < kLanes; ++l) lane(l, x[j + l], y[j + l]);
    }
    for (; j < k; ++j) lane(0, x[j], y[j]);
  }
  void one(T p, T q) { lane(0, p, q); }
  void lane(std::int64_t l, T p, T q) {
    const T d = std::abs(p - q), m = std::abs(p) > std::abs(q) ? std::abs(p) : std::abs(q);
    bad1 |= d != d;
    a[l] = a[l] < d ? d : a[l];
    s[l] = s[l] < m ? m : s[l];
  }
  void result(T& a_max, T& s_max, bool& nan) const {
    a_max = 0, s_max = 0, nan = bad1;
    for (std::int64_t l = 0; l < kLanes; ++l) {
      a_max = a_max < a[l] ? a[l] : a_max;
      s_max = s_max < s[l] ? s[l] : s_max;
    }
  }
};
#endif

// One tile row (rows i0..i1) of matrix m against its mirror image: each block m[j0:j1, i0:i1] is
// transposed into buf once (row reads), then compared row by row with m[i, j0:j1] (contiguous).
template <typename T>
void tile_row(const T* m, std::int64_t n, std::int64_t i0, std::int64_t i1, T* buf, Maxima<T>& acc) {
  for (std::int64_t j0 = i0; j0 < n; j0 += kTile) {
    const std::int64_t j1 = std::min(j0 + kTile, n), w = j1 - j0;
    for (std::int64_t j = j0; j < j1; ++j) {
      const T* row = m + j * n;
      for (std::int64_t i = i0; i < i1; ++i) buf[(i - i0) * kTile + (j - j0)] = row[i];
    }
    for (std::int64_t i = i0; i < i1; ++i) {
      // on the diagonal block only j > i: the pairs below it are the same pairs seen from the other side
      const std::int64_t s = j0 == i0 ? i - i0 + 1 : 0;
      if (s < w) acc.fold(m + i * n + j0 + s, buf + (i - i0) * kTile + s, w - s);
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
    Maxima<T> acc;
    tile_row(m, n, i0, i1, buf, acc);
    // the diagonal entries pair with themselves: they count for the scale only (|d - d| = 0, or NaN)
    for (std::int64_t i = i0; i < i1; ++i) acc.one(m[i * n + i], m[i * n + i]);
    T a_w, s_w;
    bool bad;
    acc.result(a_w, s_w, bad);
    a_max = std::max(a_max, a_w);
    s_max = std::max(s_max, s_w);
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
