"""Perceiver Resampler attention: latent queries against [media tokens ; latents] keys.

Queries are the (normalized) latents of each media item; keys and values come from two sources,
the media tokens and the latents themselves (flamingo.md §3). The kernels read both sources in
place; the concatenation is never built. IDEFICS's optional per-head LayerNorm on q and k
(`qk_layer_norms_perceiver`) is part of the op so a kernel can fuse it.

File layout: reference (also the CPU path), then the kernels, then the public dispatching op.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from lmmrt.kernels import backend as _backend

Norm = tuple[torch.Tensor, torch.Tensor] | None


def perceiver_attention_reference(
    q: torch.Tensor,
    k_media: torch.Tensor,
    v_media: torch.Tensor,
    k_latents: torch.Tensor,
    v_latents: torch.Tensor,
    *,
    q_norm: Norm = None,
    k_norm: Norm = None,
    norm_eps: float = 1e-5,
    scale: float | None = None,
) -> torch.Tensor:
    """Plain-PyTorch reference, computed in float32 (float64 stays float64).

    q: (M, n_latents, H, dh); k_media, v_media: (M, S, H, dh); k_latents, v_latents: (M, n_latents, H, dh).
    q_norm, k_norm: optional (weight, bias) of a LayerNorm over dh, applied to q and to all keys.
    Returns (M, n_latents, H, dh) in q's dtype.
    """
    out_dtype = q.dtype
    cdt = torch.float64 if q.dtype == torch.float64 else torch.float32
    dh = q.shape[-1]
    scale = dh**-0.5 if scale is None else scale
    k = torch.cat([k_media, k_latents], dim=1).to(cdt)
    v = torch.cat([v_media, v_latents], dim=1).to(cdt)
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


def _check(q, k_media, v_media, k_latents, v_latents):
    if q.dim() != 4:
        raise ValueError(f"perceiver_attention: q must be (media, latents, heads, head_dim), got {tuple(q.shape)}")
    M, n, H, D = q.shape
    for name, t, s in (("k_media", k_media, None), ("v_media", v_media, None),
                       ("k_latents", k_latents, n), ("v_latents", v_latents, n)):
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
    k_latents: torch.Tensor,
    v_latents: torch.Tensor,
    *,
    q_norm: Norm = None,
    k_norm: Norm = None,
    norm_eps: float = 1e-5,
    scale: float | None = None,
    backend: str = "torch",
) -> torch.Tensor:
    """Attention of latent queries over media tokens and latents, per media item and head.

    q: (M, n_latents, H, dh); k_media, v_media: (M, S, H, dh) — S = frames * tokens per frame;
    k_latents, v_latents: (M, n_latents, H, dh). Inputs may be strided views (e.g. halves of a
    fused kv projection). Returns (M, n_latents, H, dh).
    """
    _check(q, k_media, v_media, k_latents, v_latents)
    impl = _backend.resolve("perceiver_attention", backend, q.device)
    return impl(q, k_media, v_media, k_latents, v_latents, q_norm=q_norm, k_norm=k_norm,
                norm_eps=norm_eps, scale=scale)


_backend.register("perceiver_attention", "torch", perceiver_attention_reference)
