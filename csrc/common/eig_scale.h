// Shared math of the eigenbasis-scaling kernel family (CPU and CUDA).
//
// KronEigh.solve/apply computes Y = Qg^T X Qa, scales every entry
//     Y[b, i, j] *= (lg[b, i] * la[b, j] + shift) ** power,
// and transforms back.  The scaling is done in place from the two eigenvalue
// vectors, so the (q, p) array of denominators never exists in memory.
#pragma once

#include <cmath>
#include <cstdint>

#include "common/hd.h"

namespace kronlin {

// Powers with a cheaper closed form than pow(); General falls back to pow().
enum class PowerKind : int { Inverse = 0, InvSqrt = 1, Sqrt = 2, Identity = 3, General = 4 };

inline PowerKind classify_power(double power) {
  if (power == -1.0) return PowerKind::Inverse;
  if (power == -0.5) return PowerKind::InvSqrt;
  if (power == 0.5) return PowerKind::Sqrt;
  if (power == 1.0) return PowerKind::Identity;
  return PowerKind::General;
}

template <typename T, PowerKind K>
KRONLIN_HD T scale_factor(T d, T power) {
  if constexpr (K == PowerKind::Inverse) {
    return T(1) / d;
  } else if constexpr (K == PowerKind::InvSqrt) {
    return T(1) / sqrt(d);
  } else if constexpr (K == PowerKind::Sqrt) {
    return sqrt(d);
  } else if constexpr (K == PowerKind::Identity) {
    return d;
  } else {
    return pow(d, power);
  }
}

}  // namespace kronlin
