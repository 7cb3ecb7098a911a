"""Masked cross-attention of text tokens over the media K/V cache (GATED XATTN-DENSE's attention).

Which media a text token sees is given by its media ordinal `text_time` (flamingo.md §4.1):
- "immediate": row i attends only to the n_latents keys of media `text_time[i]`;
- "cumulative": row i attends to media 1..text_time[i];
- "range" (Mllama): row i attends to media text_time_first[i]..text_time[i] (a run of consecutive
  image markers shares its images: the processor's cross-attention mask rule).
A row with text_time == 0 (text before any media) gets zeros in immediate and range modes (Mllama's
own rule for such rows is applied by its model, outside this op); in cumulative mode it reproduces
OpenFlamingo, whose all-masked row softmaxes to a uniform average over every media key of the
sequence (zeros if the sequence has no media at all).

Optional, every mode: media_len (N,) — media item m has only media_len[m] valid keys (Mllama: the
tiles of the image; the padding tiles after them are never seen). Grouped-query attention: k and v
may have fewer heads than q (KVH dividing H); query head h reads kv head h // (H // KVH).

The tanh gate is not applied here: it is folded into the output projection at load time.
Media K/V of all sequences are packed along the first axis; sequence b owns media
`media_start[b] : media_start[b] + media_count[b]`.

File layout: reference (also the CPU path), then launch configurations, the launcher of the Triton
kernels (in masked_cross_attention_kernels.py) and its torch.library op, then the public
dispatching op.

Kernels (backend "triton"), chosen by T:
- prefill (T > 1): one program per (query block, batch, head); the key range of the block is
  computed in the kernel from text_time (the union of its rows' media, masked per row); no dense
  mask is ever built; sequences of different lengths and media counts share one launch. With
  grouped K/V a block's rows are (token, query head) pairs of one kv head, sharing its K/V tiles.
- decode (T == 1): one program per (batch, head, key split) (flash-decoding) plus a combine
  kernel that merges the split partials when the key range is long (video, cumulative mode,
  Mllama's tiles); with grouped K/V, one program per (batch, kv head, key split) whose rows are
  the query heads of that kv head (each K/V element read once, not once per query head).
Accumulation is fp32; the output is q's dtype.
"""

from __future__ import annotations

import contextlib

import torch

from lmmrt.kernels import backend as _backend

MODES = ("immediate", "cumulative", "range")


def masked_cross_attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    text_time: torch.Tensor,
    media_start: torch.Tensor,
    media_count: torch.Tensor,
    *,
    mode: str = "immediate",
    text_time_first: torch.Tensor | None = None,
    media_len: torch.Tensor | None = None,
    scale: float | None = None,
) -> torch.Tensor:
    """Plain-PyTorch reference (dense per-sequence mask), computed in float32 (float64 stays).

    q: (B, T, H, dh); k, v: (N, L, KVH, dh) packed media K/V (H % KVH == 0: query head h reads kv
    head h // (H // KVH)); text_time, text_time_first: (B, T) int; media_start, media_count: (B,)
    int; media_len: (N,) int, the valid keys of each media item (None: all L).
    Returns (B, T, H, dh) in q's dtype.
    """
    B, T, H, D = q.shape
    N, L, KVH = k.shape[:3]
    out_dtype = q.dtype
    cdt = torch.float64 if q.dtype == torch.float64 else torch.float32
    scale = D**-0.5 if scale is None else scale
    dev = q.device
    maxn = int(media_count.max()) if B > 0 else 0
    if maxn == 0 or T == 0:
        return torch.zeros_like(q)
    j = torch.arange(maxn, device=dev)
    valid = j[None, :] < media_count[:, None].to(dev)  # (B, maxn)
    idx = torch.where(valid, media_start[:, None].to(dev).long() + j[None, :], torch.zeros_like(j)[None, :])
    group = H // KVH
    kb = k[idx].to(cdt).reshape(B, maxn * L, KVH, D).repeat_interleave(group, dim=2).transpose(1, 2)
    vb = v[idx].to(cdt).reshape(B, maxn * L, KVH, D).repeat_interleave(group, dim=2).transpose(1, 2)
    key_valid = valid[:, :, None].expand(B, maxn, L)  # (B, maxn, L)
    if media_len is not None:
        key_valid = key_valid & (torch.arange(L, device=dev) < media_len.to(dev)[idx][:, :, None])
    key_valid = key_valid.reshape(B, 1, maxn * L)
    tt = text_time.to(dev).long()[:, :, None]  # (B, T, 1)
    ordinal = (j + 1)[None, None, :]
    if mode == "immediate":
        seen = tt == ordinal
    elif mode == "cumulative":
        seen = tt >= ordinal
    elif mode == "range":
        seen = (tt >= ordinal) & (text_time_first.to(dev).long()[:, :, None] <= ordinal)
    else:
        raise ValueError(f"masked_cross_attention: mode must be one of {MODES}, got {mode!r}")
    allowed = (seen.repeat_interleave(L, dim=-1) & key_valid)[:, None]  # (B, 1, T, maxn*L)
    # keys never seen (past media_len, stand-ins for missing media) may hold anything, NaN too:
    # a zero weight must not meet them
    vb = vb.masked_fill(~key_valid[..., None], 0)
    scores = torch.matmul(q.to(cdt).transpose(1, 2), kb.transpose(-1, -2)) * scale  # (B, H, T, maxn*L)
    if mode == "cumulative":
        # OpenFlamingo: a row with no media has every score masked to the same value, so its
        # softmax is uniform over all the sequence's (valid) media keys.
        no_media = (tt == 0)[:, None]  # (B, 1, T, 1)
        scores = torch.where(no_media, torch.zeros_like(scores), scores)
        allowed = allowed | (no_media & key_valid[:, None])
    scores = scores.masked_fill(~allowed, float("-inf"))
    attn = torch.softmax(scores, dim=-1)
    attn = torch.nan_to_num(attn, nan=0.0)  # rows with nothing allowed -> zero output
    out = torch.matmul(attn, vb).transpose(1, 2)
    return out.to(out_dtype)


# ---------------------------------------------------------------------------------------------
# Triton launch
# ---------------------------------------------------------------------------------------------
# The kernels (and the shared split combine, under this op's own name) are module globals of this
# file: the launcher looks them up here, so tests can spy on each launch.
from lmmrt.kernels.masked_cross_attention_kernels import MODE_IDS as _MODE_IDS  # noqa: E402
from lmmrt.kernels.masked_cross_attention_kernels import (  # noqa: E402
    _xattn_decode_gqa_kernel,
    _xattn_decode_kernel,
    _xattn_prefill_kernel,
)
from lmmrt.kernels.triton_common import KERNEL_DTYPES as _KERNEL_DTYPES  # noqa: E402
from lmmrt.kernels.triton_common import LOG2E as _LOG2E  # noqa: E402
from lmmrt.kernels.triton_common import MAX_HEAD_DIM as _MAX_HEAD_DIM  # noqa: E402
from lmmrt.kernels.triton_common import NEG_INIT as _NEG_INIT  # noqa: E402
from lmmrt.kernels.triton_common import attention_tiles as _attention_tiles  # noqa: E402
from lmmrt.kernels.triton_common import interpreted as _interpreted  # noqa: E402
from lmmrt.kernels.triton_common import next_pow2 as _next_pow2  # noqa: E402
from lmmrt.kernels.triton_common import sm_count as _sm_count  # noqa: E402
from lmmrt.kernels.triton_common import split_softmax_combine_kernel as _xattn_decode_combine_kernel  # noqa: E402
from lmmrt.kernels.triton_common import split_workspaces as _split_workspaces  # noqa: E402
from lmmrt.kernels.triton_common import triton  # noqa: E402


def _prefill_config(T: int, dh: int, dtype: torch.dtype, device) -> dict:
    """Launch configuration by a plain heuristic (the interpreter cannot autotune)."""
    block_d = max(16, _next_pow2(dh))
    if _interpreted(device):
        # ~1 ms per program instance and per loop iteration in the interpreter: big tiles.
        return dict(BLOCK_M=min(128, max(16, _next_pow2(T))), BLOCK_N=128, BLOCK_D=block_d,
                    num_warps=4, num_stages=1)
    # 64 query rows (up to 128-wide heads): a 64-key media block of one image is one tile; a text
    # block rarely spans more than two media, so the union-range loop wastes little.
    tiles = _attention_tiles(block_d, dtype)
    rows = tiles["BLOCK_ROWS"]
    return dict(BLOCK_M=rows if T > rows // 2 else max(16, _next_pow2(T)), BLOCK_N=tiles["BLOCK_N"],
                BLOCK_D=block_d, num_warps=tiles["num_warps"], num_stages=tiles["num_stages"])


def _decode_config(BH: int, N: int, L: int, dh: int, whole_range: bool, device, *, dtype: torch.dtype,
                   grouped: bool) -> dict:
    """Decode (T == 1) launch: how many key splits (flash-decoding), and the key tile.

    Chosen from shapes only — the real key range lives in text_time on the device and reading it
    would be a host sync (and break CUDA-graph capture). The bound is L keys in immediate mode and
    N * L (every packed media item) in cumulative and range modes; splits that find no keys exit
    at once. BH counts (sequence, head) programs: kv heads when grouped.
    """
    block_d = max(16, _next_pow2(dh))
    key_bound = L * (N if whole_range else 1)
    if _interpreted(device):
        return dict(BLOCK_N=128, BLOCK_D=block_d, NUM_SPLITS=max(1, min(4, triton.cdiv(key_bound, 256))),
                    num_warps=4, num_stages=1)
    # enough (b, head, split) programs for two waves, each split streaming >= 256 keys
    target = triton.cdiv(2 * _sm_count(device), max(BH, 1))
    n_splits = max(1, min(target, triton.cdiv(key_bound, 256), 128))
    if grouped:
        # the tl.dot kernel stages K and V tiles in shared memory: the prefill's tile sizes fit
        # (64-key tiles in fp32 at dh 256 would need ~280 KiB)
        tiles = _attention_tiles(block_d, dtype)
        return dict(BLOCK_N=tiles["BLOCK_N"], BLOCK_D=block_d, NUM_SPLITS=n_splits, num_warps=tiles["num_warps"],
                    num_stages=tiles["num_stages"])
    return dict(BLOCK_N=64, BLOCK_D=block_d, NUM_SPLITS=n_splits, num_warps=4 if block_d <= 64 else 8,
                num_stages=3)


def _masked_cross_attention_launch(q, k, v, text_time, text_time_first, media_start, media_count, media_len,
                                   out, mode_id: int, scale: float, num_splits: int) -> None:
    B, T, H, dh = q.shape
    N, L, KVH = k.shape[:3]
    if B == 0 or T == 0 or H == 0:
        return
    if N == 0 or L == 0:  # no media anywhere: every mode gives zeros
        out.zero_()
        return
    qk_scale = float(scale) * _LOG2E
    # Unused pointers (no text_time_first outside range mode, no media_len) get a stand-in the
    # kernel never reads: the MODE / HAS_MEDIA_LEN constexprs compile the reads out.
    ttf = text_time if text_time_first is None else text_time_first
    ml = media_start if media_len is None else media_len
    group = H // KVH
    dev_ctx = torch.cuda.device(q.device) if q.device.type == "cuda" else contextlib.nullcontext()
    with dev_ctx:
        if T > 1:
            # rows: (token, query head of a kv head) pairs, so grouped heads share K/V tiles. This
            # saves K/V reads (up to GROUP times) only when T is under a block of rows (short
            # prompts, prefill chunks): longer ones reuse each tile over a full block either way.
            cfg = _prefill_config(T * group, dh, q.dtype, q.device)
            grid = (triton.cdiv(T * group, cfg["BLOCK_M"]), B * KVH)
            _xattn_prefill_kernel[grid](
                q, k, v, text_time, ttf, media_start, media_count, ml, out,
                *q.stride(), *k.stride(), *v.stride(), *text_time.stride(), *ttf.stride(), media_start.stride(0),
                media_count.stride(0), ml.stride(0), *out.stride(),
                T, KVH, L, qk_scale,
                MODE=mode_id, HAS_MEDIA_LEN=media_len is not None, GROUP=group, HEAD_DIM=dh,
                BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], BLOCK_D=cfg["BLOCK_D"], NEG_INIT=_NEG_INIT,
                # fp32 inputs are the accurate path: no TF32 rounding of q.k (the argument only
                # matters for fp32 operands; fp16/bf16 keep the default).
                DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
                num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
            )
            return
        cfg = _decode_config(B * KVH, N, L, dh, mode_id != _MODE_IDS["immediate"], q.device, dtype=q.dtype,
                             grouped=group > 1)
        splits = num_splits if num_splits > 0 else cfg["NUM_SPLITS"]
        if splits > 1:
            ws_acc, ws_m, ws_l = _split_workspaces(B * H * splits, cfg["BLOCK_D"], q.device)
        else:
            ws_acc = ws_m = ws_l = out  # never touched
        args = (q, k, v, text_time, ttf, media_start, media_count, ml, out, ws_acc, ws_m, ws_l,
                q.stride(0), q.stride(2), q.stride(3), *k.stride(), *v.stride(), text_time.stride(0), ttf.stride(0),
                media_start.stride(0), media_count.stride(0), ml.stride(0), out.stride(0), out.stride(2),
                out.stride(3))
        meta = dict(MODE=mode_id, HAS_MEDIA_LEN=media_len is not None, HEAD_DIM=dh, BLOCK_N=cfg["BLOCK_N"],
                    BLOCK_D=cfg["BLOCK_D"], NUM_SPLITS=splits, NEG_INIT=_NEG_INIT, num_warps=cfg["num_warps"],
                    num_stages=cfg["num_stages"])
        if group == 1:
            _xattn_decode_kernel[(B * H, splits)](*args, H, L, qk_scale, **meta)
        else:
            _xattn_decode_gqa_kernel[(B * KVH, splits)](
                *args, H, KVH, L, group, qk_scale, BLOCK_G=max(16, _next_pow2(group)),
                DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32", **meta)
        if splits > 1:
            _xattn_decode_combine_kernel[(B * H,)](
                ws_acc, ws_m, ws_l, out, out.stride(0), out.stride(2), out.stride(3), H,
                HEAD_DIM=dh, BLOCK_D=cfg["BLOCK_D"], NUM_SPLITS=splits, SPLITS_P2=_next_pow2(splits),
                NEG_INIT=_NEG_INIT, num_warps=4 if cfg["BLOCK_D"] <= 64 else 8,
            )


# torch.library op: torch.compile(fullgraph=True) sees one opaque node, and CUDA-graph capture
# works (no host sync: the key ranges are read from text_time on the device; workspaces are
# allocated through torch). It writes into `out`; the functional wrapper below allocates it.
@torch.library.custom_op("lmmrt::masked_cross_attention", mutates_args=("out",))
def _masked_cross_attention_op(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, text_time: torch.Tensor,
    text_time_first: torch.Tensor | None, media_start: torch.Tensor, media_count: torch.Tensor,
    media_len: torch.Tensor | None, out: torch.Tensor, mode_id: int, scale: float, num_splits: int,
) -> None:
    # (not "mode": torch's dispatch of custom ops under torch.compile passes a "mode" of its own)
    _masked_cross_attention_launch(q, k, v, text_time, text_time_first, media_start, media_count, media_len,
                                   out, mode_id, scale, num_splits)


@_masked_cross_attention_op.register_fake
def _(q, k, v, text_time, text_time_first, media_start, media_count, media_len, out, mode_id, scale,
      num_splits) -> None:
    return None


def masked_cross_attention_triton(
    q, k, v, text_time, media_start, media_count, *, mode: str = "immediate",
    text_time_first: torch.Tensor | None = None, media_len: torch.Tensor | None = None,
    scale: float | None = None, out: torch.Tensor | None = None, num_splits: int = 0,
) -> torch.Tensor:
    """The Triton implementation (same contract as the reference, plus `out=`).

    T > 1 runs the prefill kernel, T == 1 the decode kernel; num_splits > 0 forces the decode
    key split (0: heuristic).
    """
    dh = q.shape[-1]
    if q.dtype not in _KERNEL_DTYPES or dh > _MAX_HEAD_DIM:
        # Outside what the kernels are built for (fp64, huge head dims): the reference is exact.
        res = masked_cross_attention_reference(q, k, v, text_time, media_start, media_count, mode=mode,
                                               text_time_first=text_time_first, media_len=media_len, scale=scale)
        return res if out is None else out.copy_(res)
    if out is None:
        out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    torch.ops.lmmrt.masked_cross_attention(q, k, v, text_time, text_time_first, media_start, media_count, media_len, out, _MODE_IDS[mode],
                                           float(dh**-0.5 if scale is None else scale), int(num_splits))
    return out


def _check(q, k, v, text_time, media_start, media_count, mode, text_time_first, media_len):
    def bad(msg):
        return ValueError(f"masked_cross_attention: {msg}")

    if mode not in MODES:
        raise bad(f"mode must be one of {MODES}, got {mode!r}")
    if q.dim() != 4:
        raise bad(f"q must be (batch, text, heads, head_dim), got {tuple(q.shape)}")
    B, T, H, D = q.shape
    for name, t in (("k", k), ("v", v)):
        if t.dim() != 4 or t.shape[3] != D:
            raise bad(f"{name} has shape {tuple(t.shape)}, expected (media, latents, kv_heads, {D})")
        if t.dtype != q.dtype or t.device != q.device:
            raise bad(f"{name} is {t.dtype} on {t.device}, q is {q.dtype} on {q.device}")
    if k.shape != v.shape:
        raise bad(f"k {tuple(k.shape)} and v {tuple(v.shape)} differ")
    if k.shape[2] == 0 or H % k.shape[2]:
        raise bad(f"k/v have {k.shape[2]} heads, which must divide q's {H} heads (grouped-query attention)")
    if mode == "range" and text_time_first is None:
        raise bad("mode 'range' needs text_time_first (the first media ordinal each token sees)")
    if mode != "range" and text_time_first is not None:
        raise bad(f"text_time_first is only read in mode 'range', got mode {mode!r}")
    index = [("text_time", text_time, (B, T)), ("text_time_first", text_time_first, (B, T)),
             ("media_start", media_start, (B,)), ("media_count", media_count, (B,)),
             ("media_len", media_len, (k.shape[0],))]
    for name, t, shape in index:
        if t is None:
            continue
        if tuple(t.shape) != shape:
            raise bad(f"{name} has shape {tuple(t.shape)}, expected {shape}")
        if t.dtype not in (torch.int32, torch.int64):
            raise bad(f"{name} must be int32 or int64, got {t.dtype}")
        if t.device != q.device:
            raise bad(f"{name} is on {t.device}, q is on {q.device}")


def masked_cross_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    text_time: torch.Tensor,
    media_start: torch.Tensor,
    media_count: torch.Tensor,
    *,
    mode: str = "immediate",
    text_time_first: torch.Tensor | None = None,
    media_len: torch.Tensor | None = None,
    scale: float | None = None,
    backend: str = "torch",
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Text queries attend to their media's cached K/V through the media-ordinal mask.

    q: (B, T, H, dh) — T == 1 is the decode step; k, v: (N, L, KVH, dh) packed media K/V of every
    sequence (L keys per media item; KVH divides H: grouped-query attention); text_time: (B, T)
    media ordinal of each token (0 = none); media_start, media_count: (B,) each sequence's media
    slice of k/v. mode "range" also needs text_time_first (B, T): the first media ordinal each token
    sees (it sees text_time_first..text_time). media_len: optional (N,) valid keys of each media
    item (keys at index >= media_len[m] are never seen).
    Index tensors are trusted (the runtime builds them); shapes and dtypes are checked here.
    out: optional (B, T, H, dh) buffer of q's dtype and device (any strides) to write into.
    Returns (B, T, H, dh) (`out` when given).
    """
    _check(q, k, v, text_time, media_start, media_count, mode, text_time_first, media_len)
    if out is not None and (out.shape != q.shape or out.dtype != q.dtype or out.device != q.device):
        raise ValueError(f"masked_cross_attention: out is {tuple(out.shape)} {out.dtype} on {out.device}, "
                         f"expected {tuple(q.shape)} {q.dtype} on {q.device}")
    name = _backend.resolve_name("masked_cross_attention", backend, q.device)
    impl = _backend.resolve("masked_cross_attention", backend, q.device)
    args = (q, k, v, text_time, media_start, media_count)
    kw = dict(mode=mode, text_time_first=text_time_first, media_len=media_len, scale=scale)
    if out is None:
        return impl(*args, **kw)
    if name == "triton":
        return impl(*args, **kw, out=out)
    return out.copy_(impl(*args, **kw))


_backend.register("masked_cross_attention", "torch", masked_cross_attention_reference)
if triton is not None:
    _backend.register("masked_cross_attention", "triton", masked_cross_attention_triton)
