#pragma once
#include <cstdint>

namespace kronlin {

// Back-substitution of the generalized Sylvester / Stein equation in real
// generalized Schur form (Gardiner, Laub, Amato & Moler 1992, step 3):
//
//     S1 Y S2^T + sign * T1 Y T2^T = W,   S1, T1: (q, q);  S2, T2: (p, p);  W, Y: (q, p),
//
// S1, S2 quasi-upper-triangular (1x1 and 2x2 diagonal blocks; a 2x2 block
// starts at row i when S[i+1, i] != 0, scanning from the top), T1, T2 upper
// triangular.  Entries below that structure are never read (treated as zero).
// All matrices are C-contiguous; W is a C-contiguous batch (B, q, p) that is
// overwritten by Y.  sign is +1 or -1.
//
// Returns the smallest relative pivot met, min |pivot| / scale with
//     scale = max|S1| * max|S2| + max|T1| * max|T2|
// (max-abs entries within the structure), over the small dense systems (1x1,
// 2x2 or 4x4, Gaussian elimination with partial pivoting, first largest entry
// as pivot like LAPACK's idamax) solved for every pair of diagonal blocks.
// The pivots depend on S1, T1, S2, T2 only, not on W.  Returns +inf when
// there is nothing to solve (B, p or q zero) and 0 when scale is 0.  The
// caller decides what is singular (kronlin/_kernels/gsylv.py); an exactly
// zero pivot makes the affected entries of Y inf/NaN, never an exception.
template <typename T>
double gsylv_backsub_cpu(const T* S1, const T* T1, const T* S2, const T* T2, T* W, std::int64_t B,
                         std::int64_t q, std::int64_t p, int sign);

}  // namespace kronlin
