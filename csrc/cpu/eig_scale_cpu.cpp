// CPU (OpenMP) kernel of the eigenbasis-scaling family; NumPy reference:
// kronlin/_kernels/eig_scale.py::eig_scale_reference.
#include "cpu/eig_scale_cpu.h"

#include "common/eig_scale.h"

namespace kronlin {
namespace {

// The scaling is memory-bound and O(pq) beside the O(pq(p+q)) GEMMs around it, so
// threads help only for very large arrays.  Below this many entries (32 MiB of
// float64) the step stays serial: an OpenMP team that ran here keeps spinning
// after the region (libgomp's default wait policy) and, on small machines,
// steals the cores of the OpenBLAS GEMM that follows: measured on 2 cores,
// a cached 192x256 KronEigh.solve went from 1.4 ms to 8 ms with a 2^15 threshold.
constexpr std::int64_t kParallelThreshold = std::int64_t(1) << 22;

template <typename T, PowerKind K>
void scale_rows(T* Y, const T* lg, const T* la, std::int64_t B, std::int64_t q, std::int64_t p, T shift,
                T power) {
  const std::int64_t rows = B * q;
#if defined(KRONLIN_HAVE_OPENMP)
#pragma omp parallel for schedule(static) if (rows * p >= kParallelThreshold)
#endif
  for (std::int64_t r = 0; r < rows; ++r) {
    const T g = lg[r];
    const T* a = la + (r / q) * p;
    T* y = Y + r * p;
    for (std::int64_t j = 0; j < p; ++j) {
      y[j] *= scale_factor<T, K>(g * a[j] + shift, power);
    }
  }
}

}  // namespace

template <typename T>
void eig_scale_cpu(T* Y, const T* lg, const T* la, std::int64_t B, std::int64_t q, std::int64_t p,
                   double shift, double power) {
  const T s = static_cast<T>(shift);
  const T pw = static_cast<T>(power);
  switch (classify_power(power)) {
    case PowerKind::Inverse: scale_rows<T, PowerKind::Inverse>(Y, lg, la, B, q, p, s, pw); break;
    case PowerKind::InvSqrt: scale_rows<T, PowerKind::InvSqrt>(Y, lg, la, B, q, p, s, pw); break;
    case PowerKind::Sqrt: scale_rows<T, PowerKind::Sqrt>(Y, lg, la, B, q, p, s, pw); break;
    case PowerKind::Identity: scale_rows<T, PowerKind::Identity>(Y, lg, la, B, q, p, s, pw); break;
    default: scale_rows<T, PowerKind::General>(Y, lg, la, B, q, p, s, pw); break;
  }
}

template void eig_scale_cpu<float>(float*, const float*, const float*, std::int64_t, std::int64_t,
                                   std::int64_t, double, double);
template void eig_scale_cpu<double>(double*, const double*, const double*, std::int64_t, std::int64_t,
                                    std::int64_t, double, double);

}  // namespace kronlin
