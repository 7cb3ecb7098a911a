"""Masked cross-attention of text tokens over the media K/V cache (GATED XATTN-DENSE's attention).

Which media a text token sees is given by its media ordinal `text_time` (flamingo.md §4.1):
- "immediate": row i attends only to the n_latents keys of media `text_time[i]`;
- "cumulative": row i attends to media 1..text_time[i].
A row with text_time == 0 (text before any media) gets zeros in immediate mode; in cumulative mode
it reproduces OpenFlamingo, whose all-masked row softmaxes to a uniform average over every media
key of the sequence (zeros if the sequence has no media at all).

The tanh gate is not applied here: it is folded into the output projection at load time.
Media K/V of all sequences are packed along the first axis; sequence b owns media
`media_start[b] : media_start[b] + media_count[b]`.

File layout: reference (also the CPU path), then the kernels, then the public dispatching op.
"""

from __future__ import annotations

import torch

from lmmrt.kernels import backend as _backend

MODES = ("immediate", "cumulative")


def masked_cross_attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    text_time: torch.Tensor,
    media_start: torch.Tensor,
    media_count: torch.Tensor,
    *,
    mode: str = "immediate",
    scale: float | None = None,
) -> torch.Tensor:
    """Plain-PyTorch reference (dense per-sequence mask), computed in float32 (float64 stays).

    q: (B, T, H, dh); k, v: (N, L, H, dh) packed media K/V; text_time: (B, T) int;
    media_start, media_count: (B,) int. Returns (B, T, H, dh) in q's dtype.
    """
    B, T, H, D = q.shape
    N, L = k.shape[:2]
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
    kb = k[idx].to(cdt).reshape(B, maxn * L, H, D).transpose(1, 2)  # (B, H, maxn*L, D)
    vb = v[idx].to(cdt).reshape(B, maxn * L, H, D).transpose(1, 2)
    tt = text_time.to(dev).long()[:, :, None]  # (B, T, 1)
    ordinal = (j + 1)[None, None, :]
    if mode == "immediate":
        allowed = (tt == ordinal) & valid[:, None, :]
    elif mode == "cumulative":
        allowed = (tt >= ordinal) & valid[:, None, :]
    else:
        raise ValueError(f"masked_cross_attention: mode must be one of {MODES}, got {mode!r}")
    allowed = allowed.repeat_interleave(L, dim=-1)[:, None]  # (B, 1, T, maxn*L)
    scores = torch.matmul(q.to(cdt).transpose(1, 2), kb.transpose(-1, -2)) * scale  # (B, H, T, maxn*L)
    if mode == "cumulative":
        # OpenFlamingo: a row with no media has every score masked to the same value, so its
        # softmax is uniform over all the sequence's media keys.
        no_media = (tt == 0)[:, None]  # (B, 1, T, 1)
        valid_keys = valid.repeat_interleave(L, dim=-1)[:, None, None, :]
        scores = torch.where(no_media, torch.zeros_like(scores), scores)
        allowed = allowed | (no_media & valid_keys)
    scores = scores.masked_fill(~allowed, float("-inf"))
    attn = torch.softmax(scores, dim=-1)
    attn = torch.nan_to_num(attn, nan=0.0)  # rows with nothing allowed -> zero output
    out = torch.matmul(attn, vb).transpose(1, 2)
    return out.to(out_dtype)


def _check(q, k, v, text_time, media_start, media_count, mode):
    if mode not in MODES:
        raise ValueError(f"masked_cross_attention: mode must be one of {MODES}, got {mode!r}")
    if q.dim() != 4:
        raise ValueError(f"masked_cross_attention: q must be (batch, text, heads, head_dim), got {tuple(q.shape)}")
    B, T, H, D = q.shape
    for name, t in (("k", k), ("v", v)):
        if t.dim() != 4 or t.shape[2] != H or t.shape[3] != D:
            raise ValueError(f"masked_cross_attention: {name} has shape {tuple(t.shape)}, expected "
                             f"(media, latents, {H}, {D})")
        if t.dtype != q.dtype or t.device != q.device:
            raise ValueError(f"masked_cross_attention: {name} is {t.dtype} on {t.device}, q is {q.dtype} on {q.device}")
    if k.shape[:2] != v.shape[:2]:
        raise ValueError(f"masked_cross_attention: k {tuple(k.shape)} and v {tuple(v.shape)} differ")
    if tuple(text_time.shape) != (B, T):
        raise ValueError(f"masked_cross_attention: text_time has shape {tuple(text_time.shape)}, expected ({B}, {T})")
    for name, t in (("media_start", media_start), ("media_count", media_count)):
        if tuple(t.shape) != (B,):
            raise ValueError(f"masked_cross_attention: {name} has shape {tuple(t.shape)}, expected ({B},)")
    for name, t in (("text_time", text_time), ("media_start", media_start), ("media_count", media_count)):
        if t.dtype not in (torch.int32, torch.int64):
            raise ValueError(f"masked_cross_attention: {name} must be int32 or int64, got {t.dtype}")


def masked_cross_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    text_time: torch.Tensor,
    media_start: torch.Tensor,
    media_count: torch.Tensor,
    *,
    mode: str = "immediate",
    scale: float | None = None,
    backend: str = "torch",
) -> torch.Tensor:
    """Text queries attend to their media's cached K/V through the media-ordinal mask.

    q: (B, T, H, dh) — T == 1 is the decode step; k, v: (N, L, H, dh) packed media K/V of every
    sequence (L latents per media item); text_time: (B, T) media ordinal of each token (0 = none);
    media_start, media_count: (B,) each sequence's media slice of k/v. Returns (B, T, H, dh).
    Index tensors are trusted (the runtime builds them); shapes and dtypes are checked here.
    """
    _check(q, k, v, text_time, media_start, media_count, mode)
    impl = _backend.resolve("masked_cross_attention", backend, q.device)
    return impl(q, k, v, text_time, media_start, media_count, mode=mode, scale=scale)


_backend.register("masked_cross_attention", "torch", masked_cross_attention_reference)
