"""The language-model decoder: embeddings, layers of one family, final norm, LM head.

Families register a layer class in LAYERS. A layer takes the hidden states, the step context
(positions, attention mask, cache slot) and its slice of the static KV cache, and returns the new
hidden states; the Flamingo model interleaves the gated cross-attention blocks between layers.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from lmmrt.models.config import DecoderConfig
from lmmrt.models.layers import activation, make_norm


@dataclass
class StepContext:
    """What every layer needs to know about the tokens of this forward call.

    positions: (B, T) logical positions (per sequence; left padding does not count);
    slot: index in the KV cache where this call's tokens are written; kv_len: cache entries
    attended to (slot + T); mask: (B, 1, T, kv_len) bool, True where a query may see a key."""

    positions: torch.Tensor
    slot: int
    kv_len: int
    mask: torch.Tensor
    rope: tuple[torch.Tensor, torch.Tensor] | None = None


def rope_tables(cfg: DecoderConfig, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin of shape (B, T, rotary_dim) in float32 (HF's rotate-half layout)."""
    rot = int(cfg.head_dim * cfg.rotary_pct)
    inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, rot, 2, device=positions.device, dtype=torch.float32) / rot))
    freqs = positions[..., None].float() * inv_freq
    emb = torch.cat([freqs, freqs], dim=-1)
    return emb.cos(), emb.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: (B, T, H, hd); cos/sin (B, T, rot). Rotates the first `rot` dims (all for LLaMA)."""
    rot = cos.shape[-1]
    xr, xp = x[..., :rot].float(), x[..., rot:]
    c, s = cos[:, :, None], sin[:, :, None]
    half = rot // 2
    rotated = torch.cat([-xr[..., half:], xr[..., :half]], dim=-1)
    out = (xr * c + rotated * s).to(x.dtype)
    return out if rot == x.shape[-1] else torch.cat([out, xp], dim=-1)


def cached_attention(q, k, v, ctx: StepContext, k_cache, v_cache, *, bias=None):
    """Write this call's k, v into the static cache, then attend over the cache prefix.

    q: (B, T, H, hd); k, v: (B, T, KV, hd); caches: (B, KV, max_len, hd). Returns (B, T, H*hd)."""
    b, t, h, hd = q.shape
    k_cache[:, :, ctx.slot:ctx.slot + t] = k.transpose(1, 2)
    v_cache[:, :, ctx.slot:ctx.slot + t] = v.transpose(1, 2)
    keys, vals = k_cache[:, :, :ctx.kv_len], v_cache[:, :, :ctx.kv_len]
    mask = ctx.mask
    if bias is not None:  # ALiBi and friends: a float bias with -inf where masked
        mask = bias.masked_fill(~mask, float("-inf"))
    out = F.scaled_dot_product_attention(q.transpose(1, 2), keys, vals, attn_mask=mask,
                                         enable_gqa=keys.shape[1] != h)
    return out.transpose(1, 2).reshape(b, t, h * hd)


class LlamaLayer(nn.Module):
    """LLaMA: RMSNorm, RoPE, GQA, SwiGLU (IDEFICS's decoder)."""

    def __init__(self, cfg: DecoderConfig):
        super().__init__()
        self.cfg = cfg
        self.attn_norm = make_norm("rms", cfg.dim, cfg.norm_eps)
        self.wqkv = nn.Linear(cfg.dim, (cfg.heads + 2 * cfg.kv_heads) * cfg.head_dim, bias=False)
        self.wo = nn.Linear(cfg.heads * cfg.head_dim, cfg.dim, bias=False)
        self.mlp_norm = make_norm("rms", cfg.dim, cfg.norm_eps)
        self.w13 = nn.Linear(cfg.dim, 2 * cfg.ffn_dim, bias=False)  # gate rows, then up rows
        self.w2 = nn.Linear(cfg.ffn_dim, cfg.dim, bias=False)
        self.act = activation(cfg.act)

    def forward(self, x, ctx: StepContext, k_cache, v_cache):
        cfg = self.cfg
        b, t, _ = x.shape
        qkv = self.wqkv(self.attn_norm(x))
        q, k, v = qkv.split([cfg.heads * cfg.head_dim, cfg.kv_heads * cfg.head_dim, cfg.kv_heads * cfg.head_dim], -1)
        q = q.view(b, t, cfg.heads, cfg.head_dim)
        k = k.view(b, t, cfg.kv_heads, cfg.head_dim)
        v = v.view(b, t, cfg.kv_heads, cfg.head_dim)
        cos, sin = ctx.rope
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        x = x + self.wo(cached_attention(q, k, v, ctx, k_cache, v_cache))
        g, u = self.w13(self.mlp_norm(x)).chunk(2, dim=-1)
        return x + self.w2(self.act(g) * u)


# family name -> (layer class, final-norm kind, whether the family uses RoPE)
LAYERS: dict[str, tuple[type[nn.Module], str, bool]] = {
    "llama": (LlamaLayer, "rms", True),
}


class Decoder(nn.Module):
    def __init__(self, cfg: DecoderConfig):
        super().__init__()
        if cfg.family not in LAYERS:
            raise ValueError(f"unknown decoder family {cfg.family!r}; known: {sorted(LAYERS)}")
        layer_cls, norm_kind, self.uses_rope = LAYERS[cfg.family]
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.layers = nn.ModuleList(layer_cls(cfg) for _ in range(cfg.layers))
        self.norm = make_norm(norm_kind, cfg.dim, cfg.norm_eps, cfg.norm_bias)
        if not cfg.tie_embeddings:
            self.lm_head = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)

    def head(self, x: torch.Tensor) -> torch.Tensor:
        w = self.embed.weight if self.cfg.tie_embeddings else self.lm_head.weight
        return F.linear(self.norm(x), w)

    def context(self, positions, slot, kv_len, mask) -> StepContext:
        rope = rope_tables(self.cfg, positions) if self.uses_rope else None
        return StepContext(positions=positions, slot=slot, kv_len=kv_len, mask=mask, rope=rope)
