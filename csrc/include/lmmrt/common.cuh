// Shared helpers for lmmrt's torch-free CUDA kernels.
#pragma once
#ifndef __CUDACC_RTC__  // NVRTC has the device builtins and compiles no host code
#include <cuda_runtime.h>
#endif
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cstdint>

#include "lmmrt/api.h"

namespace lmmrt {

// Every kernel entry point returns the launch status so the binding can raise it.
#ifndef __CUDACC_RTC__  // host code: NVRTC compiles device code only
inline cudaError_t last_launch_error() { return cudaGetLastError(); }
#endif

template <typename T>
__device__ __forceinline__ float to_float(T x);
template <>
__device__ __forceinline__ float to_float<float>(float x) { return x; }
template <>
__device__ __forceinline__ float to_float<__half>(__half x) { return __half2float(x); }
template <>
__device__ __forceinline__ float to_float<__nv_bfloat16>(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename T>
__device__ __forceinline__ T from_float(float x);
template <>
__device__ __forceinline__ float from_float<float>(float x) { return x; }
template <>
__device__ __forceinline__ __half from_float<__half>(float x) { return __float2half_rn(x); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) { return __float2bfloat16_rn(x); }

// N elements of T moved as one aligned access (N * sizeof(T) == 16 gives a 128-bit load/store).
template <typename T, int N>
struct alignas(sizeof(T) * N) Pack {
  T v[N];
};

template <typename T, int N>
__device__ __forceinline__ Pack<T, N> load_pack(const T* p) {
  return *reinterpret_cast<const Pack<T, N>*>(p);
}

template <typename T, int N>
__device__ __forceinline__ void store_pack(T* p, const Pack<T, N>& v) {
  *reinterpret_cast<Pack<T, N>*>(p) = v;
}

// Read-only path for data no thread of the kernel writes (K/V cache, query).
template <typename T, int N>
__device__ __forceinline__ Pack<T, N> load_pack_ro(const T* p) {
  static_assert(sizeof(Pack<T, N>) == 16, "load_pack_ro moves 16 bytes");
  uint4 raw = __ldg(reinterpret_cast<const uint4*>(p));
  return *reinterpret_cast<Pack<T, N>*>(&raw);
}

// Sum over groups of WIDTH consecutive lanes (WIDTH a power of two <= 32); every lane gets the sum.
template <int WIDTH>
__device__ __forceinline__ float group_sum(float x) {
#pragma unroll
  for (int off = WIDTH / 2; off > 0; off >>= 1) x += __shfl_xor_sync(0xffffffffu, x, off);
  return x;
}

// Block-wide sum; `scratch` holds >= 32 floats of shared memory. Every thread gets the result,
// and the scratch may be reused right after (the trailing barrier).
__device__ __forceinline__ float block_sum(float x, float* scratch) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int nwarps = (blockDim.x + 31) >> 5;
  x = group_sum<32>(x);
  if (lane == 0) scratch[warp] = x;
  __syncthreads();
  if (warp == 0) {
    float y = lane < nwarps ? scratch[lane] : 0.f;
    y = group_sum<32>(y);
    if (lane == 0) scratch[0] = y;
  }
  __syncthreads();
  const float total = scratch[0];
  __syncthreads();
  return total;
}

__host__ __device__ constexpr int next_pow2(int x) {
  int p = 1;
  while (p < x) p <<= 1;
  return p;
}

__host__ __device__ __forceinline__ int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

}  // namespace lmmrt
