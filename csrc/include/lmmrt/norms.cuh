// Fused residual-add + RMSNorm / LayerNorm, and the tanh-gated residual epilogue. Torch-free.
//
// norm: one block per row of D elements. Pass 1 forms h = x (+ residual) -- rounded to T, as the
// reference adds in T -- writes it when h_out is given, and reduces sum(h) (LayerNorm) or sum(h^2)
// (RMSNorm) in fp32. LayerNorm takes a second pass for sum((h - mean)^2) (no E[x^2]-E[x]^2
// cancellation). The last pass writes (h - mean) * rstd * w (+ b). Later passes re-read the row
// each thread touched itself (L1/L2 resident), so DRAM sees one read and one or two writes.
// Rows are moved as 16-byte packs when D and every pointer allow it, else element by element.
//
// gated residual: out = x + tanh(gate) * branch, gate of one element or one per channel (D).
#pragma once
#include "lmmrt/common.cuh"

namespace lmmrt {

namespace norm_detail {

template <typename T, typename WT, int VEC>
__global__ void norm_kernel(const NormParams p) {
  __shared__ float scratch[32];
  const int64_t row = blockIdx.x;
  const int nvec = p.dim / VEC;
  const T* x = static_cast<const T*>(p.x) + row * p.dim;
  const T* res = p.residual ? static_cast<const T*>(p.residual) + row * p.dim : nullptr;
  T* hout = p.h_out ? static_cast<T*>(p.h_out) + row * p.dim : nullptr;
  T* out = static_cast<T*>(p.out) + row * p.dim;
  const WT* w = static_cast<const WT*>(p.weight);
  const WT* bias = static_cast<const WT*>(p.bias);
  // What the later passes read: the rounded sum this thread stored, or x itself.
  const T* src = hout ? hout : x;

  float acc = 0.f;
  for (int i = threadIdx.x; i < nvec; i += blockDim.x) {
    Pack<T, VEC> xv = load_pack<T, VEC>(x + i * VEC);
    if (res) {
      const Pack<T, VEC> rv = load_pack<T, VEC>(res + i * VEC);
#pragma unroll
      for (int j = 0; j < VEC; ++j) xv.v[j] = from_float<T>(to_float(xv.v[j]) + to_float(rv.v[j]));
      if (hout) store_pack<T, VEC>(hout + i * VEC, xv);
    }
#pragma unroll
    for (int j = 0; j < VEC; ++j) {
      const float f = to_float(xv.v[j]);
      acc += p.layer_norm ? f : f * f;
    }
  }
  const float total = block_sum(acc, scratch);
  float mean = 0.f, rstd;
  if (p.layer_norm) {
    mean = total / p.dim;
    float sq = 0.f;
    for (int i = threadIdx.x; i < nvec; i += blockDim.x) {
      const Pack<T, VEC> hv = load_pack<T, VEC>(src + i * VEC);
#pragma unroll
      for (int j = 0; j < VEC; ++j) {
        const float c = to_float(hv.v[j]) - mean;
        sq += c * c;
      }
    }
    rstd = rsqrtf(block_sum(sq, scratch) / p.dim + p.eps);
  } else {
    rstd = rsqrtf(total / p.dim + p.eps);
  }
  for (int i = threadIdx.x; i < nvec; i += blockDim.x) {
    const Pack<T, VEC> hv = load_pack<T, VEC>(src + i * VEC);
    const Pack<WT, VEC> wv = load_pack<WT, VEC>(w + i * VEC);
    Pack<T, VEC> ov;
    if (bias) {
      const Pack<WT, VEC> bv = load_pack<WT, VEC>(bias + i * VEC);
#pragma unroll
      for (int j = 0; j < VEC; ++j)
        ov.v[j] = from_float<T>((to_float(hv.v[j]) - mean) * rstd * to_float(wv.v[j]) + to_float(bv.v[j]));
    } else {
#pragma unroll
      for (int j = 0; j < VEC; ++j) ov.v[j] = from_float<T>((to_float(hv.v[j]) - mean) * rstd * to_float(wv.v[j]));
    }
    store_pack<T, VEC>(out + i * VEC, ov);
  }
}

template <typename T, typename GT, int VEC>
__global__ void gated_residual_kernel(T* out, const T* x, const T* branch, const GT* gate, int64_t nvec, int dim,
                                      bool per_channel) {
  const float g0 = per_channel ? 0.f : tanhf(to_float(gate[0]));
  for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < nvec; i += (int64_t)gridDim.x * blockDim.x) {
    const Pack<T, VEC> xv = load_pack<T, VEC>(x + i * VEC);
    const Pack<T, VEC> bv = load_pack<T, VEC>(branch + i * VEC);
    const int c = (int)((i * VEC) % dim);  // VEC divides dim: a pack never crosses a row
    Pack<T, VEC> ov;
#pragma unroll
    for (int j = 0; j < VEC; ++j) {
      const float g = per_channel ? tanhf(to_float(gate[c + j])) : g0;
      ov.v[j] = from_float<T>(to_float(xv.v[j]) + g * to_float(bv.v[j]));
    }
    store_pack<T, VEC>(out + i * VEC, ov);
  }
}

#ifndef __CUDACC_RTC__  // host code: NVRTC (lmmrt/kernels/cuda_jit/) compiles device code only
inline bool aligned16(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15) == 0; }
#endif

}  // namespace norm_detail

#ifndef __CUDACC_RTC__
// Launch on `stream`; graph-safe (no allocation, no sync). rows == 0 launches nothing.
template <typename T, typename WT>
cudaError_t fused_norm(const NormParams& p, cudaStream_t stream) {
  using namespace norm_detail;
  if (p.rows <= 0) return cudaSuccess;
  if (p.dim <= 0 || p.rows > 0x7fffffffLL || (p.residual == nullptr) != (p.h_out == nullptr))
    return cudaErrorInvalidValue;
  constexpr int VT = 16 / sizeof(T), VW = 16 / sizeof(WT);
  constexpr int VEC = VT < VW ? VT : VW;  // a pack of T and of WT must both be aligned
  const bool vec_ok = p.dim % VEC == 0 && aligned16(p.out) && aligned16(p.x) && aligned16(p.weight) &&
                      (!p.h_out || aligned16(p.h_out)) && (!p.residual || aligned16(p.residual)) &&
                      (!p.bias || aligned16(p.bias));
  const int per_thread = vec_ok ? VEC : 1;
  const int nvec = p.dim / per_thread;
  const int threads = (int)(nvec >= 1024 ? 1024 : ((nvec + 31) / 32) * 32);
  if (vec_ok)
    norm_kernel<T, WT, VEC><<<(unsigned)p.rows, threads, 0, stream>>>(p);
  else
    norm_kernel<T, WT, 1><<<(unsigned)p.rows, threads, 0, stream>>>(p);
  return cudaGetLastError();
}

template <typename T, typename GT>
cudaError_t gated_residual(T* out, const T* x, const T* branch, const GT* gate, int64_t numel, int dim,
                           bool per_channel, cudaStream_t stream) {
  using namespace norm_detail;
  if (numel <= 0) return cudaSuccess;
  if (dim <= 0 || numel % dim != 0) return cudaErrorInvalidValue;
  constexpr int VEC = 16 / sizeof(T);
  const bool vec_ok = dim % VEC == 0 && aligned16(out) && aligned16(x) && aligned16(branch);
  const int per_thread = vec_ok ? VEC : 1;
  const int64_t nvec = numel / per_thread;
  const int threads = 256;
  const int64_t blocks = ceil_div(nvec, threads) < 65536 ? ceil_div(nvec, threads) : 65536;
  if (vec_ok)
    gated_residual_kernel<T, GT, VEC><<<(unsigned)blocks, threads, 0, stream>>>(out, x, branch, gate, nvec, dim,
                                                                               per_channel);
  else
    gated_residual_kernel<T, GT, 1><<<(unsigned)blocks, threads, 0, stream>>>(out, x, branch, gate, nvec, dim,
                                                                             per_channel);
  return cudaGetLastError();
}
#endif  // __CUDACC_RTC__

}  // namespace lmmrt
