// Python bindings of kronlin._cuda, the CUDA kernels.  Arrays arrive as raw
// device pointers (CuPy's `.data.ptr`) with their shapes and the CUDA stream
// to launch on; the public package validates everything first.
#include <pybind11/pybind11.h>

#include <cstdint>

#include "cuda/eig_scale_cuda.h"
#include "cuda/woodbury_gram_cuda.h"

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
  m.def(
      "woodbury_gram_shared",
      [](std::uintptr_t A, std::uintptr_t E, std::uintptr_t K, std::int64_t N, std::int64_t S, std::int64_t T,
         std::int64_t da, std::int64_t de, double scale, bool is_double, std::uintptr_t stream) {
        py::gil_scoped_release release;
        kronlin::woodbury_gram_shared_cuda(reinterpret_cast<const void*>(A), reinterpret_cast<const void*>(E),
                                           reinterpret_cast<void*>(K), N, S, T, da, de, scale, is_double, stream);
      },
      py::arg("A"), py::arg("E"), py::arg("K"), py::arg("N"), py::arg("S"), py::arg("T"), py::arg("da"),
      py::arg("de"), py::arg("scale"), py::arg("is_double"), py::arg("stream"),
      "On device pointers: K (N*S, N*S) = scale * per-example Gram of a weight-sharing layer from A (N, T, da), "
      "E (N*S, T, de).");
  m.def("device_count", &kronlin::cuda_device_count, "Visible CUDA devices (0 without a driver).");
}
