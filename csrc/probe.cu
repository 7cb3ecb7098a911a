// A trivial kernel that proves the build, the launch path and the error path work.
#include "lmmrt/common.cuh"

namespace lmmrt {

__global__ void fill_f32_kernel(float* out, int64_t n, float value) {
  int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x;
  if (i < n) out[i] = value;
}

cudaError_t fill_f32(float* out, int64_t n, float value, cudaStream_t stream) {
  if (n == 0) return cudaSuccess;
  int threads = 256;
  int64_t blocks = (n + threads - 1) / threads;
  fill_f32_kernel<<<(unsigned)blocks, threads, 0, stream>>>(out, n, value);
  return cudaGetLastError();
}

}  // namespace lmmrt
