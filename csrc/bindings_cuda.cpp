// Python bindings of kronlin._cuda, the CUDA kernels.
//
// Every kernel takes arrays, not pointers: CuPy arrays or any object with
// __cuda_array_interface__ (version 2 or 3).  Before anything is launched the
// bindings check, for every operand, that it is device memory of the current
// device, C-contiguous, unmasked, of float32 or float64 and of the shape the
// kernel needs, that all operands share one dtype and that outputs are
// writeable; a mismatch raises ValueError/TypeError naming the operand.  The
// kernel's float/double instantiation is derived from the checked dtype, so a
// float32 buffer can never be read as double.  The launch goes on `stream`
// (a cudaStream_t as an integer; 0 is the legacy default stream, CuPy's
// `cupy.cuda.get_current_stream().ptr`); an operand that names another stream
// in its interface (version 3) is waited for with an event first.
#include <pybind11/pybind11.h>

#include <cuda_runtime.h>

#include <cstdint>
#include <stdexcept>
#include <string>
#include <vector>

#include "cuda/cuda_utils.h"
#include "cuda/eig_scale_cuda.h"
#include "cuda/woodbury_gram_cuda.h"

namespace py = pybind11;

namespace {

void require(bool ok, const std::string& msg) {
  if (!ok) throw std::invalid_argument("kronlin._cuda: " + msg);
}

// One operand, read from its __cuda_array_interface__.
struct CudaArray {
  std::string name;
  void* ptr = nullptr;
  std::vector<std::int64_t> shape;
  std::string typestr;
  bool readonly = false;
  bool has_stream = false;
  std::uintptr_t stream = 0;

  std::int64_t size() const {
    std::int64_t n = 1;
    for (auto d : shape) n *= d;
    return n;
  }
  std::int64_t dim(std::size_t i) const { return shape.at(i); }
  bool is_double() const { return typestr == "<f8"; }
  std::string shape_str() const {
    std::string s = "(";
    for (std::size_t i = 0; i < shape.size(); ++i) s += (i ? ", " : "") + std::to_string(shape[i]);
    return s + (shape.size() == 1 ? ",)" : ")");
  }
};

CudaArray cuda_array(py::handle obj, const std::string& name, std::size_t ndim) {
  if (!py::hasattr(obj, "__cuda_array_interface__")) {
    throw py::type_error("kronlin._cuda: " + name + " must be a CUDA array (CuPy, or any object with "
                         "__cuda_array_interface__); got " + std::string(py::str(py::type::of(obj).attr("__name__"))));
  }
  const py::dict cai = obj.attr("__cuda_array_interface__").cast<py::dict>();
  CudaArray a;
  a.name = name;
  for (auto d : cai["shape"].cast<py::tuple>()) a.shape.push_back(d.cast<std::int64_t>());
  a.typestr = cai["typestr"].cast<std::string>();
  const auto data = cai["data"].cast<py::tuple>();
  a.ptr = reinterpret_cast<void*>(data[0].cast<std::uintptr_t>());
  a.readonly = data[1].cast<bool>();
  require(a.shape.size() == ndim,
          name + " must have " + std::to_string(ndim) + " dimensions; got shape " + a.shape_str());
  require(a.typestr == "<f8" || a.typestr == "<f4",
          name + " has dtype '" + a.typestr + "'; the CUDA kernels take float32 ('<f4') or float64 ('<f8')");
  require(!cai.contains("mask") || cai["mask"].is_none(), name + " is a masked array; pass plain device memory");
  if (cai.contains("strides") && !cai["strides"].is_none()) {
    const auto strides = cai["strides"].cast<py::tuple>();
    std::int64_t expect = a.is_double() ? 8 : 4;
    for (std::size_t i = a.shape.size(); i-- > 0;) {
      // a dimension of extent 1 (or an empty array) may carry any stride
      require(a.shape[i] <= 1 || a.size() == 0 || strides[i].cast<std::int64_t>() == expect,
              name + " (shape " + a.shape_str() + ") must be C-contiguous; make a contiguous copy first");
      expect *= a.shape[i];
    }
  }
  if (cai.contains("stream") && !cai["stream"].is_none()) {
    a.has_stream = true;
    a.stream = cai["stream"].cast<std::uintptr_t>();
  }
  return a;
}

// All operands one dtype (named in the message), on the current device, as device memory.
void require_same_dtype(const std::vector<const CudaArray*>& ops) {
  for (const auto* a : ops) {
    require(a->typestr == ops[0]->typestr, a->name + " has dtype '" + a->typestr + "' but " + ops[0]->name +
                                               " has '" + ops[0]->typestr + "'; all operands must share one dtype");
  }
}

void require_on_device(const std::vector<const CudaArray*>& ops) {
  int dev = 0;
  kronlin::cuda_check(cudaGetDevice(&dev), "cudaGetDevice");
  for (const auto* a : ops) {
    if (a->size() == 0) continue;
    cudaPointerAttributes attr{};
    const cudaError_t err = cudaPointerGetAttributes(&attr, a->ptr);
    if (err != cudaSuccess) cudaGetLastError();  // clear it; reported below
    require(err == cudaSuccess && (attr.type == cudaMemoryTypeDevice || attr.type == cudaMemoryTypeManaged),
            a->name + " is not CUDA device memory (host or unknown pointer); move it to the GPU first");
    require(attr.device == dev, a->name + " is on CUDA device " + std::to_string(attr.device) +
                                    " but the current device is " + std::to_string(dev) +
                                    "; run under that device (cupy.cuda.Device(...))");
  }
}

void require_writeable(const CudaArray& a) { require(!a.readonly, a.name + " is read-only but is written by the kernel"); }

// CAI v3 stream values: 1 is the legacy default stream, 2 the per-thread one;
// 0 (how CuPy's `.ptr` names the legacy default stream) is treated as 1.
cudaStream_t as_stream(std::uintptr_t s) {
  if (s == 0 || s == 1) return cudaStreamLegacy;
  if (s == 2) return cudaStreamPerThread;
  return reinterpret_cast<cudaStream_t>(s);
}

// Order the launch stream after the streams the operands were produced on (CAI v3).
void wait_for_operands(const std::vector<const CudaArray*>& ops, cudaStream_t launch) {
  for (const auto* a : ops) {
    if (!a->has_stream || as_stream(a->stream) == launch) continue;
    cudaEvent_t ev;
    kronlin::cuda_check(cudaEventCreateWithFlags(&ev, cudaEventDisableTiming), "cudaEventCreate");
    kronlin::cuda_check(cudaEventRecord(ev, as_stream(a->stream)), "cudaEventRecord");
    kronlin::cuda_check(cudaStreamWaitEvent(launch, ev, 0), "cudaStreamWaitEvent");
    kronlin::cuda_check(cudaEventDestroy(ev), "cudaEventDestroy");
  }
}

void eig_scale(py::handle Yo, py::handle lgo, py::handle lao, double shift, double power, std::uintptr_t stream) {
  const CudaArray Y = cuda_array(Yo, "Y", 3), lg = cuda_array(lgo, "lg", 2), la = cuda_array(lao, "la", 2);
  const std::vector<const CudaArray*> ops{&Y, &lg, &la};
  require_same_dtype(ops);
  require(lg.dim(0) == Y.dim(0) && la.dim(0) == Y.dim(0) && lg.dim(1) == Y.dim(1) && la.dim(1) == Y.dim(2),
          "shapes of Y " + Y.shape_str() + ", lg " + lg.shape_str() + " and la " + la.shape_str() +
              " do not agree: expected Y (B, q, p), lg (B, q), la (B, p)");
  require_writeable(Y);
  require_on_device(ops);
  const cudaStream_t s = as_stream(stream);
  py::gil_scoped_release release;
  wait_for_operands(ops, s);
  kronlin::eig_scale_cuda(Y.ptr, lg.ptr, la.ptr, Y.dim(0), Y.dim(1), Y.dim(2), shift, power, Y.is_double(),
                          reinterpret_cast<std::uintptr_t>(s));
}

void woodbury_gram_shared(py::handle Ao, py::handle Eo, py::handle Ko, double scale, std::uintptr_t stream, int tile) {
  require(tile == 0 || tile == 32 || tile == 64 || tile == 128,
          "tile must be 0 (automatic), 32, 64 or 128; got " + std::to_string(tile));
  const CudaArray A = cuda_array(Ao, "A", 3), E = cuda_array(Eo, "E", 3), K = cuda_array(Ko, "K", 2);
  const std::vector<const CudaArray*> ops{&A, &E, &K};
  require_same_dtype(ops);
  const std::int64_t N = A.dim(0), T = A.dim(1), da = A.dim(2), M = E.dim(0), de = E.dim(2);
  require(E.dim(1) == T && (N == 0 ? M == 0 : M % N == 0),
          "shapes of A " + A.shape_str() + " and E " + E.shape_str() + " do not agree: expected A (N, T, da), "
          "E (N*S, T, de)");
  require(K.dim(0) == M && K.dim(1) == M,
          "K must have shape (N*S, N*S) = (" + std::to_string(M) + ", " + std::to_string(M) + "); got " +
              K.shape_str());
  require_writeable(K);
  require_on_device(ops);
  const std::int64_t S = N == 0 ? 1 : M / N;
  const cudaStream_t s = as_stream(stream);
  py::gil_scoped_release release;
  wait_for_operands(ops, s);
  kronlin::woodbury_gram_shared_cuda(A.ptr, E.ptr, K.ptr, N, S, T, da, de, scale, A.is_double(), tile,
                                     reinterpret_cast<std::uintptr_t>(s));
}

int device_count() {
  int count = 0;
  if (cudaGetDeviceCount(&count) != cudaSuccess) {
    cudaGetLastError();  // clear the sticky "no driver" error
    return 0;
  }
  return count;
}

}  // namespace

PYBIND11_MODULE(_cuda, m) {
  m.doc() = "kronlin's CUDA kernels (typed: arrays with __cuda_array_interface__). Private: use the kronlin package.";
  m.def("eig_scale", &eig_scale, py::arg("Y"), py::arg("lg"), py::arg("la"), py::arg("shift"), py::arg("power"),
        py::arg("stream"),
        "In place on C-contiguous device arrays of one dtype: Y[b, i, j] *= (lg[b, i] * la[b, j] + shift) ** power "
        "for Y (B, q, p), lg (B, q), la (B, p); launched on `stream`.");
  m.def("woodbury_gram_shared", &woodbury_gram_shared, py::arg("A"), py::arg("E"), py::arg("K"), py::arg("scale"),
        py::arg("stream"), py::arg("tile") = 0,
        "Into K (N*S, N*S): K[c1, c2] = scale * sum_{t,t'} (A[c1/S,t].A[c2/S,t'])(E[c1,t].E[c2,t']) for "
        "C-contiguous device arrays A (N, T, da), E (N*S, T, de) of one dtype; launched on `stream`; "
        "tile 32, 64 or 128 positions per block side (0: by T and dtype).");
  m.def("gram_tile_for", &kronlin::gram_tile_for, py::arg("T"), py::arg("is_double"),
        "The tile woodbury_gram_shared uses for T positions when tile is 0.");
  m.def("device_count", &device_count, "Visible CUDA devices (0 without a driver).");
}
