#pragma once
#include <cstdint>

namespace kronlin {

// Per-example Gram of a weight-sharing layer (see csrc/common/woodbury_gram.h):
//     K[c1, c2] = scale * sum_{t, t'} (A[c1/S, t] . A[c2/S, t']) (E[c1, t] . E[c2, t'])
// for C-contiguous A (N, T, da), E (N*S, T, de) and K (N*S, N*S), which is
// written completely (both triangles, exactly symmetric).  Tiles over the
// positions (t, t'): the working set is a few rows of A and E per thread, never
// the (N*T) x (N*T) products.  OpenMP over example pairs; SIMD width picked at
// run time (AVX-512, AVX2+FMA or the baseline ISA) on x86-64.  Every example
// is packed once into a shared copy when that copy takes at most
// `prepack_bytes` (negative: the default, 256 MiB); otherwise each thread
// repacks the examples of the pair it works on.
template <typename T>
void woodbury_gram_shared_cpu(const T* A, const T* E, T* K, std::int64_t N, std::int64_t S, std::int64_t T_,
                              std::int64_t da, std::int64_t de, double scale, std::int64_t prepack_bytes = -1);

// The instruction set the kernel dispatches to on this machine ("avx512", "avx2" or "baseline");
// the environment variable KRONLIN_WOODBURY_ISA=baseline|avx2, read once per process, selects a
// narrower path (for tests and benchmarks; never an instruction set the CPU lacks).
const char* woodbury_gram_isa();

}  // namespace kronlin
