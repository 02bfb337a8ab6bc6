#pragma once
#include <cstdint>

namespace kronlin {

// In-place eigenbasis scaling on a C-contiguous (B, q, p) array:
// Y[b, i, j] *= (lg[b, i] * la[b, j] + shift) ** power.
// lg is (B, q) and la is (B, p), both C-contiguous.
template <typename T>
void eig_scale_cpu(T* Y, const T* lg, const T* la, std::int64_t B, std::int64_t q, std::int64_t p,
                   double shift, double power);

}  // namespace kronlin
