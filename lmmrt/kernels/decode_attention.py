"""Decode self-attention over the static KV cache (flash-decoding), one new query token per row.

Row b attends to the cache slots [key_start[b], key_end[b]): left padding sits before key_start and
key_end is the current slot + 1. Both bounds are device tensors, so a decode step that calls this op
has fixed shapes and no host sync and can be captured in a CUDA graph; the kernel reads only the
filled slots, instead of attending over the whole allocated cache with a boolean mask. A row whose
range is empty gets zeros. Slots outside the range are never read into the result, whatever they
hold (the cache is allocated uninitialised, so they may hold NaN).

GQA: H query heads share KV key/value heads, query head h reading kv head h // (H // KV).
ALiBi (MPT): slope_h * (key slot - query slot) is added to the scores, the query sitting at slot
key_end - 1; the slot stands in for the position, since left padding shifts keys and queries alike.

File layout: reference (also the CPU path), launch configurations, the Triton split-K kernel, its
launcher (the combine kernel, shared with cross-attention decode, is in triton_common) and
torch.library op, then the public dispatching op.
Accumulation is fp32; the output is q's dtype.
"""

from __future__ import annotations

import contextlib

import torch

from lmmrt.kernels import backend as _backend


def decode_attention_reference(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    key_start: torch.Tensor,
    key_end: torch.Tensor,
    *,
    alibi_slopes: torch.Tensor | None = None,
    scale: float | None = None,
) -> torch.Tensor:
    """Plain-PyTorch reference over the whole allocated cache, in float32 (float64 stays).

    q: (B, H, dh); k_cache, v_cache: (B, KV, S, dh); key_start, key_end: (B,) int;
    alibi_slopes: (H,) float or None. Returns (B, H, dh) in q's dtype.
    No host sync and no data-dependent shape (the key range is a mask, read on the device), so it
    also serves as the fallback inside a captured CUDA graph.
    """
    B, H, D = q.shape
    KV, S = k_cache.shape[1], k_cache.shape[2]
    cdt = torch.float64 if q.dtype == torch.float64 else torch.float32
    scale = D**-0.5 if scale is None else scale
    slots = torch.arange(S, device=q.device)
    start = key_start.to(q.device, torch.long)[:, None]  # (B, 1)
    end = key_end.to(q.device, torch.long)[:, None]
    in_range = (slots >= start) & (slots < end)  # (B, S)
    # q heads of one kv head side by side: (B, KV, G, dh) @ (B, KV, dh, S), no repeated K/V copy
    scores = torch.matmul(q.to(cdt).reshape(B, KV, H // KV, D), k_cache.to(cdt).transpose(-1, -2)) * scale
    if alibi_slopes is not None:
        distance = (slots[None, :] - (end - 1)).to(cdt)  # (B, S): key slot - query slot
        scores = scores + alibi_slopes.to(cdt).reshape(1, KV, H // KV, 1) * distance[:, None, None, :]
    # masked_fill, not an added -inf bias: a NaN slot outside the range must not reach the sum,
    # neither through its score nor through its value (0 * NaN is NaN).
    outside = ~in_range
    scores = scores.masked_fill(outside[:, None, None, :], float("-inf"))
    values = v_cache.to(cdt).masked_fill(outside[:, None, :, None], 0.0)
    out = torch.matmul(torch.softmax(scores, dim=-1), values)
    # an empty range softmaxes to NaN: zeros instead
    out = out.masked_fill(outside.all(dim=-1)[:, None, None, None], 0.0)
    return out.reshape(B, H, D).to(q.dtype)


# ---------------------------------------------------------------------------------------------
# Triton kernels
# ---------------------------------------------------------------------------------------------
from lmmrt.kernels.triton_common import KERNEL_DTYPES as _KERNEL_DTYPES  # noqa: E402
from lmmrt.kernels.triton_common import LOG2E as _LOG2E  # noqa: E402
from lmmrt.kernels.triton_common import MAX_HEAD_DIM as _MAX_HEAD_DIM  # noqa: E402
from lmmrt.kernels.triton_common import NEG_INIT as _NEG_INIT  # noqa: E402
from lmmrt.kernels.triton_common import interpreted as _interpreted  # noqa: E402
from lmmrt.kernels.triton_common import jit as _jit  # noqa: E402
from lmmrt.kernels.triton_common import next_pow2 as _next_pow2  # noqa: E402
from lmmrt.kernels.triton_common import sm_count as _sm_count  # noqa: E402

# (the shared split combine under this op's own name: tests spy on its launches here)
from lmmrt.kernels.triton_common import split_softmax_combine_kernel as _decode_attention_combine_kernel  # noqa: E402
from lmmrt.kernels.triton_common import split_workspaces as _split_workspaces  # noqa: E402
from lmmrt.kernels.triton_common import tl, triton  # noqa: E402

# Pipelined K+V tiles stay within this many bytes of shared memory: well under sm_80's 163 KiB
# per block, leaving room for the dot operands' layout conversions.
_SHARED_BUDGET = 96 * 1024


def _decode_attention_config(B: int, KV: int, group: int, S: int, dh: int, dtype: torch.dtype,
                             device) -> dict:
    """Launch configuration, from shapes only: the filled length lives on the device and reading it
    would be a host sync (and fix the grid of a captured graph to one step's length). Splits are
    planned for the allocated length S; each split takes an equal BLOCK_N-aligned share of the row's
    real range, so while the cache is short the later splits find no keys and exit at once."""
    block_d = max(16, _next_pow2(dh))
    # query heads of one kv head are the rows of one tile; tl.dot needs at least 16 rows
    block_g = max(16, _next_pow2(group))
    if _interpreted(device):
        # ~1 ms per program instance and loop iteration in the interpreter: few, large programs
        return dict(BLOCK_G=block_g, BLOCK_N=64, BLOCK_D=block_d, NUM_SPLITS=1, num_warps=4, num_stages=1)
    elem = torch.finfo(dtype).bits // 8
    block_n = 64 if block_d * elem <= 256 else 32  # fp16/bf16 up to dh 128, fp32 up to dh 64
    tile_bytes = 2 * block_n * block_d * elem  # one K tile and one V tile
    # enough (row, kv head, split) programs for two waves, each split streaming >= 256 keys
    target = triton.cdiv(2 * _sm_count(device), max(B * KV, 1))
    n_splits = max(1, min(target, triton.cdiv(S, 256), 64))
    return dict(BLOCK_G=block_g, BLOCK_N=block_n, BLOCK_D=block_d, NUM_SPLITS=n_splits,
                num_warps=8 if block_d >= 256 else 4,
                num_stages=max(1, min(3, _SHARED_BUDGET // tile_bytes)))


@_jit
def _decode_attention_kernel(
    Q, K, V, KS, KE, SLOPES, O, WS_ACC, WS_M, WS_L,
    sq_b, sq_h, sq_d,
    sk_b, sk_h, sk_s, sk_d,
    sv_b, sv_h, sv_s, sv_d,
    sks, ske,
    so_b, so_h, so_d,
    H, KV, S, qk_scale,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr, NUM_SPLITS: tl.constexpr, HAS_ALIBI: tl.constexpr, NEG_INIT: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    # grid: (batch * kv heads, splits). The GROUP query heads that share a kv head are the rows of
    # one tile, so each K/V tile is read once for all of them (GQA) and the scores are a tl.dot.
    # Split s takes the s-th BLOCK_N-aligned chunk of the row's key range; with NUM_SPLITS == 1 it
    # writes the output, otherwise its (max, sum, acc) partial goes to the workspace for
    # _decode_attention_combine_kernel.
    pid = tl.program_id(0)
    split = tl.program_id(1)
    b = pid // KV
    kvh = pid % KV
    offs_g = tl.arange(0, BLOCK_G)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    g_ok = offs_g < GROUP
    d_ok = offs_d < HEAD_DIM
    heads = kvh * GROUP + offs_g

    b64 = b.to(tl.int64)
    key_end = tl.load(KE + b64 * ske).to(tl.int32)
    lo = tl.maximum(tl.load(KS + b64 * sks).to(tl.int32), 0)  # clamped: never read outside the cache
    hi = tl.maximum(tl.minimum(key_end, S), lo)
    chunk = tl.cdiv(tl.cdiv(hi - lo, NUM_SPLITS), BLOCK_N) * BLOCK_N
    s_lo = tl.minimum(lo + split * chunk, hi)
    s_hi = tl.minimum(s_lo + chunk, hi)

    q = tl.load(Q + b64 * sq_b + heads[:, None] * sq_h + offs_d[None, :] * sq_d,
                mask=g_ok[:, None] & d_ok[None, :], other=0.0)
    if HAS_ALIBI:
        # times log2(e): the scores are in the log2 domain (exp2)
        slope = tl.load(SLOPES + heads, mask=g_ok, other=0.0).to(tl.float32) * 1.4426950408889634
    k_base = K + b64 * sk_b + kvh.to(tl.int64) * sk_h
    v_base = V + b64 * sv_b + kvh.to(tl.int64) * sv_h
    m_i = tl.full([BLOCK_G], NEG_INIT, tl.float32)
    l_i = tl.zeros([BLOCK_G], tl.float32)
    acc = tl.zeros([BLOCK_G, BLOCK_D], tl.float32)
    for n0 in tl.range(s_lo, s_hi, BLOCK_N):
        n = n0 + offs_n
        key_ok = n < s_hi
        kv_mask = key_ok[:, None] & d_ok[None, :]
        # masked loads: a slot outside the range (NaN garbage, say) never enters a register
        k = tl.load(k_base + n[:, None] * sk_s + offs_d[None, :] * sk_d, mask=kv_mask, other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale  # log2 domain
        if HAS_ALIBI:
            s += slope[:, None] * (n - (key_end - 1)).to(tl.float32)[None, :]
        s = tl.where(key_ok[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(v_base + n[:, None] * sv_s + offs_d[None, :] * sv_d, mask=kv_mask, other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        m_i = m_new

    if NUM_SPLITS == 1:
        out = tl.where(l_i[:, None] > 0, acc / tl.where(l_i > 0, l_i, 1.0)[:, None], 0.0)
        tl.store(O + b64 * so_b + heads[:, None] * so_h + offs_d[None, :] * so_d,
                 out.to(O.dtype.element_ty), mask=g_ok[:, None] & d_ok[None, :])
    else:
        ws = (b64 * H + heads) * NUM_SPLITS + split  # (BLOCK_G,) partial slots, split fastest
        tl.store(WS_M + ws, m_i, mask=g_ok)
        tl.store(WS_L + ws, l_i, mask=g_ok)
        tl.store(WS_ACC + ws[:, None] * BLOCK_D + offs_d[None, :], acc, mask=g_ok[:, None])


def _decode_attention_launch(q, k_cache, v_cache, key_start, key_end, alibi_slopes, out,
                             scale: float, num_splits: int) -> None:
    B, H, dh = q.shape
    KV, S = k_cache.shape[1], k_cache.shape[2]
    if B == 0 or H == 0:
        return
    if S == 0:  # no slot at all: every range is empty
        out.zero_()
        return
    cfg = _decode_attention_config(B, KV, H // KV, S, dh, q.dtype, q.device)
    splits = num_splits if num_splits > 0 else cfg["NUM_SPLITS"]
    dev_ctx = torch.cuda.device(q.device) if q.device.type == "cuda" else contextlib.nullcontext()
    with dev_ctx:
        if splits > 1:
            ws_acc, ws_m, ws_l = _split_workspaces(B * H * splits, cfg["BLOCK_D"], q.device)
        else:
            ws_acc = ws_m = ws_l = out  # never touched
        _decode_attention_kernel[(B * KV, splits)](
            q, k_cache, v_cache, key_start, key_end,
            alibi_slopes if alibi_slopes is not None else q,  # never read without ALiBi
            out, ws_acc, ws_m, ws_l,
            *q.stride(), *k_cache.stride(), *v_cache.stride(), key_start.stride(0), key_end.stride(0),
            *out.stride(),
            H, KV, S, float(scale) * _LOG2E,
            GROUP=H // KV, HEAD_DIM=dh, BLOCK_G=cfg["BLOCK_G"], BLOCK_N=cfg["BLOCK_N"],
            BLOCK_D=cfg["BLOCK_D"], NUM_SPLITS=splits, HAS_ALIBI=alibi_slopes is not None,
            NEG_INIT=_NEG_INIT,
            # fp32 inputs are the accurate path: no TF32 rounding of q.k (the argument only matters
            # for fp32 operands; fp16/bf16 keep the default).
            DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
            num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
        )
        if splits > 1:
            _decode_attention_combine_kernel[(B * H,)](
                ws_acc, ws_m, ws_l, out, *out.stride(), H,
                HEAD_DIM=dh, BLOCK_D=cfg["BLOCK_D"], NUM_SPLITS=splits, SPLITS_P2=_next_pow2(splits),
                NEG_INIT=_NEG_INIT, num_warps=4,
            )


# torch.library op: torch.compile(fullgraph=True) sees one opaque node, and CUDA-graph capture
# works (no host sync: the key range is read on the device; the split count comes from shapes;
# workspaces are allocated through torch). It writes into `out`; the wrapper below allocates it.
@torch.library.custom_op("lmmrt::decode_attention", mutates_args=("out",))
def _decode_attention_op(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, key_start: torch.Tensor,
    key_end: torch.Tensor, alibi_slopes: torch.Tensor | None, out: torch.Tensor, scale: float,
    num_splits: int,
) -> None:
    _decode_attention_launch(q, k_cache, v_cache, key_start, key_end, alibi_slopes, out, scale, num_splits)


@_decode_attention_op.register_fake
def _(q, k_cache, v_cache, key_start, key_end, alibi_slopes, out, scale, num_splits) -> None:
    return None


def decode_attention_triton(
    q, k_cache, v_cache, key_start, key_end, *, alibi_slopes: torch.Tensor | None = None,
    scale: float | None = None, out: torch.Tensor | None = None, num_splits: int = 0,
) -> torch.Tensor:
    """The Triton implementation (same contract as the reference, plus `out=`); num_splits > 0
    forces the number of key splits (0: planned from the shapes)."""
    dh = q.shape[-1]
    if q.dtype not in _KERNEL_DTYPES or dh > _MAX_HEAD_DIM:
        # Outside what the kernel is built for (fp64, huge head dims): the reference is exact.
        res = decode_attention_reference(q, k_cache, v_cache, key_start, key_end,
                                         alibi_slopes=alibi_slopes, scale=scale)
        return res if out is None else out.copy_(res)
    if out is None:
        out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    torch.ops.lmmrt.decode_attention(q, k_cache, v_cache, key_start, key_end, alibi_slopes, out,
                                     float(dh**-0.5 if scale is None else scale), int(num_splits))
    return out


def _check(q, k_cache, v_cache, key_start, key_end, alibi_slopes, out) -> None:
    if q.dim() != 3:
        raise ValueError(f"decode_attention: q must be (batch, heads, head_dim), got {tuple(q.shape)}")
    B, H, D = q.shape
    if k_cache.dim() != 4:
        raise ValueError(f"decode_attention: k_cache must be (batch, kv_heads, cache_len, head_dim), "
                         f"got {tuple(k_cache.shape)}")
    KV = k_cache.shape[1]
    if k_cache.shape[0] != B or k_cache.shape[3] != D or KV == 0 or H % KV:
        raise ValueError(f"decode_attention: k_cache has shape {tuple(k_cache.shape)}, expected "
                         f"({B}, kv_heads, cache_len, {D}) with kv_heads dividing the {H} query heads")
    if v_cache.shape != k_cache.shape:
        raise ValueError(f"decode_attention: v_cache {tuple(v_cache.shape)} and k_cache "
                         f"{tuple(k_cache.shape)} differ")
    for name, t in (("k_cache", k_cache), ("v_cache", v_cache)):
        if t.dtype != q.dtype or t.device != q.device:
            raise ValueError(f"decode_attention: {name} is {t.dtype} on {t.device}, q is {q.dtype} on {q.device}")
    for name, t in (("key_start", key_start), ("key_end", key_end)):
        if tuple(t.shape) != (B,) or t.dtype not in (torch.int32, torch.int64) or t.device != q.device:
            raise ValueError(f"decode_attention: {name} must be a ({B},) int32 or int64 tensor on {q.device}, "
                             f"got {tuple(t.shape)} {t.dtype} on {t.device}")
    if alibi_slopes is not None and (tuple(alibi_slopes.shape) != (H,) or alibi_slopes.dtype != torch.float32
                                     or alibi_slopes.device != q.device):
        raise ValueError(f"decode_attention: alibi_slopes must be a ({H},) float32 tensor on {q.device}, got "
                         f"{tuple(alibi_slopes.shape)} {alibi_slopes.dtype} on {alibi_slopes.device}")
    if out is not None and (out.shape != q.shape or out.dtype != q.dtype or out.device != q.device):
        raise ValueError(f"decode_attention: out is {tuple(out.shape)} {out.dtype} on {out.device}, "
                         f"expected {tuple(q.shape)} {q.dtype} on {q.device}")


def decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    key_start: torch.Tensor,
    key_end: torch.Tensor,
    *,
    alibi_slopes: torch.Tensor | None = None,
    scale: float | None = None,
    backend: str = "auto",
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """One decode token per row attends to its filled slice of the KV cache.

    q: (B, H, dh); k_cache, v_cache: (B, KV, S, dh), S the allocated cache length, H a multiple
    of KV (any strides: a layer's view of a (layers, B, KV, S, dh) cache is fine); key_start,
    key_end: (B,) int32/int64 on q's device — row b attends to slots [key_start[b], key_end[b]),
    clamped to [0, S), and gets zeros when that range is empty; alibi_slopes: optional (H,)
    float32, adding slope_h * (slot - (key_end[b] - 1)) to the scores; scale: default dh**-0.5.
    out: optional (B, H, dh) buffer of q's dtype and device (any strides) to write into.
    Returns (B, H, dh) in q's dtype (`out` when given). Shapes, dtypes and devices are checked
    here; the index values are trusted (the runtime builds them) and never read on the host.
    """
    _check(q, k_cache, v_cache, key_start, key_end, alibi_slopes, out)
    if backend not in _backend.BACKENDS:
        _backend.requested_backend(backend)  # raises, naming the choices
    name = _backend.resolve_name("decode_attention", backend, q.device)
    impl = _backend.resolve("decode_attention", backend, q.device)
    args = (q, k_cache, v_cache, key_start, key_end)
    if out is None:
        return impl(*args, alibi_slopes=alibi_slopes, scale=scale)
    if name == "triton":
        return impl(*args, alibi_slopes=alibi_slopes, scale=scale, out=out)
    return out.copy_(impl(*args, alibi_slopes=alibi_slopes, scale=scale))


_backend.register("decode_attention", "torch", decode_attention_reference)
if triton is not None:
    _backend.register("decode_attention", "triton", decode_attention_triton)
