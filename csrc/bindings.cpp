// pybind11 glue: argument checks, then launch on the caller's stream. Tensors arrive as raw
// device pointers (integers) so the extension never links against libtorch.
#include <pybind11/pybind11.h>
#include <cuda_runtime.h>
#include <stdexcept>
#include <string>

namespace py = pybind11;

namespace lmmrt {
cudaError_t fill_f32(float* out, int64_t n, float value, cudaStream_t stream);
}

namespace {

void check_cuda(cudaError_t err, const char* what) {
  if (err != cudaSuccess) {
    throw std::runtime_error(std::string("lmmrt CUDA error in ") + what + ": " +
                             cudaGetErrorName(err) + " (" + cudaGetErrorString(err) + ")");
  }
}

py::dict build_info() {
  py::dict d;
  d["cuda_archs"] = std::string(LMMRT_CUDA_ARCHS);
  d["cuda_version"] = std::string(LMMRT_CUDA_VERSION);
  int rt = 0;
  cudaRuntimeGetVersion(&rt);
  d["cudart_version"] = rt;
  return d;
}

int device_count() {
  int n = 0;
  check_cuda(cudaGetDeviceCount(&n), "cudaGetDeviceCount");
  return n;
}

void fill_f32(uintptr_t out, int64_t n, float value, uintptr_t stream) {
  if (n < 0) throw std::invalid_argument("fill_f32: n must be >= 0, got " + std::to_string(n));
  if (n > 0 && out == 0) throw std::invalid_argument("fill_f32: out is a null pointer");
  check_cuda(lmmrt::fill_f32(reinterpret_cast<float*>(out), n, value,
                             reinterpret_cast<cudaStream_t>(stream)),
             "fill_f32");
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "lmmrt CUDA kernels (raw device pointers and streams as integers)";
  m.def("build_info", &build_info, "CUDA archs and toolkit version this module was built with");
  m.def("device_count", &device_count, "Number of CUDA devices (raises on a driver error)");
  m.def("fill_f32", &fill_f32, py::arg("out"), py::arg("n"), py::arg("value"), py::arg("stream"),
        "Fill n float32 values at device pointer `out` (a probe of the launch and error path)");
}
