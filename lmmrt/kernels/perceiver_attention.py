"""Perceiver Resampler attention: latent queries against [media tokens ; latents] keys.

Queries are the (normalized) latents of each media item; keys and values come from two sources,
the media tokens and the latents themselves (flamingo.md §3). The kernels read both sources in
place; the concatenation is never built. IDEFICS's optional per-head LayerNorm on q and k
(`qk_layer_norms_perceiver`) is part of the op so a kernel can fuse it. Without the latents source
(k_latents = v_latents = None) it is plain unmasked attention of queries over one key source: the
Q-Former's cross-attention (a few dozen queries over the image tokens) and self-attention.

File layout: reference (also the CPU path), then the launch configuration, the Triton kernel, its
launcher and torch.library op, then the public dispatching op.

Kernel (backend "triton"): one program per (media item, head, block of latent queries); q stays in
registers while an online softmax streams K/V tiles from the media source and then from the
latents source, both read in place through their own strides. The optional q/k LayerNorms are
applied to each tile as it is loaded, in fp32. Accumulation is fp32; the output is q's dtype.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F

from lmmrt.kernels import backend as _backend

Norm = tuple[torch.Tensor, torch.Tensor] | None


def perceiver_attention_reference(
    q: torch.Tensor,
    k_media: torch.Tensor,
    v_media: torch.Tensor,
    k_latents: torch.Tensor | None,
    v_latents: torch.Tensor | None,
    *,
    q_norm: Norm = None,
    k_norm: Norm = None,
    norm_eps: float = 1e-5,
    scale: float | None = None,
) -> torch.Tensor:
    """Plain-PyTorch reference, computed in float32 (float64 stays float64).

    q: (M, n_latents, H, dh); k_media, v_media: (M, S, H, dh); k_latents, v_latents: (M, n_latents, H, dh).
    k_latents, v_latents may both be None: the media keys only.
    q_norm, k_norm: optional (weight, bias) of a LayerNorm over dh, applied to q and to all keys.
    Returns (M, n_latents, H, dh) in q's dtype.
    """
    out_dtype = q.dtype
    cdt = torch.float64 if q.dtype == torch.float64 else torch.float32
    dh = q.shape[-1]
    scale = dh**-0.5 if scale is None else scale
    k = (k_media if k_latents is None else torch.cat([k_media, k_latents], dim=1)).to(cdt)
    v = (v_media if v_latents is None else torch.cat([v_media, v_latents], dim=1)).to(cdt)
    qf = q.to(cdt)
    if q_norm is not None:
        qf = F.layer_norm(qf, (dh,), q_norm[0].to(cdt), q_norm[1].to(cdt), norm_eps)
    if k_norm is not None:
        k = F.layer_norm(k, (dh,), k_norm[0].to(cdt), k_norm[1].to(cdt), norm_eps)
    # (M, H, n, dh) layout for the matmuls
    qf, k, v = (t.transpose(1, 2) for t in (qf, k, v))
    scores = torch.matmul(qf, k.transpose(-1, -2)) * scale
    attn = torch.softmax(scores, dim=-1)
    out = torch.matmul(attn, v).transpose(1, 2)
    return out.to(out_dtype)


# ---------------------------------------------------------------------------------------------
# Triton kernel
# ---------------------------------------------------------------------------------------------
from lmmrt.kernels.triton_common import KERNEL_DTYPES as _KERNEL_DTYPES  # noqa: E402
from lmmrt.kernels.triton_common import LOG2E as _LOG2E  # noqa: E402
from lmmrt.kernels.triton_common import MAX_HEAD_DIM as _MAX_HEAD_DIM  # noqa: E402
from lmmrt.kernels.triton_common import NEG_INIT as _NEG_INIT  # noqa: E402
from lmmrt.kernels.triton_common import attention_tiles as _attention_tiles  # noqa: E402
from lmmrt.kernels.triton_common import interpreted as _interpreted  # noqa: E402
from lmmrt.kernels.triton_common import jit as _jit  # noqa: E402
from lmmrt.kernels.triton_common import next_pow2 as _next_pow2  # noqa: E402
from lmmrt.kernels.triton_common import sm_count as _sm_count  # noqa: E402
from lmmrt.kernels.triton_common import tl, triton  # noqa: E402


def _perceiver_config(n_lat: int, dh: int, dtype: torch.dtype, n_programs_mh: int, device) -> dict:
    """Launch configuration by a plain heuristic (the interpreter cannot autotune).

    All latents of a media item and head go to one program (n_lat is 64 in every known checkpoint),
    so each K/V tile is loaded once per head and reused by every query row. When media x heads is
    too few to fill the GPU (a single image: 16 programs on 132 SMs), the latents are split in two
    query blocks: K/V is then read twice, but from L2, and twice the SMs stream it.
    """
    block_d = max(16, _next_pow2(dh))
    if _interpreted(device):
        # ~1 ms per program instance and per loop iteration in the interpreter: big tiles.
        return dict(BLOCK_Q=min(128, max(16, _next_pow2(n_lat))), BLOCK_N=256, BLOCK_D=block_d,
                    num_warps=4, num_stages=1)
    tiles = _attention_tiles(block_d, dtype)
    block_q = min(tiles["BLOCK_ROWS"], max(16, _next_pow2(n_lat)))
    sms = _sm_count(device)
    if block_q == 64 and n_programs_mh * triton.cdiv(n_lat, 64) < sms:
        block_q = 32
    return dict(BLOCK_Q=block_q, BLOCK_N=tiles["BLOCK_N"], BLOCK_D=block_d, num_warps=tiles["num_warps"],
                num_stages=tiles["num_stages"])


@_jit
def _layer_norm_rows(x, w, b, eps, HEAD_DIM: tl.constexpr, d_mask):
    # x: (rows, BLOCK_D) fp32 with padded columns == 0; w, b loaded with other=0 so padded columns
    # come out 0 and do not disturb the dot products.
    mean = tl.sum(x, 1) / HEAD_DIM
    xc = tl.where(d_mask[None, :], x - mean[:, None], 0.0)
    var = tl.sum(xc * xc, 1) / HEAD_DIM
    rstd = 1.0 / tl.sqrt(var + eps)
    return xc * rstd[:, None] * w[None, :] + b[None, :]


@_jit
def _perceiver_kv_block(q, m_i, l_i, acc, k_ptrs, v_ptrs, key_ok, d_mask, kw, kb, eps, qk_scale,
                        HAS_KNORM: tl.constexpr, HEAD_DIM: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """One online-softmax step over a tile of keys (either source)."""
    kv_mask = key_ok[:, None] & d_mask[None, :]
    k = tl.load(k_ptrs, mask=kv_mask, other=0.0)
    if HAS_KNORM:
        k = _layer_norm_rows(k.to(tl.float32), kw, kb, eps, HEAD_DIM, d_mask).to(q.dtype)
    s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale  # log2 domain
    s = tl.where(key_ok[None, :], s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(s - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    v = tl.load(v_ptrs, mask=kv_mask, other=0.0)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
    return m_new, l_i, acc


@_jit
def _perceiver_attention_kernel(
    Q, KM, VM, KL, VL, O, QW, QB, KW, KB,
    sq_m, sq_n, sq_h, sq_d,
    skm_m, skm_s, skm_h, skm_d,
    svm_m, svm_s, svm_h, svm_d,
    skl_m, skl_n, skl_h, skl_d,
    svl_m, svl_n, svl_h, svl_d,
    so_m, so_n, so_h, so_d,
    H, N_LAT, S, qk_scale, eps,
    HAS_QNORM: tl.constexpr, HAS_KNORM: tl.constexpr, HAS_LATENTS: tl.constexpr, HEAD_DIM: tl.constexpr,
    BLOCK_Q: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, NEG_INIT: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    # grid: (media * heads, query blocks). One program owns BLOCK_Q latent queries of one media
    # item and head; q stays in registers while K/V stream from the media source, then from the
    # latents source (the concatenation of flamingo.md §3 is never built).
    pid_mh = tl.program_id(0)
    pid_q = tl.program_id(1)
    m = (pid_mh // H).to(tl.int64)  # media offsets overflow int32 for long videos
    h = pid_mh % H
    offs_q = pid_q * BLOCK_Q + tl.arange(0, BLOCK_Q)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    q_ok = offs_q < N_LAT
    d_mask = offs_d < HEAD_DIM  # dh = 96 runs in a 128-wide tile

    q = tl.load(Q + m * sq_m + h * sq_h + offs_q[:, None] * sq_n + offs_d[None, :] * sq_d,
                mask=q_ok[:, None] & d_mask[None, :], other=0.0)
    if HAS_QNORM:
        qw = tl.load(QW + offs_d, mask=d_mask, other=0.0).to(tl.float32)
        qb = tl.load(QB + offs_d, mask=d_mask, other=0.0).to(tl.float32)
        q = _layer_norm_rows(q.to(tl.float32), qw, qb, eps, HEAD_DIM, d_mask).to(KM.dtype.element_ty)
    if HAS_KNORM:
        kw = tl.load(KW + offs_d, mask=d_mask, other=0.0).to(tl.float32)
        kb = tl.load(KB + offs_d, mask=d_mask, other=0.0).to(tl.float32)
    else:
        kw = 0.0
        kb = 0.0

    m_i = tl.full([BLOCK_Q], NEG_INIT, tl.float32)
    l_i = tl.zeros([BLOCK_Q], tl.float32)
    acc = tl.zeros([BLOCK_Q, BLOCK_D], tl.float32)

    km_base = KM + m * skm_m + h * skm_h + offs_d[None, :] * skm_d
    vm_base = VM + m * svm_m + h * svm_h + offs_d[None, :] * svm_d
    for start in tl.range(0, S, BLOCK_N):
        rows = start + offs_n
        m_i, l_i, acc = _perceiver_kv_block(
            q, m_i, l_i, acc, km_base + rows[:, None] * skm_s, vm_base + rows[:, None] * svm_s,
            rows < S, d_mask, kw, kb, eps, qk_scale, HAS_KNORM, HEAD_DIM, DOT_PRECISION)
    if HAS_LATENTS:
        kl_base = KL + m * skl_m + h * skl_h + offs_d[None, :] * skl_d
        vl_base = VL + m * svl_m + h * svl_h + offs_d[None, :] * svl_d
        for start in tl.range(0, N_LAT, BLOCK_N):
            rows = start + offs_n
            m_i, l_i, acc = _perceiver_kv_block(
                q, m_i, l_i, acc, kl_base + rows[:, None] * skl_n, vl_base + rows[:, None] * svl_n,
                rows < N_LAT, d_mask, kw, kb, eps, qk_scale, HAS_KNORM, HEAD_DIM, DOT_PRECISION)

    # Every row saw at least the n_lat >= 1 latent keys, or (no latents) S >= 1 media keys: l_i > 0.
    out = acc / l_i[:, None]
    tl.store(O + m * so_m + h * so_h + offs_q[:, None] * so_n + offs_d[None, :] * so_d,
             out.to(O.dtype.element_ty), mask=q_ok[:, None] & d_mask[None, :])


def _perceiver_attention_launch(q, k_media, v_media, k_latents, v_latents, q_w, q_b, k_w, k_b,
                                out, norm_eps: float, scale: float) -> None:
    M, n_lat, H, dh = q.shape
    S = k_media.shape[1]
    if M == 0 or n_lat == 0 or H == 0:
        return
    cfg = _perceiver_config(n_lat, dh, q.dtype, M * H, q.device)
    meta = {k: cfg[k] for k in ("BLOCK_Q", "BLOCK_N", "BLOCK_D")}
    grid = (M * H, triton.cdiv(n_lat, meta["BLOCK_Q"]))
    dummy = q  # never read when the matching HAS_* flag is off
    has_latents = k_latents is not None
    if not has_latents:  # the media tensors stand in; the HAS_LATENTS=False kernel never reads them
        k_latents, v_latents = k_media, v_media
    with torch.cuda.device(q.device) if q.device.type == "cuda" else contextlib.nullcontext():
        _perceiver_attention_kernel[grid](
            q, k_media, v_media, k_latents, v_latents, out,
            q_w if q_w is not None else dummy, q_b if q_b is not None else dummy,
            k_w if k_w is not None else dummy, k_b if k_b is not None else dummy,
            *q.stride(), *k_media.stride(), *v_media.stride(), *k_latents.stride(), *v_latents.stride(),
            *out.stride(),
            H, n_lat, S, float(scale) * _LOG2E, float(norm_eps),
            HAS_QNORM=q_w is not None, HAS_KNORM=k_w is not None, HAS_LATENTS=has_latents, HEAD_DIM=dh,
            NEG_INIT=_NEG_INIT,
            # fp32 inputs are the accurate path: no TF32 rounding of q.k (the argument only
            # matters for fp32 operands; fp16/bf16 keep the default).
            DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
            num_warps=cfg["num_warps"], num_stages=cfg["num_stages"], **meta,
        )


# torch.library op: torch.compile(fullgraph=True) sees one opaque node, and CUDA-graph capture
# works (the launcher only allocates through torch). It writes into `out`, so a caller can hand
# in a preallocated (or strided) buffer; the functional wrapper below allocates it.
@torch.library.custom_op("lmmrt::perceiver_attention", mutates_args=("out",))
def _perceiver_attention_op(
    q: torch.Tensor, k_media: torch.Tensor, v_media: torch.Tensor, k_latents: torch.Tensor | None,
    v_latents: torch.Tensor | None, q_norm_weight: torch.Tensor | None, q_norm_bias: torch.Tensor | None,
    k_norm_weight: torch.Tensor | None, k_norm_bias: torch.Tensor | None, out: torch.Tensor,
    norm_eps: float, scale: float,
) -> None:
    _perceiver_attention_launch(q, k_media, v_media, k_latents, v_latents, q_norm_weight, q_norm_bias,
                                k_norm_weight, k_norm_bias, out, norm_eps, scale)


@_perceiver_attention_op.register_fake
def _(q, k_media, v_media, k_latents, v_latents, q_norm_weight, q_norm_bias, k_norm_weight,
      k_norm_bias, out, norm_eps, scale) -> None:
    return None


def perceiver_attention_triton(
    q, k_media, v_media, k_latents, v_latents, *, q_norm: Norm = None, k_norm: Norm = None,
    norm_eps: float = 1e-5, scale: float | None = None, out: torch.Tensor | None = None,
) -> torch.Tensor:
    """The Triton implementation (same contract as the reference, plus `out=`)."""
    dh = q.shape[-1]
    if q.dtype not in _KERNEL_DTYPES or dh > _MAX_HEAD_DIM:
        # Outside what the kernel is built for (fp64, huge head dims): the reference is exact.
        res = perceiver_attention_reference(q, k_media, v_media, k_latents, v_latents, q_norm=q_norm,
                                            k_norm=k_norm, norm_eps=norm_eps, scale=scale)
        return res if out is None else out.copy_(res)
    if out is None:
        out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    qw, qb = (None, None) if q_norm is None else (q_norm[0].contiguous(), q_norm[1].contiguous())
    kw, kb = (None, None) if k_norm is None else (k_norm[0].contiguous(), k_norm[1].contiguous())
    torch.ops.lmmrt.perceiver_attention(q, k_media, v_media, k_latents, v_latents, qw, qb, kw, kb, out,
                                        float(norm_eps), float(dh**-0.5 if scale is None else scale))
    return out


def _check(q, k_media, v_media, k_latents, v_latents):
    if q.dim() != 4:
        raise ValueError(f"perceiver_attention: q must be (media, latents, heads, head_dim), got {tuple(q.shape)}")
    M, n, H, D = q.shape
    if (k_latents is None) != (v_latents is None):
        raise ValueError("perceiver_attention: k_latents and v_latents must both be given or both be None")
    if k_latents is None and k_media.dim() == 4 and k_media.shape[1] == 0:
        raise ValueError("perceiver_attention: without latents the media source needs at least one key")
    latents = () if k_latents is None else (("k_latents", k_latents, n), ("v_latents", v_latents, n))
    for name, t, s in (("k_media", k_media, None), ("v_media", v_media, None), *latents):
        if t.dim() != 4 or t.shape[0] != M or t.shape[2] != H or t.shape[3] != D or (s is not None and t.shape[1] != s):
            raise ValueError(f"perceiver_attention: {name} has shape {tuple(t.shape)}, expected "
                             f"({M}, {'S' if s is None else s}, {H}, {D}) to match q {tuple(q.shape)}")
        if t.dtype != q.dtype or t.device != q.device:
            raise ValueError(f"perceiver_attention: {name} is {t.dtype} on {t.device}, q is {q.dtype} on {q.device}")
    if k_media.shape[1] != v_media.shape[1]:
        raise ValueError("perceiver_attention: k_media and v_media lengths differ")


def perceiver_attention(
    q: torch.Tensor,
    k_media: torch.Tensor,
    v_media: torch.Tensor,
    k_latents: torch.Tensor | None,
    v_latents: torch.Tensor | None,
    *,
    q_norm: Norm = None,
    k_norm: Norm = None,
    norm_eps: float = 1e-5,
    scale: float | None = None,
    backend: str = "torch",
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Attention of latent queries over media tokens and latents, per media item and head.

    q: (M, n_latents, H, dh); k_media, v_media: (M, S, H, dh) — S = frames * tokens per frame;
    k_latents, v_latents: (M, n_latents, H, dh), or both None for attention over the media keys
    only (the Q-Former's). Inputs may be strided views (e.g. halves of a fused kv projection). q_norm, k_norm: optional (weight (dh,), bias (dh,)) LayerNorms.
    out: optional (M, n_latents, H, dh) buffer of q's dtype and device (any strides) to write into.
    Returns (M, n_latents, H, dh) (`out` when given).
    """
    _check(q, k_media, v_media, k_latents, v_latents)
    dh = q.shape[-1]
    for name, norm in (("q_norm", q_norm), ("k_norm", k_norm)):
        if norm is not None and (len(norm) != 2 or any(tuple(t.shape) != (dh,) or t.device != q.device
                                                       for t in norm)):
            raise ValueError(f"perceiver_attention: {name} must be (weight, bias), each of shape ({dh},) "
                             f"on {q.device}")
    if out is not None and (out.shape != q.shape or out.dtype != q.dtype or out.device != q.device):
        raise ValueError(f"perceiver_attention: out is {tuple(out.shape)} {out.dtype} on {out.device}, "
                         f"expected {tuple(q.shape)} {q.dtype} on {q.device}")
    name = _backend.resolve_name("perceiver_attention", backend, q.device)
    impl = _backend.resolve("perceiver_attention", backend, q.device)
    kwargs = dict(q_norm=q_norm, k_norm=k_norm, norm_eps=norm_eps, scale=scale)
    if out is None:
        return impl(q, k_media, v_media, k_latents, v_latents, **kwargs)
    if name == "triton":
        return impl(q, k_media, v_media, k_latents, v_latents, out=out, **kwargs)
    return out.copy_(impl(q, k_media, v_media, k_latents, v_latents, **kwargs))


_backend.register("perceiver_attention", "torch", perceiver_attention_reference)
if triton is not None:
    _backend.register("perceiver_attention", "triton", perceiver_attention_triton)
