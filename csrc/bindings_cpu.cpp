// Python bindings of kronlin._C, the CPU kernels.  The public package validates
// every argument before it calls in here; the checks below guard the internal
// contract (dtype, layout, shapes) and raise instead of reading out of bounds.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <stdexcept>
#include <string>

#include "cpu/eig_scale_cpu.h"

#if defined(KRONLIN_HAVE_OPENMP)
#include <omp.h>
#endif

namespace py = pybind11;

namespace {

void require(bool ok, const std::string& msg) {
  if (!ok) throw std::invalid_argument("kronlin._C: " + msg);
}

bool c_contiguous(const py::array& a) { return (a.flags() & py::array::c_style) != 0; }

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
  require(Y.dtype().is(lg.dtype()) && Y.dtype().is(la.dtype()), "Y, lg and la must share one dtype");
  if (Y.dtype().is(py::dtype::of<double>())) {
    eig_scale_typed<double>(Y, lg, la, shift, power);
  } else if (Y.dtype().is(py::dtype::of<float>())) {
    eig_scale_typed<float>(Y, lg, la, shift, power);
  } else {
    throw std::invalid_argument("kronlin._C: dtype must be float32 or float64");
  }
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
  m.def("openmp_max_threads", &openmp_max_threads, "OpenMP's thread count (1 when built without OpenMP).");
#if defined(KRONLIN_HAVE_OPENMP)
  m.attr("has_openmp") = true;
#else
  m.attr("has_openmp") = false;
#endif
}
