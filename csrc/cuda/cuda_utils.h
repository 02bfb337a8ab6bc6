// Shared CUDA utilities of kronlin._cuda: error checking and launch geometry.
// Used by every kernel family under csrc/cuda/ and by the bindings.
#pragma once

#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <stdexcept>
#include <string>

namespace kronlin {

// Throw std::runtime_error naming the failed step when a CUDA call did not succeed.
inline void cuda_check(cudaError_t err, const char* what) {
  if (err != cudaSuccess) {
    throw std::runtime_error(std::string("kronlin._cuda: ") + what + ": " + cudaGetErrorString(err));
  }
}

// Blocks of a grid-stride elementwise launch over n items (capped; the kernels loop).
inline int grid_1d(std::int64_t n, int threads) {
  const std::int64_t want = (n + threads - 1) / threads;
  return static_cast<int>(std::max<std::int64_t>(1, std::min<std::int64_t>(want, 65535LL * 8)));
}

}  // namespace kronlin
