// Instantiations of the decode kernel: {float16, bfloat16} x head_dim {64, 96, 128}.
#include "lmmrt/masked_cross_attention_decode.cuh"

namespace lmmrt {

template <typename T>
static cudaError_t decode_for_dtype(int head_dim, const DecodeParams& p, cudaStream_t stream) {
  switch (head_dim) {
    case 64: return masked_cross_attention_decode<T, 64>(p, stream);
    case 96: return masked_cross_attention_decode<T, 96>(p, stream);
    case 128: return masked_cross_attention_decode<T, 128>(p, stream);
    default: return cudaErrorInvalidValue;
  }
}

cudaError_t masked_cross_attention_decode(DType dtype, int head_dim, const DecodeParams& p, cudaStream_t stream) {
  switch (dtype) {
    case DType::kFloat16: return decode_for_dtype<__half>(head_dim, p, stream);
    case DType::kBFloat16: return decode_for_dtype<__nv_bfloat16>(head_dim, p, stream);
    default: return cudaErrorInvalidValue;
  }
}

}  // namespace lmmrt
