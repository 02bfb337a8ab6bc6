// Python bindings of kronlin._C, the CPU kernels.  The public package validates
// every argument before it calls in here; the checks below guard the internal
// contract (dtype, layout, shapes) and raise instead of reading out of bounds.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstdint>
#include <stdexcept>
#include <string>
#include <vector>

#include "cpu/block_apply_cpu.h"
#include "cpu/cholesky_cpu.h"
#include "cpu/eig_scale_cpu.h"
#include "cpu/woodbury_gram_cpu.h"
#include "cpu/gsylv_cpu.h"
#include "cpu/norms_cpu.h"
#include "cpu/symmetric_cpu.h"

#if defined(KRONLIN_HAVE_OPENMP)
#include <omp.h>
#endif

namespace py = pybind11;

namespace {

void require(bool ok, const std::string& msg) {
  if (!ok) throw std::invalid_argument("kronlin._C: " + msg);
}

bool c_contiguous(const py::array& a) { return (a.flags() & py::array::c_style) != 0; }

// dtype tests by NumPy's equivalence, not by object identity (handle::is): an unpickled array, or one
// read from a file or received over MPI, carries its own float64 descriptor, equal to but not the
// canonical one (it was refused as "not float32 or float64"); a byte-swapped one is not equivalent.
bool same_dtype(const py::array& a, const py::array& b) {
  return py::detail::npy_api::get().PyArray_EquivTypes_(a.dtype().ptr(), b.dtype().ptr());
}

template <typename T>
bool has_dtype(const py::array& a) {
  return py::detail::npy_api::get().PyArray_EquivTypes_(a.dtype().ptr(), py::dtype::of<T>().ptr());
}

template <typename T>
void eig_scale_typed(py::array& Y, const py::array& lg, const py::array& la, double shift, double power) {
  const auto B = Y.shape(0), q = Y.shape(1), p = Y.shape(2);
  auto* y = static_cast<T*>(Y.mutable_data());
  const auto* g = static_cast<const T*>(lg.data());
  const auto* a = static_cast<const T*>(la.data());
  py::gil_scoped_release release;
  kronlin::eig_scale_cpu<T>(y, g, a, B, q, p, shift, power);
}

void eig_scale(py::array Y, py::array lg, py::array la, double shift, double power) {
  require(Y.ndim() == 3 && lg.ndim() == 2 && la.ndim() == 2, "expected Y (B, q, p), lg (B, q), la (B, p)");
  require(lg.shape(0) == Y.shape(0) && la.shape(0) == Y.shape(0) && lg.shape(1) == Y.shape(1) &&
              la.shape(1) == Y.shape(2),
          "shapes of Y, lg and la do not agree");
  require(c_contiguous(Y) && c_contiguous(lg) && c_contiguous(la), "arrays must be C-contiguous");
  require(Y.writeable(), "Y must be writeable");
  require(same_dtype(Y, lg) && same_dtype(Y, la), "Y, lg and la must share one dtype");
  if (has_dtype<double>(Y)) {
    eig_scale_typed<double>(Y, lg, la, shift, power);
  } else if (has_dtype<float>(Y)) {
    eig_scale_typed<float>(Y, lg, la, shift, power);
  } else {
    throw std::invalid_argument("kronlin._C: dtype must be float32 or float64");
  }
}

// gsylv_backsub: the quasi-triangular back-substitution of the generalized
// Sylvester solver (kronlin/_kernels/gsylv.py, kronlin/stein/schur.py).
bool quasi_triangular_ok(const py::array& S) {
  // no two consecutive nonzero subdiagonal entries (2x2 blocks at most)
  const auto n = S.shape(0);
  auto check = [&](auto* s) {
    for (py::ssize_t i = 0; i + 2 < n; ++i) {
      if (s[(i + 1) * n + i] != 0 && s[(i + 2) * n + i + 1] != 0) return false;
    }
    return true;
  };
  if (has_dtype<double>(S)) return check(static_cast<const double*>(S.data()));
  return check(static_cast<const float*>(S.data()));
}

template <typename T>
double gsylv_backsub_typed(const py::array& S1, const py::array& T1, const py::array& S2, const py::array& T2,
                           py::array& W, int sign) {
  const auto B = W.shape(0), q = W.shape(1), p = W.shape(2);
  const auto* s1 = static_cast<const T*>(S1.data());
  const auto* t1 = static_cast<const T*>(T1.data());
  const auto* s2 = static_cast<const T*>(S2.data());
  const auto* t2 = static_cast<const T*>(T2.data());
  auto* w = static_cast<T*>(W.mutable_data());
  py::gil_scoped_release release;
  return kronlin::gsylv_backsub_cpu<T>(s1, t1, s2, t2, w, B, q, p, sign);
}

double gsylv_backsub(py::array S1, py::array T1, py::array S2, py::array T2, py::array W, int sign) {
  require(W.ndim() == 3 && S1.ndim() == 2 && T1.ndim() == 2 && S2.ndim() == 2 && T2.ndim() == 2,
          "expected S1, T1 (q, q), S2, T2 (p, p) and W (B, q, p)");
  const auto q = W.shape(1), p = W.shape(2);
  require(S1.shape(0) == q && S1.shape(1) == q && T1.shape(0) == q && T1.shape(1) == q,
          "S1 and T1 must be (q, q) with q = W.shape[1] = " + std::to_string(q));
  require(S2.shape(0) == p && S2.shape(1) == p && T2.shape(0) == p && T2.shape(1) == p,
          "S2 and T2 must be (p, p) with p = W.shape[2] = " + std::to_string(p));
  require(c_contiguous(S1) && c_contiguous(T1) && c_contiguous(S2) && c_contiguous(T2) && c_contiguous(W),
          "arrays must be C-contiguous");
  require(W.writeable(), "W must be writeable");
  require(same_dtype(W, S1) && same_dtype(W, T1) && same_dtype(W, S2) &&
              same_dtype(W, T2),
          "S1, T1, S2, T2 and W must share one dtype");
  require(sign == 1 || sign == -1, "sign must be +1 or -1");
  const bool f64 = has_dtype<double>(W);
  if (!f64 && !has_dtype<float>(W)) {
    throw std::invalid_argument("kronlin._C: dtype must be float32 or float64");
  }
  require(quasi_triangular_ok(S1) && quasi_triangular_ok(S2),
          "S1 and S2 must be quasi-upper-triangular (1x1 and 2x2 diagonal blocks)");
  return f64 ? gsylv_backsub_typed<double>(S1, T1, S2, T2, W, sign)
             : gsylv_backsub_typed<float>(S1, T1, S2, T2, W, sign);
}

// The symmetric-matrix family (kronlin/_kernels/symmetric.py): C-contiguous (B, n, n) float stacks.
void require_square_stack(const py::array& x) {
  require(x.ndim() == 3 && x.shape(1) == x.shape(2), "expected a (B, n, n) stack of square matrices");
  require(c_contiguous(x), "the stack must be C-contiguous");
  require(has_dtype<double>(x) || has_dtype<float>(x),
          "dtype must be float32 or float64");
}

py::tuple asymmetry(py::array x) {
  require_square_stack(x);
  double asym = 0.0, scale = 0.0;
  const auto B = x.shape(0), n = x.shape(1);
  const bool f64 = has_dtype<double>(x);
  const void* data = x.data();
  {
    py::gil_scoped_release release;
    if (f64) {
      kronlin::asymmetry_cpu<double>(static_cast<const double*>(data), B, n, &asym, &scale);
    } else {
      kronlin::asymmetry_cpu<float>(static_cast<const float*>(data), B, n, &asym, &scale);
    }
  }
  return py::make_tuple(asym, scale);
}

// The data of a list of B C-contiguous (rows, cols) NumPy matrices of `like`'s dtype, with the references that
// keep them alive while the GIL is released.
struct MatrixList {
  std::vector<py::array> keep;
  std::vector<const void*> data;
};

// Whether h is a matrix the kernels read in place: a numpy.ndarray itself (no subclass: a masked array's data
// is not its values), aligned, C-contiguous, (rows, cols), of like's dtype.
bool matrix_in_place(py::handle h, std::int64_t rows, std::int64_t cols, const py::array& like) {
  if (Py_TYPE(h.ptr()) != py::detail::npy_api::get().PyArray_Type_) return false;
  auto x = py::reinterpret_borrow<py::array>(h);
  return x.ndim() == 2 && x.shape(0) == rows && x.shape(1) == cols && c_contiguous(x) &&
         (x.flags() & py::detail::npy_api::NPY_ARRAY_ALIGNED_) != 0 && same_dtype(x, like);
}

// xs (B of them, or an error naming the list `what`) as a MatrixList, or false (out partly filled) at the first
// entry that is not a matrix_in_place.
bool matrices_in_place(const py::list& xs, std::int64_t B, std::int64_t rows, std::int64_t cols, const py::array& like,
                       const char* what, MatrixList& out) {
  require(static_cast<std::int64_t>(py::len(xs)) == B,
          std::string(what) + " must hold one matrix per matrix of the stacks");
  out.keep.reserve(static_cast<std::size_t>(B));
  out.data.reserve(static_cast<std::size_t>(B));
  for (std::size_t b = 0; b < static_cast<std::size_t>(B); ++b) {
    py::handle h = xs[b];
    if (!matrix_in_place(h, rows, cols, like)) return false;
    auto x = py::reinterpret_borrow<py::array>(h);
    out.data.push_back(x.data());
    out.keep.push_back(x);
  }
  return true;
}

// The stack_asymmetry kernel, or None, copying nothing, when some xs[b] is not a matrix_in_place (the caller
// takes its reference).
py::object stack_asymmetry(py::list xs, py::array out) {
  require_square_stack(out);
  require(out.writeable(), "out must be writeable");
  const auto B = out.shape(0), n = out.shape(1);
  MatrixList xl;
  if (!matrices_in_place(xs, B, n, n, out, "xs", xl)) return py::none();
  const void* const* ptrs = xl.data.data();
  double asym = 0.0, scale = 0.0;
  const bool f64 = has_dtype<double>(out);
  void* o = out.mutable_data();
  {
    py::gil_scoped_release release;
    if (f64) {
      kronlin::stack_asymmetry_cpu<double>(reinterpret_cast<const double* const*>(ptrs), B, n,
                                           static_cast<double*>(o), &asym, &scale);
    } else {
      kronlin::stack_asymmetry_cpu<float>(reinterpret_cast<const float* const*>(ptrs), B, n,
                                          static_cast<float*>(o), &asym, &scale);
    }
  }
  return py::make_tuple(asym, scale);
}

void mirror_lower(py::array x) {
  require_square_stack(x);
  require(x.writeable(), "the stack must be writeable");
  const auto B = x.shape(0), n = x.shape(1);
  const bool f64 = has_dtype<double>(x);
  void* data = x.mutable_data();
  py::gil_scoped_release release;
  if (f64) {
    kronlin::mirror_lower_cpu<double>(static_cast<double*>(data), B, n);
  } else {
    kronlin::mirror_lower_cpu<float>(static_cast<float*>(data), B, n);
  }
}

// A SciPy BLAS or LAPACK routine (scipy.linalg.cython_blas / cython_lapack) from the address the package passes.
template <typename Fn>
Fn routine_at(std::uintptr_t address) {
  require(address != 0, "a BLAS or LAPACK routine's address is 0");
  return reinterpret_cast<Fn>(address);
}

// The Cholesky family (kronlin/_kernels/cholesky.py): C-contiguous (B, n, n) float stacks and the addresses of
// SciPy's ?potrf / ?potri (scipy.linalg.cython_lapack) for their dtype; returns LAPACK's info per matrix.

py::array_t<std::int32_t> potrf_stack(py::array S, py::array out, std::uintptr_t potrf) {
  require_square_stack(S);
  require_square_stack(out);
  require(out.writeable(), "out must be writeable");
  require(same_dtype(S, out) && S.shape(0) == out.shape(0) && S.shape(1) == out.shape(1),
          "S and out must have one dtype and shape");
  require(S.shape(1) < (std::int64_t(1) << 31), "the order exceeds LAPACK's 32-bit integers");
  const auto B = S.shape(0), n = S.shape(1);
  py::array_t<std::int32_t> info(B);
  auto* inf = info.mutable_data();
  const bool f64 = has_dtype<double>(S);
  const void* s = S.data();
  void* o = out.mutable_data();
  py::gil_scoped_release release;
  if (f64) {
    kronlin::potrf_stack_cpu<double>(static_cast<const double*>(s), static_cast<double*>(o), B, n,
                                     routine_at<kronlin::lapack_chol_fn<double>>(potrf), inf);
  } else {
    kronlin::potrf_stack_cpu<float>(static_cast<const float*>(s), static_cast<float*>(o), B, n,
                                    routine_at<kronlin::lapack_chol_fn<float>>(potrf), inf);
  }
  return info;
}

template <typename T>
kronlin::RecursiveInverse<T> recursive_inverse(const std::vector<std::uintptr_t>& a) {
  return {routine_at<kronlin::blas_gemm_fn<T>>(a[0]), routine_at<kronlin::lapack_trtri_fn<T>>(a[1]),
          routine_at<kronlin::lapack_chol_fn<T>>(a[2])};
}

py::array_t<std::int32_t> potri_stack(py::array L, std::uintptr_t potri, std::vector<std::uintptr_t> recursive) {
  require_square_stack(L);
  require(L.writeable(), "the stack must be writeable");
  require(L.shape(1) < (std::int64_t(1) << 31), "the order exceeds LAPACK's 32-bit integers");
  require(recursive.empty() || recursive.size() == 3, "recursive: the addresses of ?gemm, ?trtri, ?lauum, or none");
  const auto B = L.shape(0), n = L.shape(1);
  py::array_t<std::int32_t> info(B);
  auto* inf = info.mutable_data();
  const bool f64 = has_dtype<double>(L);
  void* l = L.mutable_data();
  const bool rec = !recursive.empty();
  const auto rd = rec && f64 ? recursive_inverse<double>(recursive) : kronlin::RecursiveInverse<double>{};
  const auto rf = rec && !f64 ? recursive_inverse<float>(recursive) : kronlin::RecursiveInverse<float>{};
  py::gil_scoped_release release;
  if (f64) {
    kronlin::potri_stack_cpu<double>(static_cast<double*>(l), B, n, routine_at<kronlin::lapack_chol_fn<double>>(potri),
                                     rec ? &rd : nullptr, inf);
  } else {
    kronlin::potri_stack_cpu<float>(static_cast<float*>(l), B, n, routine_at<kronlin::lapack_chol_fn<float>>(potri),
                                    rec ? &rf : nullptr, inf);
  }
  return info;
}

// The block-apply family (kronlin/_kernels/block_apply.py): Y[b] = G[b] V[b] At[b] by the ?gemm at address gemm
// (scipy.linalg.cython_blas); returns the first b whose result is not finite, or -1; or -2, computing nothing,
// when some V[b] is not a matrix_in_place (the caller takes its general path: the blocks are checked here, at
// a few nanoseconds each, instead of by a Python loop before the call).

std::int64_t block_apply(py::array G, py::list V, py::array At, py::array Y, std::uintptr_t gemm) {
  require(G.ndim() == 3 && At.ndim() == 3 && Y.ndim() == 3, "expected G (B, q, q), At (B, p, p) and Y (B, q, p)");
  const auto B = Y.shape(0), q = Y.shape(1), p = Y.shape(2);
  require(G.shape(0) == B && G.shape(1) == q && G.shape(2) == q, "G must be (B, q, q) with Y (B, q, p)");
  require(At.shape(0) == B && At.shape(1) == p && At.shape(2) == p, "At must be (B, p, p) with Y (B, q, p)");
  require(c_contiguous(G) && c_contiguous(At) && c_contiguous(Y), "G, At and Y must be C-contiguous");
  require(Y.writeable(), "Y must be writeable");
  require(same_dtype(G, Y) && same_dtype(At, Y), "G, At and Y must share one dtype");
  const bool f64 = has_dtype<double>(Y);
  if (!f64 && !has_dtype<float>(Y)) throw std::invalid_argument("kronlin._C: dtype must be float32 or float64");
  require(q < (std::int64_t(1) << 31) && p < (std::int64_t(1) << 31), "the orders exceed BLAS's 32-bit integers");
  MatrixList vl;
  if (!matrices_in_place(V, B, q, p, Y, "V", vl)) return -2;
  const void* const* ptrs = vl.data.data();
  const void* g = G.data();
  const void* at = At.data();
  void* y = Y.mutable_data();
  py::gil_scoped_release release;
  if (f64) {
    return kronlin::block_apply_cpu<double>(static_cast<const double*>(g),
                                            reinterpret_cast<const double* const*>(ptrs),
                                            static_cast<const double*>(at), static_cast<double*>(y), B, q, p,
                                            routine_at<kronlin::blas_gemm_fn<double>>(gemm));
  }
  return kronlin::block_apply_cpu<float>(static_cast<const float*>(g), reinterpret_cast<const float* const*>(ptrs),
                                         static_cast<const float*>(at), static_cast<float*>(y), B, q, p,
                                         routine_at<kronlin::blas_gemm_fn<float>>(gemm));
}

// The norms family (kronlin/_kernels/norms.py): the 1-norm of a C-contiguous float matrix.
double norm1(py::array x) {
  require(x.ndim() == 2, "expected a matrix (m, n)");
  require(c_contiguous(x), "the matrix must be C-contiguous");
  const bool f64 = has_dtype<double>(x);
  if (!f64 && !has_dtype<float>(x)) throw std::invalid_argument("kronlin._C: dtype must be float32 or float64");
  const auto m = x.shape(0), n = x.shape(1);
  const void* p = x.data();
  py::gil_scoped_release release;
  return f64 ? kronlin::norm1_cpu<double>(static_cast<const double*>(p), m, n)
             : kronlin::norm1_cpu<float>(static_cast<const float*>(p), m, n);
}

int openmp_max_threads() {
#if defined(KRONLIN_HAVE_OPENMP)
  return omp_get_max_threads();
#else
  return 1;
#endif
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "kronlin's CPU kernels (C++17, OpenMP). Private: use the kronlin package.";
  m.def("eig_scale", &eig_scale, py::arg("Y"), py::arg("lg"), py::arg("la"), py::arg("shift"), py::arg("power"),
        "In place: Y[b, i, j] *= (lg[b, i] * la[b, j] + shift) ** power on C-contiguous float arrays.");
  m.def("asymmetry", &asymmetry, py::arg("x"),
        "(max|x - x^T|, max|x|) over a C-contiguous (B, n, n) float stack; (nan, nan) if an entry is not finite.");
  m.def("stack_asymmetry", &stack_asymmetry, py::arg("xs"), py::arg("out"),
        "out[b] = xs[b] (a list of B C-contiguous (n, n) float matrices into a C-contiguous (B, n, n) stack), and "
        "(max|out - out^T|, max|out|) measured while each matrix is in cache; (nan, nan) if an entry is not finite.");
  m.def("mirror_lower", &mirror_lower, py::arg("x"),
        "In place: the lower triangle of each matrix of a C-contiguous (B, n, n) float stack copied onto the upper one.");
  m.def("potrf_stack", &potrf_stack, py::arg("S"), py::arg("out"), py::arg("potrf"),
        "out[b] = the lower Cholesky factor of S[b] (C-contiguous (B, n, n) float stacks) by the ?potrf at address "
        "potrf (scipy.linalg.cython_lapack); returns LAPACK's info per matrix.");
  m.def("potri_stack", &potri_stack, py::arg("L"), py::arg("potri"), py::arg("recursive"),
        "In place: the lower Cholesky factors L[b] become (L L^T)^-1, exactly symmetric, by the ?potri at address "
        "potri, or, above order recursive_leaf when recursive holds the addresses of ?gemm, ?trtri and ?lauum, by "
        "the triangular inverse by halves and ?lauum; returns LAPACK's info per matrix.");
  m.attr("recursive_leaf") = kronlin::kRecursiveLeaf;
  m.def("block_apply", &block_apply, py::arg("G"), py::arg("V"), py::arg("At"), py::arg("Y"), py::arg("gemm"),
        "Y[b] = G[b] @ V[b] @ At[b] (C-contiguous float stacks G (B, q, q), At (B, p, p), Y (B, q, p); V a list of B "
        "(q, p) matrices) by the ?gemm at address gemm; returns the first b whose Y[b] is not finite, or -1.");
  m.def("norm1", &norm1, py::arg("x"),
        "max_j sum_i |x[i, j]| of a C-contiguous float matrix (column sums in its dtype); nan if an entry is nan.");
  m.def("gsylv_backsub", &gsylv_backsub, py::arg("S1"), py::arg("T1"), py::arg("S2"), py::arg("T2"), py::arg("W"),
        py::arg("sign"),
        "In place: W (B, q, p) becomes Y with S1 Y S2^T + sign T1 Y T2^T = W (real generalized Schur form); "
        "returns the smallest relative pivot.");
  m.def(
      "woodbury_gram_shared",
      [](py::array A, py::array E, double scale, std::int64_t prepack_bytes) -> py::array {
        require(A.ndim() == 3 && E.ndim() == 3, "expected A (N, T, da) and E (N*S, T, de)");
        const std::int64_t N = A.shape(0), T = A.shape(1), da = A.shape(2), M = E.shape(0), de = E.shape(2);
        require(E.shape(1) == T && (N == 0 ? M == 0 : M % N == 0), "shapes of A and E do not agree");
        require(c_contiguous(A) && c_contiguous(E), "arrays must be C-contiguous");
        require(same_dtype(A, E), "A and E must share one dtype");
        const std::int64_t S = N == 0 ? 1 : M / N;
        auto run = [&](auto zero) -> py::array {
          using T_ = decltype(zero);
          py::array_t<T_> K({M, M});
          const auto* a = static_cast<const T_*>(A.data());
          const auto* e = static_cast<const T_*>(E.data());
          auto* k = static_cast<T_*>(K.mutable_data());
          {
            py::gil_scoped_release release;
            kronlin::woodbury_gram_shared_cpu<T_>(a, e, k, N, S, T, da, de, scale, prepack_bytes);
          }
          return K;
        };
        if (has_dtype<double>(A)) return run(0.0);
        if (has_dtype<float>(A)) return run(0.0f);
        throw std::invalid_argument("kronlin._C: dtype must be float32 or float64");
      },
      py::arg("A"), py::arg("E"), py::arg("scale"), py::arg("prepack_bytes") = -1,
      "Per-example Gram of a weight-sharing layer: K[c1, c2] = scale * sum_{t,t'} (A[c1/S,t].A[c2/S,t'])"
      "(E[c1,t].E[c2,t']) for C-contiguous A (N, T, da), E (N*S, T, de); returns K (N*S, N*S).");
  m.def("woodbury_gram_isa", &kronlin::woodbury_gram_isa, "SIMD instruction set woodbury_gram_shared dispatches to.");
  m.def("openmp_max_threads", &openmp_max_threads, "OpenMP's thread count (1 when built without OpenMP).");
#if defined(KRONLIN_CUDA_SETTING)
  m.attr("cuda_setting") = KRONLIN_CUDA_SETTING;  // KRONLIN_CUDA at build time: AUTO, ON or OFF
  m.attr("cuda_built") = static_cast<bool>(KRONLIN_CUDA_BUILT);
#endif
#if defined(KRONLIN_HAVE_OPENMP)
  m.attr("has_openmp") = true;
#else
  m.attr("has_openmp") = false;
#endif
}
