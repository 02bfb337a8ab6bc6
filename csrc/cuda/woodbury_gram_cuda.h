#pragma once
#include <cstdint>

namespace kronlin {

// CUDA twin of woodbury_gram_shared_cpu (called by csrc/bindings_cuda.cpp after
// it has checked every operand): device pointers to C-contiguous
// A (N, T, da), E (N*S, T, de) and the output K (N*S, N*S) of float
// (is_double = false) or double, which is zeroed, accumulated and mirrored
// on `stream` (a cudaStream_t as an integer, 0 for the legacy default stream):
//     K[c1, c2] = scale * sum_{t, t'} (A[c1/S, t] . A[c2/S, t']) (E[c1, t] . E[c2, t']).
// One thread block per (example pair, tile x tile positions); partial sums
// are added with atomics, so the summation order (not the result, to
// rounding) varies between runs.  `tile` is 32, 64, 128, or 0 for
// gram_tile_for(T, is_double).  Throws std::runtime_error on a CUDA error.
void woodbury_gram_shared_cuda(const void* A, const void* E, void* K, std::int64_t N, std::int64_t S,
                               std::int64_t T, std::int64_t da, std::int64_t de, double scale, bool is_double,
                               int tile, std::uintptr_t stream);

// Up to this many positions the 32 x 32 tile wastes less than the larger ones gain.
constexpr std::int64_t kGramSmallT = 32;

// The tile woodbury_gram_shared_cuda uses for T positions when `tile` is 0.
int gram_tile_for(std::int64_t T, bool is_double);

}  // namespace kronlin
