// pybind11 glue: argument checks, then launch on the caller's stream. Tensors arrive as raw
// device pointers (integers) so the extension never links against libtorch. Bad arguments raise
// ValueError before anything touches CUDA; CUDA failures raise RuntimeError with the error name.
// The checks themselves are lmmrt/kernels/cuda_launch_checks.py, the one description shared with
// the NVRTC JIT path (lmmrt/kernels/cuda_jit/): every entry point hands it its arguments first.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>
#include <cuda_runtime.h>

#include <array>
#include <stdexcept>
#include <string>
#include <utility>

#include "lmmrt/api.h"

namespace py = pybind11;
using namespace pybind11::literals;

namespace {

using lmmrt::DType;

void check_cuda(cudaError_t err, const char* what) {
  if (err != cudaSuccess) {
    throw std::runtime_error(std::string("lmmrt CUDA error in ") + what + ": " + cudaGetErrorName(err) + " (" +
                             cudaGetErrorString(err) + ")");
  }
}

// lmmrt.kernels.cuda_launch_checks.<fn>(args...): raises ValueError naming the bad argument, or
// returns whether there is anything to launch.
template <typename... Args>
bool checked(const char* fn, Args&&... args) {
  py::object check = py::module_::import("lmmrt.kernels.cuda_launch_checks").attr(fn);
  return check(std::forward<Args>(args)...).template cast<bool>();
}

DType parse_dtype(const std::string& s) {  // already checked: one of the three names
  if (s == "float32") return DType::kFloat32;
  if (s == "float16") return DType::kFloat16;
  if (s == "bfloat16") return DType::kBFloat16;
  throw std::invalid_argument("unknown dtype '" + s + "'");
}

cudaStream_t as_stream(uintptr_t s) { return reinterpret_cast<cudaStream_t>(s); }

py::dict build_info() {
  py::dict d;
  d["cuda_archs"] = std::string(LMMRT_CUDA_ARCHS);
  d["cuda_version"] = std::string(LMMRT_CUDA_VERSION);
  int rt = 0;
  cudaRuntimeGetVersion(&rt);
  d["cudart_version"] = rt;
  d["decode_min_keys_per_split"] = lmmrt::kMinKeysPerSplit;
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
  check_cuda(lmmrt::fill_f32(reinterpret_cast<float*>(out), n, value, as_stream(stream)), "fill_f32");
}

void masked_cross_attention_decode(uintptr_t out, uintptr_t q, uintptr_t k, uintptr_t v, uintptr_t text_time,
                                   uintptr_t media_start, uintptr_t media_count, uintptr_t workspace, int batch,
                                   int heads, int head_dim, int latents, int64_t num_media,
                                   std::array<int64_t, 2> q_strides, std::array<int64_t, 2> out_strides,
                                   std::array<int64_t, 2> kv_strides, std::array<int64_t, 3> index_strides,
                                   std::array<bool, 3> index_int64, bool cumulative, double scale, int num_splits,
                                   const std::string& dtype, uintptr_t stream) {
  const std::string fn = "masked_cross_attention_decode";
  if (!checked(fn.c_str(), out, q, k, v, text_time, media_start, media_count, workspace,
               "batch"_a = batch, "heads"_a = heads, "head_dim"_a = head_dim, "latents"_a = latents,
               "num_media"_a = num_media, "q_strides"_a = q_strides, "out_strides"_a = out_strides,
               "kv_strides"_a = kv_strides, "index_strides"_a = index_strides, "index_int64"_a = index_int64,
               "cumulative"_a = cumulative, "scale"_a = scale, "num_splits"_a = num_splits, "dtype"_a = dtype,
               "stream"_a = stream))
    return;
  const DType dt = parse_dtype(dtype);

  lmmrt::DecodeParams p{};
  p.out = reinterpret_cast<void*>(out);
  p.q = reinterpret_cast<const void*>(q);
  p.k = reinterpret_cast<const void*>(k);
  p.v = reinterpret_cast<const void*>(v);
  p.text_time = reinterpret_cast<const void*>(text_time);
  p.media_start = reinterpret_cast<const void*>(media_start);
  p.media_count = reinterpret_cast<const void*>(media_count);
  p.tt_int64 = index_int64[0];
  p.ms_int64 = index_int64[1];
  p.mc_int64 = index_int64[2];
  float* ws = reinterpret_cast<float*>(workspace);
  p.ws_acc = num_splits > 1 ? ws : nullptr;
  p.ws_ml = num_splits > 1 ? ws + (int64_t)batch * heads * num_splits * head_dim : nullptr;
  p.batch = batch;
  p.heads = heads;
  p.latents = latents;
  p.num_media = num_media;
  p.q_stride_b = q_strides[0];
  p.q_stride_h = q_strides[1];
  p.out_stride_b = out_strides[0];
  p.out_stride_h = out_strides[1];
  p.kv_stride_tok = kv_strides[0];
  p.kv_stride_h = kv_strides[1];
  p.tt_stride = index_strides[0];
  p.ms_stride = index_strides[1];
  p.mc_stride = index_strides[2];
  p.cumulative = cumulative;
  p.scale = (float)scale;
  p.num_splits = num_splits;
  check_cuda(lmmrt::masked_cross_attention_decode(dt, head_dim, p, as_stream(stream)), fn.c_str());
}

void fused_norm(uintptr_t out, uintptr_t h_out, uintptr_t x, uintptr_t residual, uintptr_t weight, uintptr_t bias,
                int64_t rows, int dim, double eps, bool layer_norm, const std::string& dtype,
                const std::string& weight_dtype, uintptr_t stream) {
  const std::string fn = "fused_norm";
  if (!checked(fn.c_str(), out, h_out, x, residual, weight, bias, "rows"_a = rows, "dim"_a = dim, "eps"_a = eps,
               "layer_norm"_a = layer_norm, "dtype"_a = dtype, "weight_dtype"_a = weight_dtype, "stream"_a = stream))
    return;
  const DType dt = parse_dtype(dtype), wdt = parse_dtype(weight_dtype);
  lmmrt::NormParams p{};
  p.out = reinterpret_cast<void*>(out);
  p.h_out = reinterpret_cast<void*>(h_out);
  p.x = reinterpret_cast<const void*>(x);
  p.residual = reinterpret_cast<const void*>(residual);
  p.weight = reinterpret_cast<const void*>(weight);
  p.bias = reinterpret_cast<const void*>(bias);
  p.rows = rows;
  p.dim = dim;
  p.eps = (float)eps;
  p.layer_norm = layer_norm;
  check_cuda(lmmrt::fused_norm(dt, wdt, p, as_stream(stream)), fn.c_str());
}

void gated_residual(uintptr_t out, uintptr_t x, uintptr_t branch, uintptr_t gate, int64_t numel, int dim,
                    int64_t gate_numel, const std::string& dtype, const std::string& gate_dtype, uintptr_t stream) {
  const std::string fn = "gated_residual";
  if (!checked(fn.c_str(), out, x, branch, gate, "numel"_a = numel, "dim"_a = dim, "gate_numel"_a = gate_numel,
               "dtype"_a = dtype, "gate_dtype"_a = gate_dtype, "stream"_a = stream))
    return;
  const DType dt = parse_dtype(dtype), gdt = parse_dtype(gate_dtype);
  check_cuda(lmmrt::gated_residual(dt, gdt, reinterpret_cast<void*>(out), reinterpret_cast<const void*>(x),
                                   reinterpret_cast<const void*>(branch), reinterpret_cast<const void*>(gate), numel,
                                   dim, gate_numel == dim && dim != 1, as_stream(stream)),
             fn.c_str());
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "lmmrt CUDA kernels (raw device pointers and streams as integers)";
  m.def("build_info", &build_info, "CUDA archs and toolkit version this module was built with");
  m.def("device_count", &device_count, "Number of CUDA devices (raises on a driver error)");
  m.def("fill_f32", &fill_f32, py::arg("out"), py::arg("n"), py::arg("value"), py::arg("stream"),
        "Fill n float32 values at device pointer `out` (a probe of the launch and error path)");
  m.def("masked_cross_attention_decode", &masked_cross_attention_decode, py::arg("out"), py::arg("q"), py::arg("k"),
        py::arg("v"), py::arg("text_time"), py::arg("media_start"), py::arg("media_count"), py::arg("workspace"),
        py::kw_only(), py::arg("batch"), py::arg("heads"), py::arg("head_dim"), py::arg("latents"),
        py::arg("num_media"), py::arg("q_strides"), py::arg("out_strides"), py::arg("kv_strides"),
        py::arg("index_strides"), py::arg("index_int64"), py::arg("cumulative"), py::arg("scale"),
        py::arg("num_splits"), py::arg("dtype"), py::arg("stream"),
        "Decode masked cross-attention (one query token per sequence). Strides in elements: q/out "
        "(batch, head), kv (token, head), index (text_time, media_start, media_count). The workspace "
        "holds batch*heads*num_splits*(head_dim+2) float32 when num_splits > 1.");
  m.def("fused_norm", &fused_norm, py::arg("out"), py::arg("h_out"), py::arg("x"), py::arg("residual"),
        py::arg("weight"), py::arg("bias"), py::kw_only(), py::arg("rows"), py::arg("dim"), py::arg("eps"),
        py::arg("layer_norm"), py::arg("dtype"), py::arg("weight_dtype"), py::arg("stream"),
        "RMSNorm / LayerNorm of contiguous (rows, dim) rows, optionally of x + residual (then h_out "
        "receives the sum). Pointer 0 means absent.");
  m.def("gated_residual", &gated_residual, py::arg("out"), py::arg("x"), py::arg("branch"), py::arg("gate"),
        py::kw_only(), py::arg("numel"), py::arg("dim"), py::arg("gate_numel"), py::arg("dtype"),
        py::arg("gate_dtype"), py::arg("stream"), "out = x + tanh(gate) * branch over contiguous (..., dim)");
}
