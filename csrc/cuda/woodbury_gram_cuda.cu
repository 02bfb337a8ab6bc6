// CUDA kernel of the weight-sharing Gram family; CPU twin: csrc/cpu/woodbury_gram_cpu.cpp,
// NumPy reference: kronlin/_kernels/woodbury_gram.py::gram_shared_reference.
//
// Grid: x = example pair (i1 <= i2, linear upper-triangle index), y = a
// TILE x TILE tile (t-block, t'-block) of positions, TILE = 32, 64 or 128.  A block
// of 16 x 16 threads computes the tile of A_i1 A_i2^T (R x R entries per
// thread, R = TILE / 16, the feature dimension staged through shared memory in
// chunks of 16), then for every label pair (s1, s2) the matching tile of
// E_c1 E_c2^T, multiplies the two tiles entrywise and reduces the block to one
// number, added atomically to K[c1, c2].  The T x T blocks exist only as
// 2 R^2 registers per thread: memory is K and the inputs, flat in T.
// gram_tile_for() picks the tile (bench/device_check.py times both).
#include "cuda/woodbury_gram_cuda.h"

#include <algorithm>
#include <stdexcept>

#include "common/woodbury_gram.h"
#include "cuda/cuda_utils.h"

namespace kronlin {
namespace {

constexpr int kChunk = 16;    // features staged per shared-memory round
constexpr int kThreads = 16;  // threads per block side
constexpr int kMaxTileGrid = 65535;

// acc[a][b] = X1[r0 + ty + 16 a] . X2[c0 + tx + 16 b] over d features for a
// TILE x TILE tile of position pairs (each thread owns R x R entries,
// R = TILE / 16), rows past T read as zero.  Every thread of the block must
// call it.  R = 4 (TILE = 64) does 16 multiply-adds per 8 shared-memory reads
// where R = 2 does 4 per 4; R = 2 wastes less of a tile when T is small.
template <typename T, int TILE>
__device__ void tile_products(const T* __restrict__ X1, const T* __restrict__ X2, std::int64_t Tn, std::int64_t d,
                              std::int64_t r0, std::int64_t c0, T (&acc)[TILE / kThreads][TILE / kThreads],
                              T (*s1)[TILE + 1], T (*s2)[TILE + 1]) {
  constexpr int R = TILE / kThreads;
  const int tx = threadIdx.x, ty = threadIdx.y;
  const int tid = ty * kThreads + tx;
#pragma unroll
  for (int a = 0; a < R; ++a) {
#pragma unroll
    for (int b = 0; b < R; ++b) acc[a][b] = T(0);
  }
  for (std::int64_t k0 = 0; k0 < d; k0 += kChunk) {
    for (int l = tid; l < TILE * kChunk; l += kThreads * kThreads) {
      const int r = l / kChunk, k = l % kChunk;
      const std::int64_t kk = k0 + k;
      const bool in_k = kk < d;
      s1[k][r] = (in_k && r0 + r < Tn) ? X1[(r0 + r) * d + kk] : T(0);
      s2[k][r] = (in_k && c0 + r < Tn) ? X2[(c0 + r) * d + kk] : T(0);
    }
    __syncthreads();
#pragma unroll
    for (int k = 0; k < kChunk; ++k) {
      T av[R], bv[R];
#pragma unroll
      for (int a = 0; a < R; ++a) av[a] = s1[k][ty + kThreads * a];
#pragma unroll
      for (int b = 0; b < R; ++b) bv[b] = s2[k][tx + kThreads * b];
#pragma unroll
      for (int a = 0; a < R; ++a) {
#pragma unroll
        for (int b = 0; b < R; ++b) acc[a][b] += av[a] * bv[b];
      }
    }
    __syncthreads();
  }
}

template <typename T>
__device__ T block_sum(T v, T* red) {
  for (int off = 16; off > 0; off >>= 1) v += __shfl_down_sync(0xffffffffu, v, off);
  const int tid = threadIdx.y * kThreads + threadIdx.x;
  const int warp = tid / 32, lane = tid % 32;
  if (lane == 0) red[warp] = v;
  __syncthreads();
  T total = T(0);
  if (tid == 0) {
    for (int w = 0; w < (kThreads * kThreads) / 32; ++w) total += red[w];
  }
  __syncthreads();  // red is reused by the next call
  return total;
}

template <typename T, int TILE>
__global__ void gram_shared_kernel(const T* __restrict__ A, const T* __restrict__ E, T* __restrict__ K,
                                   std::int64_t N, std::int64_t S, std::int64_t Tn, std::int64_t da,
                                   std::int64_t de, std::int64_t tiles, T scale) {
  constexpr int R = TILE / kThreads;
  __shared__ T s1[kChunk][TILE + 1];
  __shared__ T s2[kChunk][TILE + 1];
  __shared__ T red[(kThreads * kThreads) / 32];
  std::int64_t i1, i2;
  pair_from_index(static_cast<std::int64_t>(blockIdx.x), N, i1, i2);
  const std::int64_t M = N * S;
  for (std::int64_t tp = blockIdx.y; tp < tiles * tiles; tp += gridDim.y) {
    const std::int64_t r0 = (tp / tiles) * TILE, c0 = (tp % tiles) * TILE;
    T pa[R][R];
    tile_products<T, TILE>(A + i1 * Tn * da, A + i2 * Tn * da, Tn, da, r0, c0, pa, s1, s2);
    for (std::int64_t a = 0; a < S; ++a) {
      for (std::int64_t b = 0; b < S; ++b) {
        T pe[R][R];
        tile_products<T, TILE>(E + (i1 * S + a) * Tn * de, E + (i2 * S + b) * Tn * de, Tn, de, r0, c0, pe, s1, s2);
        T part = T(0);
#pragma unroll
        for (int u = 0; u < R; ++u) {
#pragma unroll
          for (int v = 0; v < R; ++v) part += pa[u][v] * pe[u][v];
        }
        part = block_sum(part, red);
        if (threadIdx.x == 0 && threadIdx.y == 0) atomicAdd(&K[(i1 * S + a) * M + (i2 * S + b)], scale * part);
      }
    }
  }
}

// K[c2, c1] = K[c1, c2] for c1 < c2: the lower triangle from the upper one.
template <typename T>
__global__ void mirror_kernel(T* K, std::int64_t M) {
  const std::int64_t n = M * M;
  const std::int64_t stride = static_cast<std::int64_t>(blockDim.x) * gridDim.x;
  for (std::int64_t k = static_cast<std::int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; k < n; k += stride) {
    const std::int64_t r = k / M, c = k - r * M;
    if (r > c) K[k] = K[c * M + r];
  }
}

template <typename T, int TILE>
void launch_tiles(const T* A, const T* E, T* K, std::int64_t N, std::int64_t S, std::int64_t Tn, std::int64_t da,
                  std::int64_t de, std::int64_t pairs, double scale, cudaStream_t stream) {
  const std::int64_t tiles = (Tn + TILE - 1) / TILE;
  const dim3 grid(static_cast<unsigned>(pairs), static_cast<unsigned>(std::min<std::int64_t>(tiles * tiles, kMaxTileGrid)));
  const dim3 block(kThreads, kThreads);
  gram_shared_kernel<T, TILE><<<grid, block, 0, stream>>>(A, E, K, N, S, Tn, da, de, tiles, static_cast<T>(scale));
  cuda_check(cudaGetLastError(), "woodbury_gram launch");
}

template <typename T>
void launch(const void* A, const void* E, void* K, std::int64_t N, std::int64_t S, std::int64_t Tn, std::int64_t da,
            std::int64_t de, double scale, int tile, cudaStream_t stream) {
  const std::int64_t M = N * S;
  if (M == 0) return;
  cuda_check(cudaMemsetAsync(K, 0, static_cast<std::size_t>(M * M) * sizeof(T), stream), "woodbury_gram memset");
  const std::int64_t pairs = pair_count(N);
  if (pairs > 2147483647LL) throw std::runtime_error("kronlin._cuda: woodbury_gram: too many example pairs");
  if (Tn > 0) {
    if (tile == 0) tile = gram_tile_for(Tn, sizeof(T) == 8);
    const auto* a = static_cast<const T*>(A);
    const auto* e = static_cast<const T*>(E);
    auto* k = static_cast<T*>(K);
    if (tile == 128) {
      launch_tiles<T, 128>(a, e, k, N, S, Tn, da, de, pairs, scale, stream);
    } else if (tile == 64) {
      launch_tiles<T, 64>(a, e, k, N, S, Tn, da, de, pairs, scale, stream);
    } else {
      launch_tiles<T, 32>(a, e, k, N, S, Tn, da, de, pairs, scale, stream);
    }
  }
  constexpr int threads = 256;
  const int blocks = grid_1d(M * M, threads);
  mirror_kernel<T><<<blocks, threads, 0, stream>>>(static_cast<T*>(K), M);
  cuda_check(cudaGetLastError(), "woodbury_gram mirror launch");
}

}  // namespace

void woodbury_gram_shared_cuda(const void* A, const void* E, void* K, std::int64_t N, std::int64_t S,
                               std::int64_t T, std::int64_t da, std::int64_t de, double scale, bool is_double,
                               int tile, std::uintptr_t stream) {
  if (tile != 0 && tile != 32 && tile != 64 && tile != 128) {
    throw std::invalid_argument("kronlin._cuda: tile must be 0, 32, 64 or 128");
  }
  auto s = reinterpret_cast<cudaStream_t>(stream);
  if (is_double) {
    launch<double>(A, E, K, N, S, T, da, de, scale, tile, s);
  } else {
    launch<float>(A, E, K, N, S, T, da, de, scale, tile, s);
  }
}

int gram_tile_for(std::int64_t T, bool is_double) {
  // Measured on an H100 (bench/results/gpu-2026-11-26.md, N = 32, d_in = d_out = 64): speed-up over the
  // CuPy composition for tiles 32 / 64 / 128 was 5.6 / 4.7 / 3.0 at T = 16, 3.0 / 4.7 / 2.7 at T = 64,
  // 1.0 / 2.1 / 2.9 at T = 256 and 2.2 / 5.0 / 6.9 at T = 1024 (float32; float64 ranks the same, its
  // 128-tile spills 416 bytes and still wins): a tile that T fills, the largest one from 128 positions on.
  (void)is_double;
  if (T <= kGramSmallT) return 32;
  return T < 128 ? 64 : 128;
}

}  // namespace kronlin
