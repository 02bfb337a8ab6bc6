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

#if (defined(__GNUC__) || defined(__clang__)) && !defined(KRONLIN_NO_VECTOR_EXTENSIONS) && \
    (defined(__clang__) || __GNUC__ >= 12)
// W x W blocks (W = 4 floats or 2 doubles, one 16-byte vector per row) transposed in registers by
// __builtin_shufflevector (GCC 12+, Clang).  The symmetry test's transposing copy into its tile buffer went
// element by element before: with these blocks the whole test takes 0.51-0.74x its time in float32 and
// 0.69-0.84x in float64 (one thread, 512²-2048², 785², 200 x 64², 50 x 256²; medians of 41 paired runs).
#define KRONLIN_TRANSPOSE_SHUFFLE 1
template <typename T>
inline void transpose_micro(const T* src, std::int64_t ls, T* dst, std::int64_t ld) {
  typedef T V __attribute__((vector_size(16)));
  if constexpr (sizeof(T) == 4) {
    V r0, r1, r2, r3;
    std::memcpy(&r0, src, 16);
    std::memcpy(&r1, src + ls, 16);
    std::memcpy(&r2, src + 2 * ls, 16);
    std::memcpy(&r3, src + 3 * ls, 16);
    const V t0 = __builtin_shufflevector(r0, r1, 0, 4, 1, 5), t1 = __builtin_shufflevector(r0, r1, 2, 6, 3, 7);
    const V t2 = __builtin_shufflevector(r2, r3, 0, 4, 1, 5), t3 = __builtin_shufflevector(r2, r3, 2, 6, 3, 7);
    const V c0 = __builtin_shufflevector(t0, t2, 0, 1, 4, 5), c1 = __builtin_shufflevector(t0, t2, 2, 3, 6, 7);
    const V c2 = __builtin_shufflevector(t1, t3, 0, 1, 4, 5), c3 = __builtin_shufflevector(t1, t3, 2, 3, 6, 7);
    std::memcpy(dst, &c0, 16);
    std::memcpy(dst + ld, &c1, 16);
    std::memcpy(dst + 2 * ld, &c2, 16);
    std::memcpy(dst + 3 * ld, &c3, 16);
  } else {
    V r0, r1;
    std::memcpy(&r0, src, 16);
    std::memcpy(&r1, src + ls, 16);
    const V c0 = __builtin_shufflevector(r0, r1, 0, 2), c1 = __builtin_shufflevector(r0, r1, 1, 3);
    std::memcpy(dst, &c0, 16);
    std::memcpy(dst + ld, &c1, 16);
  }
}
#endif

// dst[c * ld + r] = src[r * ls + c] for r < h, c < w: a transposing copy of an h x w block (row strides
// ls and ld), in W x W register blocks where the vector extensions are available.  `lower` (a square block
// on the diagonal, h == w, of which only the entries below the diagonal are read): the register blocks wholly
// above it are skipped, half the work of a matrix that is one tile (200 x 64²: 0.9x the symmetry test's time).
template <typename T, bool lower = false>
inline void transpose_block(const T* src, std::int64_t ls, T* dst, std::int64_t ld, std::int64_t h,
                            std::int64_t w) {
  std::int64_t hv = 0, wv = 0;
#if defined(KRONLIN_TRANSPOSE_SHUFFLE)
  constexpr std::int64_t W = 16 / sizeof(T);
  hv = h - h % W, wv = w - w % W;
  for (std::int64_t r = 0; r < hv; r += W) {
    const std::int64_t ce = lower ? std::min(r + W, wv) : wv;
    for (std::int64_t c = 0; c < ce; c += W) transpose_micro(src + r * ls + c, ls, dst + c * ld + r, ld);
  }
#endif
  if constexpr (!lower) {  // below the diagonal these columns have no entries in the rows r < hv <= wv
    for (std::int64_t r = 0; r < hv; ++r) {
      for (std::int64_t c = wv; c < w; ++c) dst[c * ld + r] = src[r * ls + c];
    }
  }
  for (std::int64_t r = hv; r < h; ++r) {
    const std::int64_t ce = lower ? std::min(r, w) : w;
    for (std::int64_t c = 0; c < ce; ++c) dst[c * ld + r] = src[r * ls + c];
  }
}

// One tile row (rows i0..i1) of matrix m against its mirror image: each block m[j0:j1, i0:i1] is
// transposed into buf once, then compared row by row with m[i, j0:j1] (contiguous).
template <typename T>
void tile_row(const T* m, std::int64_t n, std::int64_t i0, std::int64_t i1, T* buf, Maxima<T>& acc) {
  for (std::int64_t j0 = i0; j0 < n; j0 += kTile) {
    const std::int64_t j1 = std::min(j0 + kTile, n), w = j1 - j0;
    // buf[(i - i0) * kTile + (j - j0)] = m[j, i]
    if (j0 == i0) {
      transpose_block<T, true>(m + j0 * n + i0, n, buf, kTile, w, i1 - i0);
    } else {
      transpose_block<T>(m + j0 * n + i0, n, buf, kTile, w, i1 - i0);
    }
    for (std::int64_t i = i0; i < i1; ++i) {
      // on the diagonal block only j > i: the pairs below it are the same pairs seen from the other side
      const std::int64_t s = j0 == i0 ? i - i0 + 1 : 0;
      if (s < w) acc.fold(m + i * n + j0 + s, buf + (i - i0) * kTile + s, w - s);
    }
  }
}

// The maxima of tile row i0 of matrix m (its pairs against their mirror images, and its diagonal for the
// scale) folded into a_max, s_max and nan.
template <typename T>
void tile_row_maxima(const T* m, std::int64_t n, std::int64_t i0, T& a_max, T& s_max, bool& nan) {
  const std::int64_t i1 = std::min(i0 + kTile, n);
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

template <typename T>
void report(T a_max, T s_max, bool nan, double* asym, double* scale) {
  const bool finite = !nan && std::isfinite(s_max);  // a NaN shows in some |a - b|, an infinity in s_max
  *asym = finite ? static_cast<double>(a_max) : NAN;
  *scale = finite ? static_cast<double>(s_max) : NAN;
}

// The maxima over `work` items, item(w, a_max, s_max, nan) folding item w into them, reported through asym and
// scale; OpenMP threads share the items where the data (`entries` of them) is large enough.
template <typename T, typename Item>
void maxima(std::int64_t work, std::int64_t entries, Item item, double* asym, double* scale) {
  T a_max = 0, s_max = 0;
  bool nan = false;
#if defined(KRONLIN_HAVE_OPENMP)
#pragma omp parallel for schedule(dynamic) reduction(max : a_max, s_max) reduction(|| : nan) \
    if (entries >= kParallelThreshold)
#endif
  for (std::int64_t w = 0; w < work; ++w) item(w, a_max, s_max, nan);
  report(a_max, s_max, nan, asym, scale);
}

}  // namespace

template <typename T>
void asymmetry_cpu(const T* x, std::int64_t B, std::int64_t n, double* asym, double* scale) {
  const std::int64_t tiles = (n + kTile - 1) / kTile;  // one item per (matrix, tile row)
  maxima<T>(B * tiles, B * n * n, [=](std::int64_t w, T& a_max, T& s_max, bool& nan) {
    tile_row_maxima(x + (w / tiles) * n * n, n, (w % tiles) * kTile, a_max, s_max, nan);
  }, asym, scale);
}

template <typename T>
void stack_asymmetry_cpu(const T* const* xs, std::int64_t B, std::int64_t n, T* out, double* asym, double* scale) {
  maxima<T>(B, B * n * n, [=](std::int64_t b, T& a_max, T& s_max, bool& nan) {  // one item per matrix
    T* m = out + b * n * n;
    std::memcpy(m, xs[b], static_cast<std::size_t>(n * n) * sizeof(T));
    for (std::int64_t i0 = 0; i0 < n; i0 += kTile) tile_row_maxima(m, n, i0, a_max, s_max, nan);  // in cache
  }, asym, scale);
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
    for (std::int64_t i = i0; i < i1; ++i) {  // the diagonal tile: the entries right of its diagonal
      T* row = m + i * n;
      for (std::int64_t j = i + 1; j < i1; ++j) row[j] = m[j * n + i];
    }
#if defined(KRONLIN_TRANSPOSE_SHUFFLE)
    if constexpr (sizeof(T) == 4) {
      // float: m[i0:i1, j0:j1] = m[j0:j1, i0:i1]ᵀ through an L1 buffer, transposed into it in 4 x 4 register
      // blocks and copied out row by row.  One thread, against the element loop below (medians of 41 paired
      // runs): 0.44-0.66x at 512², 1024², 1536², 2048², 2049²; 0.75-0.91x at 500², 600², 768², 1025²;
      // 0.96-1.0x for stacks of 64² and 256²; but 1.08-1.27x at 785², 1000², 1200² (0.03-0.1 ms), orders
      // whose strided column reads had no cache conflicts to lose.  Transposing straight into m was slower
      // still: 16 bytes to each of 64 rows in turn, which power-of-two strides map to a few cache sets.
      T buf[kTile * kTile];
      for (std::int64_t j0 = i1; j0 < n; j0 += kTile) {
        const std::int64_t width = std::min(j0 + kTile, n) - j0;
        transpose_block(m + j0 * n + i0, n, buf, kTile, width, i1 - i0);
        for (std::int64_t i = i0; i < i1; ++i) {
          std::memcpy(m + i * n + j0, buf + (i - i0) * kTile, width * sizeof(T));
        }
      }
      continue;
    }
#endif
    // double (2 x 2 register blocks gain less than the buffer's extra pass costs: 0.97-1.39x the element
    // loop), and builds without the vector extensions: row by row, from the tile's columns
    for (std::int64_t j0 = i1; j0 < n; j0 += kTile) {
      const std::int64_t j1 = std::min(j0 + kTile, n);
      for (std::int64_t i = i0; i < i1; ++i) {
        T* row = m + i * n;
        for (std::int64_t j = j0; j < j1; ++j) row[j] = m[j * n + i];
      }
    }
  }
}

template void asymmetry_cpu<float>(const float*, std::int64_t, std::int64_t, double*, double*);
template void asymmetry_cpu<double>(const double*, std::int64_t, std::int64_t, double*, double*);
template void stack_asymmetry_cpu<float>(const float* const*, std::int64_t, std::int64_t, float*, double*, double*);
template void stack_asymmetry_cpu<double>(const double* const*, std::int64_t, std::int64_t, double*, double*,
                                          double*);
template void mirror_lower_cpu<float>(float*, std::int64_t, std::int64_t);
template void mirror_lower_cpu<double>(double*, std::int64_t, std::int64_t);

}  // namespace kronlin
