// CPU (OpenMP) kernel of the generalized-Sylvester back-substitution family;
// NumPy reference: kronlin/_kernels/gsylv.py::gsylv_backsub_reference.
//
// Solves S1 Y S2^T + sign * T1 Y T2^T = W (see gsylv_cpu.h) for the columns
// of Y from the last to the first (a 1x1 block of S2 gives one column, a 2x2
// block a coupled pair), in panels of about kPanel columns:
//
//   (a) the right-hand side of a panel J is W[:, J] minus, for every solved
//       column l right of it, S2[J, l] (S1 Y)[:, l] + sign T2[J, l] (T1 Y)[:, l].
//       The products S1 y_l and T1 y_l of solved columns are kept (SY, TY)
//       because (b) yields them as a by-product, so this is O(q) per (j, l)
//       pair, O(q p^2) in all, and each SY/TY column is read once per panel;
//   (b) the panel is solved by back-substitution over the row blocks I of S1
//       (bottom-up) and, inside each, over the panel's column blocks (right to
//       left): one 1x1, 2x2 or 4x4 dense system per pair of diagonal blocks
//       (the diagonal block of S1 (x) S2 + sign T1 (x) T2 restricted to I x J,
//       unknowns Y[i, j] ordered row-major over (i, j)).  The solved rows enter
//       through the running sums SY[:, l] = sum_{k solved} S1[:, k] Y[k, l] (and
//       TY), updated by unit-stride axpys with columns of S1 and T1
//       (column-major copies) that the compiler vectorizes: immediately for
//       the rows of the current chunk of ~kRowChunk rows, and for the rows
//       above it once the chunk is done, four columns of S1 per sweep.  S1 and
//       T1 stream once per panel instead of once per column: O(p q^2) in all.
//       When the panel is finished SY[:, J] is exactly S1 Y[:, J].
//
// Total O(p q (p + q)), the cost of the GEMMs that transform to and from the
// Schur basis.  Y is kept column-major in a per-thread scratch buffer (the
// input W is row-major (q, p); it is transposed in and out once per batch
// item).  Batch items run in parallel (OpenMP); one right-hand side runs on
// one thread.
#include "cpu/gsylv_cpu.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

namespace kronlin {
namespace {

// Columns of Y per panel of step (a): the panel's right-hand sides (kPanel * q
// entries) stay in L2 while the solved SY/TY columns stream past once.
constexpr std::int64_t kPanel = 32;
// Rows of S1 per chunk of step (b): a chunk's contributions to the rows above
// it are applied in one deferred update, four columns of S1 per sweep.
constexpr std::int64_t kRowChunk = 32;
// Below this much work (multiply-adds) a batch is not worth an OpenMP fork.
constexpr std::int64_t kParallelThreshold = std::int64_t(1) << 16;
// Tile of the (q, p) <-> column-major transposes.
constexpr std::int64_t kTile = 32;

// Diagonal block structure of a quasi-upper-triangular (n, n) row-major S:
// starts of the blocks, top-down, with n appended.  A 2x2 block starts at i
// when S[i+1, i] != 0 (LAPACK's convention; scanning top-down, so an invalid
// chain of nonzero subdiagonals is read as 2x2 blocks and the rest ignored --
// the binding rejects such input).
template <typename T>
std::vector<std::int64_t> block_starts(const T* S, std::int64_t n) {
  std::vector<std::int64_t> s;
  for (std::int64_t i = 0; i < n;) {
    s.push_back(i);
    i += (i + 1 < n && S[(i + 1) * n + i] != T(0)) ? 2 : 1;
  }
  s.push_back(n);
  return s;
}

// Is row k + 1 part of k's 2x2 block (i.e. may M[k + 1, k] be read)?
std::vector<char> pair_flags(const std::vector<std::int64_t>& starts) {
  const std::int64_t n = starts.back();
  std::vector<char> f(static_cast<std::size_t>(n), 0);
  for (std::size_t b = 0; b + 1 < starts.size(); ++b) {
    if (starts[b + 1] - starts[b] == 2) f[static_cast<std::size_t>(starts[b])] = 1;
  }
  return f;
}

// Column-major copy of the structured part of row-major M (upper triangle,
// plus the subdiagonal entries of 2x2 blocks when quasi); zero elsewhere.
template <typename T>
std::vector<T> structured_colmajor(const T* M, std::int64_t n, const std::vector<char>& pair, bool quasi) {
  std::vector<T> out(static_cast<std::size_t>(n * n), T(0));
  for (std::int64_t k = 0; k < n; ++k) {
    const std::int64_t last = (quasi && pair[k]) ? k + 1 : k;
    for (std::int64_t i = 0; i <= last; ++i) out[k * n + i] = M[i * n + k];
  }
  return out;
}

// max |M[i, j]| over the structured part of row-major M.
template <typename T>
double max_abs_structured(const T* M, std::int64_t n, const std::vector<char>& pair, bool quasi) {
  double m = 0.0;
  for (std::int64_t i = 0; i < n; ++i) {
    const std::int64_t first = (quasi && i > 0 && pair[i - 1]) ? i - 1 : i;
    for (std::int64_t j = first; j < n; ++j) m = std::max(m, static_cast<double>(std::fabs(M[i * n + j])));
  }
  return m;
}

// Solve the m x m (m <= 4) system M x = x in place by Gaussian elimination with
// partial pivoting (the first entry of largest magnitude is the pivot, as
// LAPACK's idamax; multipliers use the pivot's reciprocal, as dgetrf2).
// Returns the smallest |pivot|.
template <typename T>
T small_solve(T (&M)[4][4], T (&x)[4], int m) {
  T minpiv = std::numeric_limits<T>::infinity();
  for (int k = 0; k < m; ++k) {
    int r = k;
    T best = std::fabs(M[k][k]);
    for (int i = k + 1; i < m; ++i) {
      const T v = std::fabs(M[i][k]);
      if (v > best) {
        best = v;
        r = i;
      }
    }
    if (r != k) {
      for (int j = 0; j < m; ++j) std::swap(M[r][j], M[k][j]);
      std::swap(x[r], x[k]);
    }
    const T piv = M[k][k];
    minpiv = std::min(minpiv, std::fabs(piv));
    const bool recip = std::fabs(piv) >= std::numeric_limits<T>::min();
    const T rp = T(1) / piv;
    for (int i = k + 1; i < m; ++i) {
      const T l = recip ? M[i][k] * rp : M[i][k] / piv;
      for (int j = k + 1; j < m; ++j) M[i][j] -= l * M[k][j];
      x[i] -= l * x[k];
    }
  }
  for (int k = m - 1; k >= 0; --k) {
    T s = x[k];
    for (int j = k + 1; j < m; ++j) s -= M[k][j] * x[j];
    x[k] = s / M[k][k];
  }
  return minpiv;
}

// c[i] -= a * u[i] + b * v[i]
template <typename T>
inline void sub_axpy2(T* __restrict__ c, T a, const T* __restrict__ u, T b, const T* __restrict__ v,
                      std::int64_t n) {
  if (a == T(0) && b == T(0)) return;
  for (std::int64_t i = 0; i < n; ++i) c[i] -= a * u[i] + b * v[i];
}

// su[i] += s[i] * y;  tv[i] += t[i] * y
template <typename T>
inline void add_axpy2(T* __restrict__ su, T* __restrict__ tv, const T* __restrict__ s, const T* __restrict__ t,
                      T y, std::int64_t n) {
  if (y == T(0)) return;
  for (std::int64_t i = 0; i < n; ++i) {
    su[i] += s[i] * y;
    tv[i] += t[i] * y;
  }
}

// su[i] += s0[i] * y0 + s1[i] * y1;  tv[i] += t0[i] * y0 + t1[i] * y1
template <typename T>
inline void add2_axpy2(T* __restrict__ su, T* __restrict__ tv, const T* __restrict__ s0, const T* __restrict__ t0,
                       T y0, const T* __restrict__ s1, const T* __restrict__ t1, T y1, std::int64_t n) {
  for (std::int64_t i = 0; i < n; ++i) {
    su[i] += s0[i] * y0 + s1[i] * y1;
    tv[i] += t0[i] * y0 + t1[i] * y1;
  }
}

// c[i] -= sum_{r < 4} a_r * u_r[i] + b_r * v_r[i]: four solved columns per sweep of c.
template <typename T>
inline void sub_axpy2x4(T* __restrict__ c, const T (&a)[4], const T (&b)[4], const T* __restrict__ u0,
                        const T* __restrict__ v0, const T* __restrict__ u1, const T* __restrict__ v1,
                        const T* __restrict__ u2, const T* __restrict__ v2, const T* __restrict__ u3,
                        const T* __restrict__ v3, std::int64_t n) {
  const T a0 = a[0], a1 = a[1], a2 = a[2], a3 = a[3], b0 = b[0], b1 = b[1], b2 = b[2], b3 = b[3];
  for (std::int64_t i = 0; i < n; ++i) {
    c[i] -= ((a0 * u0[i] + b0 * v0[i]) + (a1 * u1[i] + b1 * v1[i])) +
            ((a2 * u2[i] + b2 * v2[i]) + (a3 * u3[i] + b3 * v3[i]));
  }
}

// su[i] += sum_{r < 4} s_r[i] * y_r;  tv[i] += sum_{r < 4} t_r[i] * y_r: four rows of Y per sweep.
template <typename T>
inline void add_axpy2x4(T* __restrict__ su, T* __restrict__ tv, const T* __restrict__ S, const T* __restrict__ Tm,
                        std::int64_t ld, const T* __restrict__ y, std::int64_t n) {
  const T* s0 = S;
  const T* s1 = S + ld;
  const T* s2 = S + 2 * ld;
  const T* s3 = S + 3 * ld;
  const T* t0 = Tm;
  const T* t1 = Tm + ld;
  const T* t2 = Tm + 2 * ld;
  const T* t3 = Tm + 3 * ld;
  const T y0 = y[0], y1 = y[1], y2 = y[2], y3 = y[3];
  for (std::int64_t i = 0; i < n; ++i) {
    su[i] += (s0[i] * y0 + s1[i] * y1) + (s2[i] * y2 + s3[i] * y3);
    tv[i] += (t0[i] * y0 + t1[i] * y1) + (t2[i] * y2 + t3[i] * y3);
  }
}

template <typename T>
struct Problem {
  const T* S1c;  // (q, q) column-major, structured part only
  const T* T1c;
  const T* S2;  // (p, p) row-major
  const T* T2;
  const std::int64_t* b1;  // block starts of S1 (nb1 + 1 entries)
  const std::int64_t* b2;  // block starts of S2 (nb2 + 1 entries)
  std::int64_t nb1, nb2, q, p;
  T sigma;
};

// Y (column-major, leading dimension q) <-> W (row-major (q, p)), tile by tile.
template <typename T>
void to_colmajor(const T* W, T* Yc, std::int64_t q, std::int64_t p) {
  for (std::int64_t i0 = 0; i0 < q; i0 += kTile)
    for (std::int64_t j0 = 0; j0 < p; j0 += kTile) {
      const std::int64_t i1 = std::min(q, i0 + kTile), j1 = std::min(p, j0 + kTile);
      for (std::int64_t j = j0; j < j1; ++j)
        for (std::int64_t i = i0; i < i1; ++i) Yc[j * q + i] = W[i * p + j];
    }
}

template <typename T>
void to_rowmajor(const T* Yc, T* W, std::int64_t q, std::int64_t p) {
  for (std::int64_t i0 = 0; i0 < q; i0 += kTile)
    for (std::int64_t j0 = 0; j0 < p; j0 += kTile) {
      const std::int64_t i1 = std::min(q, i0 + kTile), j1 = std::min(p, j0 + kTile);
      for (std::int64_t i = i0; i < i1; ++i)
        for (std::int64_t j = j0; j < j1; ++j) W[i * p + j] = Yc[j * q + i];
    }
}

// Working state of one right-hand side: Y column-major (its columns start as
// the right-hand sides and are overwritten by the solution), SY/TY the running
// products with S1/T1, and for the current row block I the complete values
// uI[r][l] = (S1 Y)[i0 + r, j0p + l], vI likewise, over the panel's columns.
template <typename T>
struct State {
  T* Yc;
  T* SY;
  T* TY;
  T uI[2][kPanel + 2];
  T vI[2][kPanel + 2];
};

// (a) Columns [j0p, j1p) lose the contributions of every solved column l >= j1p,
// four solved columns per sweep.
template <typename T>
void panel_update(const Problem<T>& P, State<T>& st, std::int64_t j0p, std::int64_t j1p) {
  const std::int64_t q = P.q, p = P.p;
  const T sigma = P.sigma;
  std::int64_t l = j1p;
  for (; l + 4 <= p; l += 4) {
    const T* sy = st.SY + l * q;
    const T* ty = st.TY + l * q;
    for (std::int64_t j = j0p; j < j1p; ++j) {
      const T* s2 = P.S2 + j * p + l;
      const T* t2 = P.T2 + j * p + l;
      const T a[4] = {s2[0], s2[1], s2[2], s2[3]};
      const T b[4] = {sigma * t2[0], sigma * t2[1], sigma * t2[2], sigma * t2[3]};
      sub_axpy2x4(st.Yc + j * q, a, b, sy, ty, sy + q, ty + q, sy + 2 * q, ty + 2 * q, sy + 3 * q, ty + 3 * q, q);
    }
  }
  for (; l < p; ++l) {
    for (std::int64_t j = j0p; j < j1p; ++j) {
      sub_axpy2(st.Yc + j * q, P.S2[j * p + l], st.SY + l * q, sigma * P.T2[j * p + l], st.TY + l * q, q);
    }
  }
}

// (b) Row block I = [i0, i0 + m) of the panel's column blocks [bstart, bend):
// one small system per column block, right to left.  Returns the smallest pivot.
template <typename T>
T solve_row_block(const Problem<T>& P, State<T>& st, std::int64_t bstart, std::int64_t bend, std::int64_t i0,
                  int m) {
  const std::int64_t q = P.q, p = P.p, j0p = P.b2[bstart], w = P.b2[bend] - j0p;
  const T sigma = P.sigma;
  T minpiv = std::numeric_limits<T>::infinity();
  T s1[2][2] = {{0, 0}, {0, 0}}, t1[2][2] = {{0, 0}, {0, 0}};
  for (int r = 0; r < m; ++r) {
    for (int rr = 0; rr < m; ++rr) {
      s1[r][rr] = P.S1c[(i0 + rr) * q + i0 + r];
      t1[r][rr] = P.T1c[(i0 + rr) * q + i0 + r];
    }
    for (std::int64_t l = 0; l < w; ++l) {  // sums over the solved rows k > I
      st.uI[r][l] = st.SY[(j0p + l) * q + i0 + r];
      st.vI[r][l] = st.TY[(j0p + l) * q + i0 + r];
    }
  }
  for (std::int64_t bj = bend - 1; bj >= bstart; --bj) {
    const std::int64_t j0 = P.b2[bj];
    const int n = static_cast<int>(P.b2[bj + 1] - j0);
    const std::int64_t lc = j0 - j0p;  // panel index of the block's first column
    // the small system: unknowns and equations Y[i0 + r, j0 + c] at index r * n + c
    T M[4][4], x[4];
    for (int c = 0; c < n; ++c) {
      const std::int64_t j = j0 + c;
      const T* s2row = P.S2 + j * p + j0p;
      const T* t2row = P.T2 + j * p + j0p;
      T s2[2], t2[2];
      for (int cc = 0; cc < n; ++cc) {
        s2[cc] = s2row[lc + cc];
        t2[cc] = cc >= c ? sigma * t2row[lc + cc] : T(0);  // T2 is triangular
      }
      for (int r = 0; r < m; ++r) {
        // uI/vI hold partial sums (rows k > I) for this block's columns and
        // complete sums for the solved columns right of it
        T rhs = st.Yc[j * q + i0 + r];
        for (std::int64_t l = lc; l < w; ++l) {
          const T a = s2row[l], b = j0p + l >= j ? sigma * t2row[l] : T(0);
          rhs -= a * st.uI[r][l] + b * st.vI[r][l];
        }
        const int e = r * n + c;
        x[e] = rhs;
        for (int rr = 0; rr < m; ++rr)
          for (int cc = 0; cc < n; ++cc) M[e][rr * n + cc] = s1[r][rr] * s2[cc] + t1[r][rr] * t2[cc];
      }
    }
    minpiv = std::min(minpiv, small_solve(M, x, m * n));
    for (int c = 0; c < n; ++c) {
      const std::int64_t l = lc + c;
      for (int rr = 0; rr < m; ++rr) st.Yc[(j0 + c) * q + i0 + rr] = x[rr * n + c];
      for (int r = 0; r < m; ++r) {  // complete the sums of rows I for this column
        T su = 0, tv = 0;
        for (int rr = 0; rr < m; ++rr) {
          su += s1[r][rr] * x[rr * n + c];
          tv += t1[r][rr] * x[rr * n + c];
        }
        st.uI[r][l] += su;
        st.vI[r][l] += tv;
      }
    }
  }
  return minpiv;
}

// One right-hand side: W (q, p) row-major in, Y out.  Yc, SY, TY: q*p scratch.
template <typename T>
T solve_one(const Problem<T>& P, T* W, T* Yc, T* SY, T* TY) {
  const std::int64_t q = P.q, p = P.p;
  State<T> st;
  st.Yc = Yc;
  st.SY = SY;
  st.TY = TY;
  to_colmajor(W, Yc, q, p);
  T minpiv = std::numeric_limits<T>::infinity();
  std::int64_t bend = P.nb2;  // the panel is the column blocks [bstart, bend)
  while (bend > 0) {
    std::int64_t bstart = bend - 1;
    while (bstart > 0 && P.b2[bend] - P.b2[bstart - 1] <= kPanel) --bstart;
    const std::int64_t j0p = P.b2[bstart], j1p = P.b2[bend], w = j1p - j0p;
    panel_update(P, st, j0p, j1p);
    std::fill(SY + j0p * q, SY + j1p * q, T(0));
    std::fill(TY + j0p * q, TY + j1p * q, T(0));
    // (b) row chunks [r0, r1) bottom-up, row blocks inside them bottom-up
    std::int64_t cend = P.nb1;  // the chunk is the row blocks [cstart, cend)
    while (cend > 0) {
      std::int64_t cstart = cend - 1;
      while (cstart > 0 && P.b1[cend] - P.b1[cstart - 1] <= kRowChunk) --cstart;
      const std::int64_t r0 = P.b1[cstart], r1 = P.b1[cend];
      for (std::int64_t bi = cend - 1; bi >= cstart; --bi) {
        const std::int64_t i0 = P.b1[bi];
        const int m = static_cast<int>(P.b1[bi + 1] - i0);
        minpiv = std::min(minpiv, solve_row_block(P, st, bstart, bend, i0, m));
        // rows I of SY/TY are complete; columns I of S1/T1 reach the rows
        // above: now the chunk's rows [r0, i0), the rows above the chunk later
        for (std::int64_t lp = 0; lp < w; ++lp) {
          T* sy = SY + (j0p + lp) * q;
          T* ty = TY + (j0p + lp) * q;
          for (int r = 0; r < m; ++r) {
            sy[i0 + r] = st.uI[r][lp];
            ty[i0 + r] = st.vI[r][lp];
          }
          const T* yl = Yc + (j0p + lp) * q + i0;
          const T* s = P.S1c + i0 * q + r0;
          const T* t = P.T1c + i0 * q + r0;
          if (m == 1) {
            add_axpy2(sy + r0, ty + r0, s, t, yl[0], i0 - r0);
          } else {
            add2_axpy2(sy + r0, ty + r0, s, t, yl[0], s + q, t + q, yl[1], i0 - r0);
          }
        }
      }
      // deferred: rows [0, r0) receive the chunk's rows [r0, r1), four per sweep
      for (std::int64_t lp = 0; r0 > 0 && lp < w; ++lp) {
        T* sy = SY + (j0p + lp) * q;
        T* ty = TY + (j0p + lp) * q;
        const T* yl = Yc + (j0p + lp) * q;
        std::int64_t k = r0;
        for (; k + 4 <= r1; k += 4) add_axpy2x4(sy, ty, P.S1c + k * q, P.T1c + k * q, q, yl + k, r0);
        for (; k < r1; ++k) add_axpy2(sy, ty, P.S1c + k * q, P.T1c + k * q, yl[k], r0);
      }
      cend = cstart;
    }
    bend = bstart;
  }
  to_rowmajor(Yc, W, q, p);
  return minpiv;
}

}  // namespace

template <typename T>
double gsylv_backsub_cpu(const T* S1, const T* T1, const T* S2, const T* T2, T* W, std::int64_t B,
                         std::int64_t q, std::int64_t p, int sign) {
  if (B <= 0 || q <= 0 || p <= 0) return std::numeric_limits<double>::infinity();
  const std::vector<std::int64_t> b1 = block_starts(S1, q), b2 = block_starts(S2, p);
  const std::vector<char> pair1 = pair_flags(b1), pair2 = pair_flags(b2);
  const std::vector<T> S1c = structured_colmajor(S1, q, pair1, true);
  const std::vector<T> T1c = structured_colmajor(T1, q, pair1, false);
  const double scale = max_abs_structured(S1, q, pair1, true) * max_abs_structured(S2, p, pair2, true) +
                       max_abs_structured(T1, q, pair1, false) * max_abs_structured(T2, p, pair2, false);
  Problem<T> P{S1c.data(), T1c.data(), S2, T2, b1.data(), b2.data(),
               static_cast<std::int64_t>(b1.size()) - 1, static_cast<std::int64_t>(b2.size()) - 1, q, p,
               sign < 0 ? T(-1) : T(1)};
  const std::int64_t work = B * q * p * (q + p);
  T minpiv = std::numeric_limits<T>::infinity();
#if defined(KRONLIN_HAVE_OPENMP)
#pragma omp parallel if (B > 1 && work >= kParallelThreshold)
#endif
  {
    std::vector<T> Yc(static_cast<std::size_t>(q * p)), SY(Yc.size()), TY(Yc.size());
    T local = std::numeric_limits<T>::infinity();
#if defined(KRONLIN_HAVE_OPENMP)
#pragma omp for schedule(static)
#endif
    for (std::int64_t b = 0; b < B; ++b) {
      local = std::min(local, solve_one(P, W + b * q * p, Yc.data(), SY.data(), TY.data()));
    }
#if defined(KRONLIN_HAVE_OPENMP)
#pragma omp critical(kronlin_gsylv_minpiv)
#endif
    minpiv = std::min(minpiv, local);
  }
  (void)work;
  if (!(scale > 0.0)) return 0.0;
  return static_cast<double>(minpiv) / scale;
}

template double gsylv_backsub_cpu<float>(const float*, const float*, const float*, const float*, float*,
                                         std::int64_t, std::int64_t, std::int64_t, int);
template double gsylv_backsub_cpu<double>(const double*, const double*, const double*, const double*, double*,
                                          std::int64_t, std::int64_t, std::int64_t, int);

}  // namespace kronlin
