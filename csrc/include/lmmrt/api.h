// Host-side interface of lmmrt's CUDA kernels: parameter structs and the runtime-dispatched entry
// points. Plain C++ (no device code), so the pybind11 glue can include it; the kernels live in
// the .cuh templates and are instantiated in csrc/*.cu.
#pragma once
#ifndef __CUDACC_RTC__  // NVRTC has the device builtins and compiles no host code
#include <cuda_runtime.h>
#endif
#include <cstdint>

namespace lmmrt {

// Element types the entry points dispatch on.
enum class DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

// Smallest key chunk a decode split gets; the Python wrapper mirrors it when it picks num_splits.
constexpr int kMinKeysPerSplit = 64;

struct DecodeParams {
  void* out;                // (batch, heads, head_dim) at strides out_stride_b / out_stride_h
  const void* q;            // (batch, heads, head_dim) at strides q_stride_b / q_stride_h
  const void* k;            // (num_media * latents, heads, head_dim) at kv_stride_tok / kv_stride_h
  const void* v;            // same layout as k
  const void* text_time;    // (batch,) int32 or int64, element stride tt_stride
  const void* media_start;  // (batch,) int32 or int64, element stride ms_stride
  const void* media_count;  // (batch,) int32 or int64, element stride mc_stride
  bool tt_int64, ms_int64, mc_int64;
  float* ws_acc;  // (batch, heads, num_splits, head_dim); only when num_splits > 1
  float* ws_ml;   // (batch, heads, num_splits, 2): running max (log2 domain) and sum
  int batch, heads, latents;
  int64_t num_media;  // media rows in k/v: ranges are clamped to them
  int64_t q_stride_b, q_stride_h, out_stride_b, out_stride_h, kv_stride_tok, kv_stride_h;
  int64_t tt_stride, ms_stride, mc_stride;
  bool cumulative;
  float scale;  // softmax scale (usually head_dim ** -0.5)
  int num_splits;
};

struct NormParams {
  void* out;             // (rows, dim) normed, dtype T
  void* h_out;           // (rows, dim) x + residual, or nullptr (plain norm)
  const void* x;         // (rows, dim)
  const void* residual;  // (rows, dim) or nullptr; given exactly when h_out is
  const void* weight;    // (dim,) dtype WT
  const void* bias;      // (dim,) dtype WT or nullptr; LayerNorm only
  int64_t rows;
  int dim;
  float eps;
  bool layer_norm;  // false: RMSNorm
};

#ifndef __CUDACC_RTC__  // host launchers: NVRTC (lmmrt/kernels/cuda_jit/) compiles device code only
// dtype float16 / bfloat16; head_dim 64, 96 or 128. Launches on `stream`, graph-safe.
cudaError_t masked_cross_attention_decode(DType dtype, int head_dim, const DecodeParams& p, cudaStream_t stream);

// dtype float32 / float16 / bfloat16; weight (and bias) dtype equal to dtype or float32.
cudaError_t fused_norm(DType dtype, DType weight_dtype, const NormParams& p, cudaStream_t stream);

// out = x + tanh(gate) * branch over contiguous (numel / dim, dim); gate dtype = dtype or float32.
cudaError_t gated_residual(DType dtype, DType gate_dtype, void* out, const void* x, const void* branch,
                           const void* gate, int64_t numel, int dim, bool per_channel, cudaStream_t stream);

cudaError_t fill_f32(float* out, int64_t n, float value, cudaStream_t stream);
#endif  // __CUDACC_RTC__

}  // namespace lmmrt
