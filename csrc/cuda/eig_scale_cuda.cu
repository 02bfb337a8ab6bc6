// CUDA kernel of the eigenbasis-scaling family; CPU twin: csrc/cpu/eig_scale_cpu.cpp,
// NumPy reference: kronlin/_kernels/eig_scale.py::eig_scale_reference.
#include "cuda/eig_scale_cuda.h"

#include "common/eig_scale.h"
#include "cuda/cuda_utils.h"

namespace kronlin {
namespace {

template <typename T, PowerKind K>
__global__ void eig_scale_kernel(T* __restrict__ Y, const T* __restrict__ lg, const T* __restrict__ la,
                                 std::int64_t q, std::int64_t p, std::int64_t n, T shift, T power) {
  const std::int64_t stride = static_cast<std::int64_t>(blockDim.x) * gridDim.x;
  for (std::int64_t k = static_cast<std::int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; k < n; k += stride) {
    const std::int64_t r = k / p;  // row index over (B, q)
    const std::int64_t j = k - r * p;
    const std::int64_t b = r / q;
    Y[k] *= scale_factor<T, K>(lg[r] * la[b * p + j] + shift, power);
  }
}

template <typename T>
void launch(void* Y, const void* lg, const void* la, std::int64_t B, std::int64_t q, std::int64_t p,
            double shift, double power, cudaStream_t stream) {
  const std::int64_t n = B * q * p;
  if (n == 0) return;
  constexpr int threads = 256;
  const int blocks = grid_1d(n, threads);
  T* y = static_cast<T*>(Y);
  const T* g = static_cast<const T*>(lg);
  const T* a = static_cast<const T*>(la);
  const T s = static_cast<T>(shift);
  const T pw = static_cast<T>(power);
  switch (classify_power(power)) {
    case PowerKind::Inverse:
      eig_scale_kernel<T, PowerKind::Inverse><<<blocks, threads, 0, stream>>>(y, g, a, q, p, n, s, pw);
      break;
    case PowerKind::InvSqrt:
      eig_scale_kernel<T, PowerKind::InvSqrt><<<blocks, threads, 0, stream>>>(y, g, a, q, p, n, s, pw);
      break;
    case PowerKind::Sqrt:
      eig_scale_kernel<T, PowerKind::Sqrt><<<blocks, threads, 0, stream>>>(y, g, a, q, p, n, s, pw);
      break;
    case PowerKind::Identity:
      eig_scale_kernel<T, PowerKind::Identity><<<blocks, threads, 0, stream>>>(y, g, a, q, p, n, s, pw);
      break;
    default:
      eig_scale_kernel<T, PowerKind::General><<<blocks, threads, 0, stream>>>(y, g, a, q, p, n, s, pw);
      break;
  }
  cuda_check(cudaGetLastError(), "eig_scale launch");
}

}  // namespace

void eig_scale_cuda(void* Y, const void* lg, const void* la, std::int64_t B, std::int64_t q,
                    std::int64_t p, double shift, double power, bool is_double, std::uintptr_t stream) {
  auto s = reinterpret_cast<cudaStream_t>(stream);
  if (is_double) {
    launch<double>(Y, lg, la, B, q, p, shift, power, s);
  } else {
    launch<float>(Y, lg, la, B, q, p, shift, power, s);
  }
}

}  // namespace kronlin
