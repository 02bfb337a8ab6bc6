// Python bindings of kronlin._cuda, the CUDA kernels.  Arrays arrive as raw
// device pointers (CuPy's `.data.ptr`) with their shapes and the CUDA stream
// to launch on; the public package validates everything first.
#include <pybind11/pybind11.h>

#include <cstdint>

#include "cuda/eig_scale_cuda.h"

namespace py = pybind11;

PYBIND11_MODULE(_cuda, m) {
  m.doc() = "kronlin's CUDA kernels. Private: use the kronlin package.";
  m.def(
      "eig_scale",
      [](std::uintptr_t Y, std::uintptr_t lg, std::uintptr_t la, std::int64_t B, std::int64_t q, std::int64_t p,
         double shift, double power, bool is_double, std::uintptr_t stream) {
        py::gil_scoped_release release;
        kronlin::eig_scale_cuda(reinterpret_cast<void*>(Y), reinterpret_cast<const void*>(lg),
                                reinterpret_cast<const void*>(la), B, q, p, shift, power, is_double, stream);
      },
      py::arg("Y"), py::arg("lg"), py::arg("la"), py::arg("B"), py::arg("q"), py::arg("p"), py::arg("shift"),
      py::arg("power"), py::arg("is_double"), py::arg("stream"),
      "In place on device pointers: Y[b, i, j] *= (lg[b, i] * la[b, j] + shift) ** power.");
  m.def("device_count", &kronlin::cuda_device_count, "Visible CUDA devices (0 without a driver).");
}
