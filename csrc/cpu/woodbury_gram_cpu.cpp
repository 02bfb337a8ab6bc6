// CPU (OpenMP) kernel of the weight-sharing Gram family; CUDA twin:
// csrc/cuda/woodbury_gram_cuda.cu, NumPy reference:
// kronlin/_kernels/woodbury_gram.py::gram_shared_reference.
//
// For every pair of examples (i1 <= i2) the T x T blocks A_i1 A_i2^T and
// E_c1 E_c2^T are produced W x (NRV * W) entries at a time by outer-product
// updates held in SIMD registers (a BLAS-style micro-kernel over rows packed
// into panels of W positions), and are reduced against each other right away:
// nothing of size T x T, let alone the (N*T) x (N*T) products of the
// composition, is ever stored.  With S labels per input the activation block
// is computed once and reused for the S x S error blocks of the pair.
// Memory: one packed copy of the inputs (N * T * (da + S * de) entries, T
// rounded up to W) when it is at most 256 MiB, else two packed examples per
// thread.  A block of row panels (~24 KiB) stays in L1 while the column
// panels of the other example stream past.  Measured on one AVX-512 core:
// 50-75 GFLOP/s in float64, 90-160 in float32.
#include "cpu/woodbury_gram_cpu.h"

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <type_traits>
#include <vector>

#include "common/woodbury_gram.h"

#if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__))
#define KRONLIN_X86_DISPATCH 1
#endif

#if defined(__GNUC__)
#define KRONLIN_ALWAYS_INLINE inline __attribute__((always_inline))
#define KRONLIN_HAVE_VECTOR_EXT 1
#else
#define KRONLIN_ALWAYS_INLINE inline
#endif

namespace kronlin {
namespace {

using i64 = std::int64_t;

// Below this many multiply-adds the OpenMP fork/join costs more than it saves.
constexpr i64 kParallelThreshold = i64(1) << 18;
// Every example is packed once up front when the packed copy (the size of the
// inputs, padded) stays below this many bytes; above it each thread repacks
// the column example of every pair (O(T d) against the pair's O(T^2 d) work).
constexpr i64 kPrepackBytes = i64(256) << 20;
// Packed row panels kept hot while the column panels stream past (half an L1d).
constexpr i64 kL1Bytes = i64(24) << 10;

#if defined(KRONLIN_HAVE_VECTOR_EXT)
// GCC/Clang vector extensions: the width is fixed here, the instructions are
// chosen by the target of the function the code is inlined into.
template <typename T, int Bytes>
struct Vec;
template <> struct Vec<double, 16> { typedef double type __attribute__((vector_size(16))); };
template <> struct Vec<double, 32> { typedef double type __attribute__((vector_size(32))); };
template <> struct Vec<double, 64> { typedef double type __attribute__((vector_size(64))); };
template <> struct Vec<float, 16> { typedef float type __attribute__((vector_size(16))); };
template <> struct Vec<float, 32> { typedef float type __attribute__((vector_size(32))); };
template <> struct Vec<float, 64> { typedef float type __attribute__((vector_size(64))); };

template <typename T, int Bytes>
constexpr int lanes() {
  return Bytes / static_cast<int>(sizeof(T));
}

#else
// Without vector extensions (MSVC): one lane, plain scalar loops.
template <typename T, int Bytes>
struct Vec {
  typedef T type;
};

template <typename T, int Bytes>
constexpr int lanes() {
  return 1;
}

#endif

template <typename V, typename T>
KRONLIN_ALWAYS_INLINE void load(V& v, const T* p) {
  std::memcpy(&v, p, sizeof(V));
}

// Packed layout of one example's rows (positions t, features k): panels of W
// consecutive positions, each panel a (d, W) block with the W positions of one
// feature contiguous; positions past T are zero, so padded entries add nothing.
template <typename T>
void pack_panels(const T* X, i64 Tn, i64 d, int W, T* out) {
  const i64 panels = (Tn + W - 1) / W;
  for (i64 p = 0; p < panels; ++p) {
    T* o = out + p * d * W;
    for (int w = 0; w < W; ++w) {
      const i64 t = p * W + w;
      if (t < Tn) {
        const T* x = X + t * d;
        for (i64 k = 0; k < d; ++k) o[k * W + w] = x[k];
      } else {
        for (i64 k = 0; k < d; ++k) o[k * W + w] = T(0);
      }
    }
  }
}

// The W x (R * W) block of inner products between the W positions of panel x
// and the R * W positions of the R consecutive panels at y (panel stride
// d * W), by outer-product updates: lane l of acc[r][v] is x_r . y_{v * W + l}.
// No horizontal sums: each lane holds one entry of the block.
template <typename T, int Bytes, int R>
KRONLIN_ALWAYS_INLINE void outer_block(const T* x, const T* y, i64 d,
                                       typename Vec<T, Bytes>::type (&acc)[lanes<T, Bytes>()][R]) {
  using V = typename Vec<T, Bytes>::type;
  constexpr int W = lanes<T, Bytes>();
  for (int r = 0; r < W; ++r)
    for (int v = 0; v < R; ++v) acc[r][v] = V{};
  for (i64 k = 0; k < d; ++k) {
    V yv[R];
    for (int v = 0; v < R; ++v) load(yv[v], y + v * d * W + k * W);
    const T* xk = x + k * W;
    for (int r = 0; r < W; ++r) {
      const T xr = xk[r];
      for (int v = 0; v < R; ++v) acc[r][v] += yv[v] * xr;
    }
  }
}

template <typename T>
struct Problem {
  const T* A;
  const T* E;
  i64 N, S, T_, da, de;
  const T* packed;  // every example packed once (see prepack), or null: pack per pair
};

// Packed entries of one example: activations then the S label blocks of errors.
inline i64 packed_size(i64 Tn, i64 da, i64 de, i64 S, int W) {
  return (Tn + W - 1) / W * W * (da + S * de);
}

template <typename T>
void pack_example(const Problem<T>& P, i64 i, int W, T* out) {
  const i64 Tn = P.T_, da = P.da, de = P.de;
  const i64 pa = (Tn + W - 1) / W * W * da, pe = (Tn + W - 1) / W * W * de;
  pack_panels(P.A + i * Tn * da, Tn, da, W, out);
  for (i64 s = 0; s < P.S; ++s) pack_panels(P.E + (i * P.S + s) * Tn * de, Tn, de, W, out + pa + s * pe);
}

// The packed operands of the "row" example i1 and the "column" example i2:
// pointers into the shared pre-packed copy, or into per-thread buffers.
template <typename T>
struct Workspace {
  const T* x1 = nullptr;
  const T* x2 = nullptr;
  std::vector<T> buf1, buf2, tot;
};

// Column panels [c, c + R) of i2 against every panel of i1: adds the sum of
// (A-block o E-block) to the W lanes tot[(s1 * S + s2) * W + l] for every label
// pair (plain arrays, not vector objects: no over-aligned allocations).
template <typename T, int Bytes, int R>
KRONLIN_ALWAYS_INLINE void column_step(const Problem<T>& P, const Workspace<T>& ws, i64 c, i64 p_begin, i64 p_end,
                                       T* tot) {
  using V = typename Vec<T, Bytes>::type;
  constexpr int W = lanes<T, Bytes>();
  const i64 S = P.S, da = P.da, de = P.de;
  const i64 panels = (P.T_ + W - 1) / W;
  const i64 sa = da * W, se = de * W;  // panel strides
  const i64 ea = panels * se;          // label stride of the packed errors
  for (i64 p1 = p_begin; p1 < p_end; ++p1) {
    V pa[W][R];
    outer_block<T, Bytes, R>(ws.x1 + p1 * sa, ws.x2 + c * sa, da, pa);
    for (i64 s1 = 0; s1 < S; ++s1) {
      const T* x = ws.x1 + panels * sa + s1 * ea + p1 * se;
      for (i64 s2 = 0; s2 < S; ++s2) {
        V pe[W][R];
        outer_block<T, Bytes, R>(x, ws.x2 + panels * sa + s2 * ea + c * se, de, pe);
        T* tq = tot + (s1 * S + s2) * W;
        V t;
        load(t, tq);
        for (int r = 0; r < W; ++r)
          for (int v = 0; v < R; ++v) t += pa[r][v] * pe[r][v];
        std::memcpy(tq, &t, sizeof(V));
      }
    }
  }
}

// All pairs (i1, i2 >= i1) of row i1, from the shared packed copy or, for
// large inputs, packing i1 once and each i2 in turn.
template <typename T, int Bytes, int NRV>
KRONLIN_ALWAYS_INLINE void row_impl(const Problem<T>& P, i64 i1, Workspace<T>& ws, double* out) {
  constexpr int W = lanes<T, Bytes>();
  const i64 S = P.S, Tn = P.T_;
  const i64 panels = (Tn + W - 1) / W;
  const i64 size = packed_size(Tn, P.da, P.de, S, W);
  auto operand = [&](i64 i, std::vector<T>& buf) -> const T* {
    if (P.packed != nullptr) return P.packed + i * size;
    buf.resize(static_cast<std::size_t>(size));
    pack_example(P, i, W, buf.data());
    return buf.data();
  };
  // Row panels per block: about kL1Bytes of packed activations and errors.
  const i64 panel_bytes = W * (P.da + S * P.de) * static_cast<i64>(sizeof(T));
  const i64 block = std::max<i64>(1, kL1Bytes / std::max<i64>(panel_bytes, 1));
  ws.x1 = operand(i1, ws.buf1);
  std::vector<T>& tot = ws.tot;
  tot.resize(static_cast<std::size_t>(S * S * W));
  for (i64 i2 = i1; i2 < P.N; ++i2) {
    ws.x2 = operand(i2, ws.buf2);
    std::fill(tot.begin(), tot.end(), T(0));
    // A block of row panels stays in L1 while every column panel passes by.
    for (i64 pb = 0; pb < panels; pb += block) {
      const i64 pe = std::min(panels, pb + block);
      i64 c = 0;
      for (; c + NRV <= panels; c += NRV) column_step<T, Bytes, NRV>(P, ws, c, pb, pe, tot.data());
      for (; c < panels; ++c) column_step<T, Bytes, 1>(P, ws, c, pb, pe, tot.data());
    }
    for (i64 q = 0; q < S * S; ++q) {
      double s = 0.0;
      for (int l = 0; l < W; ++l) s += static_cast<double>(tot[static_cast<std::size_t>(q * W + l)]);
      out[(i2 - i1) * S * S + q] = s;
    }
  }
}

template <typename T>
using RowFn = void (*)(const Problem<T>&, i64, Workspace<T>&, double*);

// Register blocks of W x NRV accumulators, W = vector lanes:
// x86-64 baseline (SSE2, 16 xmm): double 2 x 4, float 4 x 2; AVX2 (16 ymm):
// double 4 x 2, float 8 x 1; AVX-512 (32 zmm): double 8 x 2, float 16 x 1.
template <typename T>
void row_baseline(const Problem<T>& P, i64 i1, Workspace<T>& ws, double* out) {
  row_impl<T, 16, sizeof(T) == 8 ? 4 : 2>(P, i1, ws, out);
}

#if defined(KRONLIN_X86_DISPATCH)
template <typename T>
__attribute__((target("avx2,fma"))) void row_avx2(const Problem<T>& P, i64 i1, Workspace<T>& ws, double* out) {
  row_impl<T, 32, sizeof(T) == 8 ? 2 : 1>(P, i1, ws, out);
}

template <typename T>
__attribute__((target("avx512f,avx512dq,avx512vl,avx2,fma"))) void row_avx512(const Problem<T>& P, i64 i1,
                                                                             Workspace<T>& ws, double* out) {
  row_impl<T, 64, sizeof(T) == 8 ? 2 : 1>(P, i1, ws, out);
}
#endif

enum class Isa { Baseline, Avx2, Avx512 };

Isa detect_isa() {
  Isa best = Isa::Baseline;
#if defined(KRONLIN_X86_DISPATCH)
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512dq") &&
      __builtin_cpu_supports("avx512vl"))
    best = Isa::Avx512;
  else if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma"))
    best = Isa::Avx2;
#endif
  // KRONLIN_WOODBURY_ISA=baseline|avx2 selects a narrower path (tests, benchmarks);
  // it never enables an instruction set the CPU lacks.
  if (const char* want = std::getenv("KRONLIN_WOODBURY_ISA")) {
    if (std::strcmp(want, "baseline") == 0) return Isa::Baseline;
    if (std::strcmp(want, "avx2") == 0 && best == Isa::Avx512) return Isa::Avx2;
  }
  return best;
}

Isa isa() {
  static const Isa value = detect_isa();
  return value;
}

template <typename T>
struct Kernel {
  RowFn<T> fn;
  int lanes;
};

template <typename T>
Kernel<T> kernel() {
#if defined(KRONLIN_X86_DISPATCH)
  switch (isa()) {
    case Isa::Avx512: return {&row_avx512<T>, lanes<T, 64>()};
    case Isa::Avx2: return {&row_avx2<T>, lanes<T, 32>()};
    default: break;
  }
#endif
  return {&row_baseline<T>, lanes<T, 16>()};
}

}  // namespace

const char* woodbury_gram_isa() {
  switch (isa()) {
    case Isa::Avx512: return "avx512";
    case Isa::Avx2: return "avx2";
    default: return "baseline";
  }
}

template <typename T>
void woodbury_gram_shared_cpu(const T* A, const T* E, T* K, i64 N, i64 S, i64 T_, i64 da, i64 de,
                              double scale, i64 prepack_bytes) {
  const i64 M = N * S;
  if (M == 0) return;
  if (T_ == 0 || (da == 0 && de == 0)) {
    std::fill(K, K + M * M, T(0));
    return;
  }
  Problem<T> P{A, E, N, S, T_, da, de, nullptr};
  const Kernel<T> kern = kernel<T>();
  const i64 work = pair_count(N) * T_ * T_ * (da + S * S * de);
  const i64 size = packed_size(T_, da, de, S, kern.lanes);
  std::vector<T> packed;
  if (N * size * static_cast<i64>(sizeof(T)) <= (prepack_bytes < 0 ? kPrepackBytes : prepack_bytes)) {
    packed.resize(static_cast<std::size_t>(N * size));
#if defined(KRONLIN_HAVE_OPENMP)
#pragma omp parallel for schedule(static) if (work >= kParallelThreshold)
#endif
    for (i64 i = 0; i < N; ++i) pack_example(P, i, kern.lanes, packed.data() + i * size);
    P.packed = packed.data();
  }
#if defined(KRONLIN_HAVE_OPENMP)
#pragma omp parallel if (work >= kParallelThreshold)
#endif
  {
    Workspace<T> ws;
    std::vector<double> out(static_cast<std::size_t>(N * S * S));
    // Row i1 holds the N - i1 pairs (i1, i2 >= i1); dynamic scheduling from the
    // longest row balances the triangle.
#if defined(KRONLIN_HAVE_OPENMP)
#pragma omp for schedule(dynamic, 1)
#endif
    for (i64 i1 = 0; i1 < N; ++i1) {
      kern.fn(P, i1, ws, out.data());
      for (i64 i2 = i1; i2 < N; ++i2) {
        const double* o = out.data() + (i2 - i1) * S * S;
        for (i64 s1 = 0; s1 < S; ++s1) {
          for (i64 s2 = 0; s2 < S; ++s2) {
            // (i1, s1, i1, s2) and (i1, s2, i1, s1) are computed separately and
            // agree to rounding; whichever comes last fills both, so K is
            // exactly symmetric.
            const T v = static_cast<T>(scale * o[s1 * S + s2]);
            const i64 c1 = i1 * S + s1, c2 = i2 * S + s2;
            K[c1 * M + c2] = v;
            K[c2 * M + c1] = v;
          }
        }
      }
    }
  }
}

template void woodbury_gram_shared_cpu<float>(const float*, const float*, float*, i64, i64, i64, i64, i64,
                                              double, i64);
template void woodbury_gram_shared_cpu<double>(const double*, const double*, double*, i64, i64, i64, i64, i64,
                                               double, i64);

}  // namespace kronlin
