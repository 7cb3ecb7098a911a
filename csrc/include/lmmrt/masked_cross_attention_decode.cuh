// Decode-time masked cross-attention: one query token per sequence (all heads) against the media
// K/V cache, flash-decoding style. Torch-free: raw pointers, element strides, a cudaStream_t.
//
// Semantics (lmmrt/kernels/masked_cross_attention.py, flamingo.md 4.1), per sequence b with
// t = text_time[b], s = media_start[b], c = media_count[b]:
//   immediate : keys of media s + t - 1 when 1 <= t <= c, else none (zero output)
//   cumulative: keys of media s .. s + min(t, c) - 1 when t >= 1; when t == 0 and c > 0 every
//               score is the same (OpenFlamingo's all-masked row), so the output is the uniform
//               average of V over all c media; no media at all -> zero output.
// The keys of consecutive media are consecutive rows of the packed (N*L, H, dh) cache, so every
// sequence attends to one contiguous key range [key0, key0 + len).
//
// Work split: grid (num_splits, heads, batch), 128 threads. A block owns one (sequence, head) and
// a contiguous chunk of its key range: chunk = max(ceil(len / num_splits), kMinKeysPerSplit), so
// short ranges use few splits and the rest exit at once. Inside a block, groups of TPK lanes
// (TPK * 8 >= head_dim) own one key at a time: each lane loads 16 bytes of K and of V, the dot
// product is reduced with xor shuffles inside the group, and the group keeps an online-softmax
// state (max, sum, acc[8]) in fp32. Groups stride over the chunk UNROLL keys at a time so several
// 16-byte loads per lane are in flight. The groups are merged through shared memory; with one
// split the block writes the output, otherwise it writes (max, sum, acc) to the workspace and a
// combine kernel (grid (heads, batch), head_dim threads) merges the splits. Every K/V element is
// read by exactly one block, once.
#pragma once
#include "lmmrt/common.cuh"

namespace lmmrt {

namespace decode_detail {

// Block size and keys in flight per group of the split kernel (also named by the NVRTC JIT).
constexpr int kDecodeThreads = 128, kDecodeUnroll = 4;

__device__ __forceinline__ int64_t load_index(const void* p, bool is64, int64_t i) {
  return is64 ? __ldg(static_cast<const long long*>(p) + i) : (int64_t)__ldg(static_cast<const int*>(p) + i);
}

struct KeyRange {
  int64_t key0, len;
  bool uniform;
};

__device__ __forceinline__ KeyRange key_range(const DecodeParams& p, int b) {
  const int64_t t = load_index(p.text_time, p.tt_int64, b * p.tt_stride);
  const int64_t start = load_index(p.media_start, p.ms_int64, b * p.ms_stride);
  int64_t count = load_index(p.media_count, p.mc_int64, b * p.mc_stride);
  // Index tensors are trusted, but never read outside the cache.
  if (start < 0 || start >= p.num_media) count = 0;
  count = min(count, p.num_media - start);
  KeyRange r{0, 0, false};
  if (count <= 0) return r;
  int64_t first = start, n = 0;
  if (!p.cumulative) {
    if (t >= 1 && t <= count) { first = start + t - 1; n = 1; }
  } else if (t == 0) {
    n = count;
    r.uniform = true;
  } else if (t > 0) {
    n = min(t, count);
  }
  r.key0 = first * p.latents;
  r.len = n * p.latents;
  return r;
}

template <typename T, int HEAD_DIM, int NUM_THREADS, int UNROLL>
__global__ void __launch_bounds__(NUM_THREADS) decode_split_kernel(const DecodeParams p) {
  constexpr int VEC = 16 / sizeof(T);
  constexpr int LANES = HEAD_DIM / VEC;       // lanes holding part of a head row
  constexpr int TPK = next_pow2(LANES);       // lanes per key group (96 -> 12 used of 16)
  constexpr int GROUPS = NUM_THREADS / TPK;   // keys processed side by side
  constexpr float kLog2e = 1.4426950408889634f;
  static_assert(HEAD_DIM % VEC == 0 && TPK <= 32 && NUM_THREADS % 32 == 0, "bad decode config");

  __shared__ float sm_acc[GROUPS][HEAD_DIM];
  __shared__ float sm_m[GROUPS], sm_l[GROUPS];

  const int tid = threadIdx.x, g = tid / TPK, lane = tid % TPK;
  const bool active = lane < LANES;
  const int split = blockIdx.x, h = blockIdx.y, b = blockIdx.z;

  const KeyRange r = key_range(p, b);
  const int64_t chunk = max(ceil_div(r.len, p.num_splits), (int64_t)kMinKeysPerSplit);
  const int64_t kbeg = min((int64_t)split * chunk, r.len);
  const int64_t kend = min(kbeg + chunk, r.len);

  // q pre-scaled into the log2 domain; the uniform rule is "every score is 0": q = 0 does that.
  float qf[VEC];
#pragma unroll
  for (int i = 0; i < VEC; ++i) qf[i] = 0.f;
  if (active && !r.uniform && kbeg < kend) {
    const Pack<T, VEC> qp = load_pack_ro<T, VEC>(static_cast<const T*>(p.q) + b * p.q_stride_b +
                                                 h * p.q_stride_h + lane * VEC);
#pragma unroll
    for (int i = 0; i < VEC; ++i) qf[i] = to_float(qp.v[i]) * (p.scale * kLog2e);
  }

  const T* kbase = static_cast<const T*>(p.k) + r.key0 * p.kv_stride_tok + h * p.kv_stride_h + lane * VEC;
  const T* vbase = static_cast<const T*>(p.v) + r.key0 * p.kv_stride_tok + h * p.kv_stride_h + lane * VEC;

  float m = -INFINITY, l = 0.f, acc[VEC];
#pragma unroll
  for (int i = 0; i < VEC; ++i) acc[i] = 0.f;

  // The loop bounds are block-uniform so every lane reaches the shuffles.
  for (int64_t base = kbeg; base < kend; base += (int64_t)GROUPS * UNROLL) {
    Pack<T, VEC> kp[UNROLL], vp[UNROLL];
    bool valid[UNROLL];
#pragma unroll
    for (int u = 0; u < UNROLL; ++u) {
      const int64_t key = base + u * GROUPS + g;
      valid[u] = key < kend;
#pragma unroll
      for (int i = 0; i < VEC; ++i) { kp[u].v[i] = from_float<T>(0.f); vp[u].v[i] = from_float<T>(0.f); }
      if (valid[u] && active) {
        if (!r.uniform) kp[u] = load_pack_ro<T, VEC>(kbase + key * p.kv_stride_tok);
        vp[u] = load_pack_ro<T, VEC>(vbase + key * p.kv_stride_tok);
      }
    }
    float s[UNROLL];
    float mx = m;
#pragma unroll
    for (int u = 0; u < UNROLL; ++u) {
      float d = 0.f;
#pragma unroll
      for (int i = 0; i < VEC; ++i) d = fmaf(qf[i], to_float(kp[u].v[i]), d);
      d = group_sum<TPK>(d);
      s[u] = valid[u] ? d : -INFINITY;
      mx = fmaxf(mx, s[u]);
    }
    if (mx != -INFINITY) {  // this group saw at least one key so far
      const float corr = exp2f(m - mx);
      l *= corr;
#pragma unroll
      for (int i = 0; i < VEC; ++i) acc[i] *= corr;
#pragma unroll
      for (int u = 0; u < UNROLL; ++u) {
        const float pu = exp2f(s[u] - mx);
        l += pu;
#pragma unroll
        for (int i = 0; i < VEC; ++i) acc[i] = fmaf(pu, to_float(vp[u].v[i]), acc[i]);
      }
      m = mx;
    }
  }

  // Merge the groups of the block.
  if (lane == 0) { sm_m[g] = m; sm_l[g] = l; }
  if (active) {
#pragma unroll
    for (int i = 0; i < VEC; ++i) sm_acc[g][lane * VEC + i] = acc[i];
  }
  __syncthreads();

  float bm = -INFINITY;
#pragma unroll
  for (int j = 0; j < GROUPS; ++j) bm = fmaxf(bm, sm_m[j]);
  float bl = 0.f;
  if (bm != -INFINITY) {
#pragma unroll
    for (int j = 0; j < GROUPS; ++j) bl += sm_l[j] * exp2f(sm_m[j] - bm);
  }
  for (int d = tid; d < HEAD_DIM; d += NUM_THREADS) {
    float a = 0.f;
    if (bm != -INFINITY) {
#pragma unroll
      for (int j = 0; j < GROUPS; ++j) a = fmaf(sm_acc[j][d], exp2f(sm_m[j] - bm), a);
    }
    if (p.num_splits == 1) {
      T* o = static_cast<T*>(p.out) + b * p.out_stride_b + h * p.out_stride_h;
      o[d] = from_float<T>(bl > 0.f ? a / bl : 0.f);
    } else {
      const int64_t row = ((int64_t)b * p.heads + h) * p.num_splits + split;
      p.ws_acc[row * HEAD_DIM + d] = a;
    }
  }
  if (p.num_splits > 1 && tid == 0) {
    const int64_t row = ((int64_t)b * p.heads + h) * p.num_splits + split;
    p.ws_ml[row * 2] = bm;
    p.ws_ml[row * 2 + 1] = bl;
  }
}

// Merges the num_splits partial states of one (sequence, head). Empty splits carry max = -inf and
// are skipped without reading their (possibly unwritten) accumulator.
template <typename T, int HEAD_DIM>
__global__ void __launch_bounds__(HEAD_DIM) decode_combine_kernel(const DecodeParams p) {
  const int h = blockIdx.x, b = blockIdx.y, d = threadIdx.x;
  const int64_t row0 = ((int64_t)b * p.heads + h) * p.num_splits;
  float M = -INFINITY;
  for (int s = 0; s < p.num_splits; ++s) M = fmaxf(M, p.ws_ml[(row0 + s) * 2]);
  float a = 0.f, l = 0.f;
  if (M != -INFINITY) {
    for (int s = 0; s < p.num_splits; ++s) {
      const float ms = p.ws_ml[(row0 + s) * 2];
      if (ms == -INFINITY) continue;
      const float w = exp2f(ms - M);
      l = fmaf(p.ws_ml[(row0 + s) * 2 + 1], w, l);
      a = fmaf(p.ws_acc[(row0 + s) * HEAD_DIM + d], w, a);
    }
  }
  T* o = static_cast<T*>(p.out) + b * p.out_stride_b + h * p.out_stride_h;
  o[d] = from_float<T>(l > 0.f ? a / l : 0.f);
}

}  // namespace decode_detail

#ifndef __CUDACC_RTC__  // host launchers: NVRTC (lmmrt/kernels/cuda_jit/) compiles device code only
// Launches the split kernel (and the combine kernel when num_splits > 1) on `stream`. No
// allocation, no synchronisation, no host read of device memory: safe inside a CUDA graph.
// Requires 16-byte aligned q/k/v and strides that are multiples of 16 / sizeof(T) elements.
template <typename T, int HEAD_DIM>
cudaError_t masked_cross_attention_decode(const DecodeParams& p, cudaStream_t stream) {
  constexpr int kThreads = decode_detail::kDecodeThreads, kUnroll = decode_detail::kDecodeUnroll;
  if (p.batch <= 0 || p.heads <= 0) return cudaSuccess;
  if (p.num_splits < 1 || (p.num_splits > 1 && (p.ws_acc == nullptr || p.ws_ml == nullptr)))
    return cudaErrorInvalidValue;
  const dim3 grid(p.num_splits, p.heads, p.batch);
  decode_detail::decode_split_kernel<T, HEAD_DIM, kThreads, kUnroll><<<grid, kThreads, 0, stream>>>(p);
  cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess || p.num_splits == 1) return err;
  decode_detail::decode_combine_kernel<T, HEAD_DIM><<<dim3(p.heads, p.batch), HEAD_DIM, 0, stream>>>(p);
  return cudaGetLastError();
}
#endif  // __CUDACC_RTC__

}  // namespace lmmrt
