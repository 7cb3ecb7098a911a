"""CUDA path of the masked_cross_attention op: the decode step (one text token per sequence).

The kernel (csrc/include/lmmrt/masked_cross_attention_decode.cuh) is flash-decoding over each
sequence's contiguous media key range: blocks split the keys, each keeps an online-softmax state,
and a combine kernel merges the splits through a workspace allocated here (from torch's caching
allocator, so the op captures into a CUDA graph). `masked_cross_attention_cuda` is what the
backend registry runs for "cuda": T == 1 with a supported dtype and head_dim goes to the kernel,
anything else to the Triton kernel when one is registered, else the torch reference. Mllama's
options (mode "range", media_len, grouped K/V) always take the Triton path: its grouped decode
kernel reads each K/V element once per kv head, which this kernel (one block per query head) would
not.

File layout: argument checks, the launcher (raw pointers + stream to lmmrt._C), the custom op,
the public functions, the registration.
"""

from __future__ import annotations

import functools
import math

import torch

from lmmrt.kernels import backend as _backend
from lmmrt.kernels.cuda_jit.dlpack import accepts_dlpack_arrays
from lmmrt.kernels.masked_cross_attention import MODES, masked_cross_attention_reference

DTYPES = {torch.float16: "float16", torch.bfloat16: "bfloat16"}
HEAD_DIMS = (64, 96, 128)
_INDEX_DTYPES = (torch.int32, torch.int64)
# Mirrors lmmrt::kMinKeysPerSplit: a split never gets fewer keys (the kernel enforces it too).
MIN_KEYS_PER_SPLIT = 64
MAX_SPLITS = 64


def _err(msg: str) -> ValueError:
    return ValueError(f"masked_cross_attention_decode: {msg}")


def check_decode_args(q, k, v, text_time, media_start, media_count, mode) -> None:
    """Shape, dtype and layout first, the device last (so CPU/meta tensors exercise every check)."""
    if mode not in MODES:
        raise _err(f"mode must be one of {MODES}, got {mode!r}")
    if q.dim() != 4 or q.shape[1] != 1:
        raise _err(f"q must be (batch, 1, heads, head_dim), got {tuple(q.shape)}")
    B, _, H, D = q.shape
    if q.dtype not in DTYPES:
        raise _err(f"q must be float16 or bfloat16, got {q.dtype}")
    if D not in HEAD_DIMS:
        raise _err(f"q head_dim must be one of {HEAD_DIMS}, got {D}")
    for name, t in (("k", k), ("v", v)):
        if t.dim() != 4 or t.shape[2] != H or t.shape[3] != D:
            raise _err(f"{name} must be (media, latents, {H}, {D}), got {tuple(t.shape)}")
        if t.dtype != q.dtype:
            raise _err(f"{name} must have q's dtype {q.dtype}, got {t.dtype}")
    if k.shape != v.shape:
        raise _err(f"k {tuple(k.shape)} and v {tuple(v.shape)} must have the same shape")
    if tuple(text_time.shape) not in ((B, 1), (B,)):
        raise _err(f"text_time must be ({B}, 1), got {tuple(text_time.shape)}")
    for name, t in (("media_start", media_start), ("media_count", media_count)):
        if tuple(t.shape) != (B,):
            raise _err(f"{name} must be ({B},), got {tuple(t.shape)}")
    for name, t in (("text_time", text_time), ("media_start", media_start), ("media_count", media_count)):
        if t.dtype not in _INDEX_DTYPES:
            raise _err(f"{name} must be int32 or int64, got {t.dtype}")
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not t.is_contiguous():
            raise _err(f"{name} must be contiguous (got strides {t.stride()}); call .contiguous() first")
    for name, t in (("q", q), ("k", k), ("v", v), ("text_time", text_time), ("media_start", media_start),
                    ("media_count", media_count)):
        if t.device.type != "cuda":
            raise _err(f"{name} must be a CUDA tensor, got device {t.device}")
        if t.device != q.device:
            raise _err(f"{name} is on {t.device}, q is on {q.device}")


@functools.lru_cache(maxsize=None)
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def pick_num_splits(batch: int, heads: int, max_keys: int, sm_count: int) -> int:
    """Splits per (sequence, head): enough blocks for ~4 per SM, never chunks under 64 keys.

    max_keys bounds any sequence's key range (the host cannot read the real ranges without a sync);
    the kernel re-divides each sequence's actual range by this count, and splits past its end exit.
    """
    if batch * heads == 0 or max_keys <= MIN_KEYS_PER_SPLIT:
        return 1
    by_length = math.ceil(max_keys / MIN_KEYS_PER_SPLIT)
    by_occupancy = math.ceil(4 * sm_count / (batch * heads))
    return max(1, min(by_length, by_occupancy, MAX_SPLITS))


def workspace_numel(batch: int, heads: int, head_dim: int, num_splits: int) -> int:
    return 0 if num_splits <= 1 else batch * heads * num_splits * (head_dim + 2)


def launch_decode(out, q, k, v, text_time, media_start, media_count, workspace, *, cumulative: bool,
                  scale: float, num_splits: int) -> None:
    """Raw launch on the current stream into caller-provided `out` and `workspace` (no checks here
    beyond the binding's; use `masked_cross_attention_decode` unless you manage the buffers)."""
    ext = _backend.cuda_kernels()
    if ext is None:
        raise RuntimeError("no CUDA kernels: lmmrt._C is not built and the NVRTC JIT is unusable ("
                           + _backend.cuda_kernels_choice()[1] + ")")
    B, _, H, D = q.shape
    N, L = k.shape[:2]
    tt = text_time[:, -1] if text_time.dim() == 2 else text_time
    # The binding launches on the calling thread's current device: make it q's (a stream of
    # cuda:1 used while cuda:0 is current is an invalid-resource-handle launch error).
    with torch.cuda.device(q.device):
        ext.masked_cross_attention_decode(
            out.data_ptr(), q.data_ptr(), k.data_ptr(), v.data_ptr(),
            tt.data_ptr(), media_start.data_ptr(), media_count.data_ptr(),
            workspace.data_ptr() if workspace is not None else 0,
            batch=B, heads=H, head_dim=D, latents=L, num_media=N,
            q_strides=(q.stride(0), q.stride(2)), out_strides=(out.stride(0), out.stride(2)),
            kv_strides=(k.stride(1), k.stride(2)),
            index_strides=(tt.stride(0), media_start.stride(0), media_count.stride(0)),
            index_int64=(tt.dtype == torch.int64, media_start.dtype == torch.int64, media_count.dtype == torch.int64),
            cumulative=cumulative, scale=float(scale), num_splits=int(num_splits), dtype=DTYPES[q.dtype],
            stream=torch.cuda.current_stream(q.device).cuda_stream,
        )


@torch.library.custom_op("lmmrt::masked_cross_attention_decode", mutates_args=())
def _decode_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, text_time: torch.Tensor,
               media_start: torch.Tensor, media_count: torch.Tensor, cumulative: bool, scale: float,
               num_splits: int) -> torch.Tensor:
    B, _, H, D = q.shape
    N, L = k.shape[:2]
    if num_splits <= 0:
        # Immediate mode reads one media item; cumulative at most every media item of the cache.
        max_keys = N * L if cumulative else L
        num_splits = pick_num_splits(B, H, max_keys, _sm_count(q.device.index or 0))
    out = torch.empty_like(q)
    ws = torch.empty(workspace_numel(B, H, D, num_splits), dtype=torch.float32, device=q.device)
    launch_decode(out, q, k, v, text_time, media_start, media_count, ws if num_splits > 1 else None,
                  cumulative=cumulative, scale=scale, num_splits=num_splits)
    return out


@_decode_op.register_fake
def _decode_fake(q, k, v, text_time, media_start, media_count, cumulative, scale, num_splits):
    return torch.empty_like(q)


@accepts_dlpack_arrays
def masked_cross_attention_decode(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    text_time: torch.Tensor,
    media_start: torch.Tensor,
    media_count: torch.Tensor,
    *,
    mode: str = "immediate",
    scale: float | None = None,
    num_splits: int | None = None,
) -> torch.Tensor:
    """The CUDA decode kernel, strictly checked (ValueError naming the argument).

    q: (B, 1, H, dh) float16/bfloat16, dh in 64/96/128; k, v: (N, L, H, dh) contiguous packed media
    K/V; text_time: (B, 1) or (B,) int32/int64; media_start, media_count: (B,) int32/int64.
    num_splits: key splits per (sequence, head), None = picked from the shape and the GPU.
    Returns (B, 1, H, dh).
    """
    if num_splits is not None and not 1 <= num_splits <= 65535:
        raise _err(f"num_splits must be in [1, 65535], got {num_splits}")
    check_decode_args(q, k, v, text_time, media_start, media_count, mode)
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    return _decode_op(q, k, v, text_time, media_start, media_count, mode == "cumulative", scale, num_splits or 0)


def _fallback():
    # Not _backend.resolve(..., "triton", ...): on CUDA that could hand back this very function.
    triton_impl = _backend._REGISTRY.get("masked_cross_attention", {}).get("triton")
    return triton_impl if triton_impl is not None else masked_cross_attention_reference


def supports(q: torch.Tensor, k: torch.Tensor, *, mode: str = "immediate",
             media_len: torch.Tensor | None = None) -> bool:
    """Whether the CUDA kernel takes this call (else the op falls back). The kernel implements the
    immediate and cumulative modes with one kv head per query head and whole media items; Mllama's
    options (mode "range", media_len, grouped-query k/v) go to the Triton kernel."""
    return (q.dim() == 4 and q.shape[1] == 1 and q.dtype in DTYPES and q.shape[-1] in HEAD_DIMS
            and mode in ("immediate", "cumulative") and media_len is None and k.shape[2] == q.shape[2])


def masked_cross_attention_cuda(q, k, v, text_time, media_start, media_count, *, mode: str = "immediate",
                                text_time_first: torch.Tensor | None = None, media_len: torch.Tensor | None = None,
                                scale: float | None = None) -> torch.Tensor:
    """The "cuda" backend entry: decode (T == 1, fp16/bf16, dh 64/96/128, immediate or cumulative,
    no media_len, no GQA) on the kernel; everything else on the Triton kernel when registered,
    else the torch reference."""
    if supports(q, k, mode=mode, media_len=media_len):
        # The kernel needs contiguous q/k/v (the Triton path takes any strides): no-ops for the
        # model's tensors, a copy for a strided caller's.
        return masked_cross_attention_decode(q.contiguous(), k.contiguous(), v.contiguous(), text_time,
                                             media_start, media_count, mode=mode, scale=scale)
    return _fallback()(q, k, v, text_time, media_start, media_count, mode=mode, text_time_first=text_time_first,
                       media_len=media_len, scale=scale)


if _backend.cuda_kernels() is not None:
    _backend.register("masked_cross_attention", "cuda", masked_cross_attention_cuda)
