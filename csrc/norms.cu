// Instantiations of the norm and gated-residual kernels: T in {float32, float16, bfloat16}, the
// weight / gate either T or float32.
#include "lmmrt/norms.cuh"

namespace lmmrt {

template <typename T>
static cudaError_t norm_for_dtype(DType weight_dtype, const NormParams& p, cudaStream_t stream) {
  if (weight_dtype == DType::kFloat32) return fused_norm<T, float>(p, stream);
  return fused_norm<T, T>(p, stream);
}

cudaError_t fused_norm(DType dtype, DType weight_dtype, const NormParams& p, cudaStream_t stream) {
  if (weight_dtype != dtype && weight_dtype != DType::kFloat32) return cudaErrorInvalidValue;
  switch (dtype) {
    case DType::kFloat32: return fused_norm<float, float>(p, stream);
    case DType::kFloat16: return norm_for_dtype<__half>(weight_dtype, p, stream);
    case DType::kBFloat16: return norm_for_dtype<__nv_bfloat16>(weight_dtype, p, stream);
  }
  return cudaErrorInvalidValue;
}

template <typename T>
static cudaError_t gated_for_dtype(DType gate_dtype, void* out, const void* x, const void* branch, const void* gate,
                                   int64_t numel, int dim, bool per_channel, cudaStream_t stream) {
  auto* o = static_cast<T*>(out);
  auto* xx = static_cast<const T*>(x);
  auto* br = static_cast<const T*>(branch);
  if (gate_dtype == DType::kFloat32)
    return gated_residual<T, float>(o, xx, br, static_cast<const float*>(gate), numel, dim, per_channel, stream);
  return gated_residual<T, T>(o, xx, br, static_cast<const T*>(gate), numel, dim, per_channel, stream);
}

cudaError_t gated_residual(DType dtype, DType gate_dtype, void* out, const void* x, const void* branch,
                           const void* gate, int64_t numel, int dim, bool per_channel, cudaStream_t stream) {
  if (gate_dtype != dtype && gate_dtype != DType::kFloat32) return cudaErrorInvalidValue;
  switch (dtype) {
    case DType::kFloat32: return gated_for_dtype<float>(gate_dtype, out, x, branch, gate, numel, dim, per_channel, stream);
    case DType::kFloat16: return gated_for_dtype<__half>(gate_dtype, out, x, branch, gate, numel, dim, per_channel, stream);
    case DType::kBFloat16:
      return gated_for_dtype<__nv_bfloat16>(gate_dtype, out, x, branch, gate, numel, dim, per_channel, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace lmmrt
