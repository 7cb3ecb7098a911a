"""Perceiver Resampler (flamingo.md §3): each media item's vision tokens -> n_latents latents.

One implementation for both flavours: OpenFlamingo (GELU MLP, optional frame/time embeddings) and
IDEFICS (ReLU MLP, optional q/k LayerNorm). k and v share one fused projection `wkv` (k rows
first), applied separately to the media and the latents so the attention kernel can read both
sources in place.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from lmmrt.kernels.perceiver_attention import perceiver_attention
from lmmrt.models.config import PerceiverConfig
from lmmrt.models.layers import LayerNorm, activation


class PerceiverLayer(nn.Module):
    def __init__(self, cfg: PerceiverConfig):
        super().__init__()
        d, inner = cfg.dim, cfg.heads * cfg.head_dim
        self.cfg = cfg
        self.norm_media = LayerNorm(d, cfg.ln_eps)
        self.norm_latents = LayerNorm(d, cfg.ln_eps)
        self.wq = nn.Linear(d, inner, bias=False)
        self.wkv = nn.Linear(d, 2 * inner, bias=False)
        self.wo = nn.Linear(inner, d, bias=False)
        if cfg.qk_norm:
            self.q_norm = LayerNorm(cfg.head_dim, cfg.ln_eps)
            self.k_norm = LayerNorm(cfg.head_dim, cfg.ln_eps)
        self.mlp_norm = LayerNorm(d, cfg.ln_eps)
        self.fc1 = nn.Linear(d, cfg.mlp_dim, bias=False)
        self.fc2 = nn.Linear(cfg.mlp_dim, d, bias=False)
        self.act = activation(cfg.mlp_act)
        self.backend = "torch"

    def forward(self, x: torch.Tensor, lat: torch.Tensor) -> torch.Tensor:
        cfg = self.cfg
        m, s, _ = x.shape
        n = lat.shape[1]
        h, dh = cfg.heads, cfg.head_dim
        xm = self.norm_media(x)
        xl = self.norm_latents(lat)
        q = self.wq(xl).view(m, n, h, dh)
        kv_media = self.wkv(xm).view(m, s, 2, h, dh)
        kv_lat = self.wkv(xl).view(m, n, 2, h, dh)
        qn = (self.q_norm.weight, self.q_norm.bias) if cfg.qk_norm else None
        kn = (self.k_norm.weight, self.k_norm.bias) if cfg.qk_norm else None
        a = perceiver_attention(q, kv_media[:, :, 0], kv_media[:, :, 1], kv_lat[:, :, 0], kv_lat[:, :, 1],
                                q_norm=qn, k_norm=kn, norm_eps=cfg.ln_eps, backend=self.backend)
        lat = lat + self.wo(a.reshape(m, n, h * dh))
        return lat + self.fc2(self.act(self.fc1(self.mlp_norm(lat))))


class PerceiverResampler(nn.Module):
    def __init__(self, cfg: PerceiverConfig):
        super().__init__()
        self.cfg = cfg
        self.latents = nn.Parameter(torch.zeros(cfg.n_latents, cfg.dim))
        if cfg.max_frames > 0:
            self.frame_embs = nn.Parameter(torch.zeros(cfg.max_frames, cfg.dim))
        if cfg.max_media_time > 0:
            self.media_time_embs = nn.Parameter(torch.zeros(cfg.max_media_time, 1, cfg.dim))
        self.layers = nn.ModuleList(PerceiverLayer(cfg) for _ in range(cfg.depth))
        self.norm = LayerNorm(cfg.dim, cfg.ln_eps)

    def forward(self, x: torch.Tensor, media_time: torch.Tensor | None = None) -> torch.Tensor:
        """x: (M, F, v, dim) vision tokens of M media items of F frames each -> (M, n_latents, dim).

        media_time: (M,) 0-based position of each media item in its prompt, used only by
        checkpoints with media_time_embs."""
        cfg = self.cfg
        if x.dim() != 4 or x.shape[-1] != cfg.dim:
            raise ValueError(f"perceiver expects (media, frames, tokens, {cfg.dim}), got {tuple(x.shape)}")
        m, f, v, d = x.shape
        if f > 1 and cfg.max_frames == 0:
            raise ValueError(f"this checkpoint has no frame embeddings: a media item must be a single frame, "
                             f"got {f} frames (feed video as a sequence of images instead)")
        if cfg.max_frames > 0:
            if f > cfg.max_frames:
                raise ValueError(f"{f} frames per clip, but the checkpoint has frame embeddings for {cfg.max_frames}")
            x = x + self.frame_embs[:f].to(x.dtype)[None, :, None, :]
        if cfg.max_media_time > 0:
            t = torch.zeros(m, dtype=torch.long, device=x.device) if media_time is None else media_time
            if int(t.max()) >= cfg.max_media_time:
                raise ValueError(f"media position {int(t.max())} beyond the checkpoint's {cfg.max_media_time} media_time_embs")
            x = x + self.media_time_embs[t].to(x.dtype)[:, None]
        x = x.reshape(m, f * v, d)
        lat = self.latents.to(x.dtype).expand(m, -1, -1)
        for layer in self.layers:
            lat = layer(x, lat)
        return self.norm(lat)
