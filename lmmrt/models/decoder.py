"""The language-model decoder: embeddings, layers of one family, final norm, LM head.

Families register a layer class in LAYERS. A layer takes the hidden states, the step context
(positions, attention mask, cache slot) and its slice of the static KV cache, and returns the new
hidden states; the Flamingo model interleaves the gated cross-attention blocks between layers.
"""

from __future__ import annotations

import math
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
    slot: index in the KV cache where this call's tokens are written (an int, or a (1,) device
    tensor in the fixed-shape decode step of CUDA graphs); kv_len: cache entries
    attended to (slot + T); mask: (B, 1, T, kv_len) bool, True where a query may see a key."""

    positions: torch.Tensor
    slot: int | torch.Tensor
    kv_len: int
    mask: torch.Tensor
    rope: tuple[torch.Tensor, torch.Tensor] | None = None
    # ALiBi families: (B, H, T, kv_len) float32 additive bias, shared by every layer of the call.
    alibi: torch.Tensor | None = None


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
    if isinstance(ctx.slot, torch.Tensor):
        # fixed-shape step (CUDA graphs): the slot lives on the device, kv_len is the whole cache
        idx = ctx.slot + torch.arange(t, device=ctx.slot.device)
        k_cache.index_copy_(2, idx, k.transpose(1, 2).to(k_cache.dtype))
        v_cache.index_copy_(2, idx, v.transpose(1, 2).to(v_cache.dtype))
    else:
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
        h, x = self.mlp_norm.add(self.wo(cached_attention(q, k, v, ctx, k_cache, v_cache)), x)
        g, u = self.w13(h).chunk(2, dim=-1)
        return x + self.w2(self.act(g) * u)


def alibi_slopes(heads: int, bias_max: float = 8.0, device=None) -> torch.Tensor:
    """MPT's per-head ALiBi slopes, (heads,) float32: 2^-(bias_max * i / n) for i = 1..n with n the
    next power of two; for other head counts the odd-indexed slopes come first, then the even ones,
    truncated to `heads` (mosaicml attention.py `gen_slopes`, transformers build_mpt_alibi_tensor).
    Built directly on `device`: a host tensor copied to the GPU would be a synchronizing pageable
    copy, which breaks CUDA-graph capture of the decode step."""
    n = 2 ** math.ceil(math.log2(heads))
    slopes = 1.0 / torch.pow(2.0, torch.arange(1, n + 1, dtype=torch.float32, device=device) * (bias_max / n))
    if n != heads:
        slopes = torch.cat([slopes[1::2], slopes[::2]])[:heads]
    return slopes


def alibi_bias(cfg: DecoderConfig, batch: int, slot: int, t: int, kv_len: int, device) -> torch.Tensor:
    """(B, H, T, kv_len) float32: slope_h * (key slot - query slot).

    MPT adds slope * (key position) to every score row; softmax ignores a per-row constant, so
    only the distance to the query matters and the cache slot stands in for the position: left
    padding shifts keys and queries alike and changes nothing."""
    # slot may be a device tensor (fixed-shape decode step)
    q_slot = torch.arange(t, device=device, dtype=torch.float32) + (
        slot.float() if isinstance(slot, torch.Tensor) else float(slot))
    k_slot = torch.arange(kv_len, device=device, dtype=torch.float32)
    slopes = alibi_slopes(cfg.heads, cfg.alibi_bias_max, device=device)
    bias = slopes[:, None, None] * (k_slot[None, None, :] - q_slot[None, :, None])
    return bias[None].expand(batch, -1, -1, -1)


class MptLayer(nn.Module):
    """MPT (OpenFlamingo-3B/9B): LayerNorm without bias, fused Wqkv (optional clip), ALiBi, GELU MLP,
    no linear biases."""

    def __init__(self, cfg: DecoderConfig):
        super().__init__()
        self.cfg = cfg
        self.attn_norm = make_norm("ln", cfg.dim, cfg.norm_eps, cfg.norm_bias)
        self.wqkv = nn.Linear(cfg.dim, 3 * cfg.heads * cfg.head_dim, bias=False)
        self.wo = nn.Linear(cfg.heads * cfg.head_dim, cfg.dim, bias=False)
        self.mlp_norm = make_norm("ln", cfg.dim, cfg.norm_eps, cfg.norm_bias)
        self.fc1 = nn.Linear(cfg.dim, cfg.ffn_dim, bias=False)
        self.fc2 = nn.Linear(cfg.ffn_dim, cfg.dim, bias=False)
        self.act = activation(cfg.act)

    def forward(self, x, ctx: StepContext, k_cache, v_cache):
        cfg = self.cfg
        b, t, _ = x.shape
        qkv = self.wqkv(self.attn_norm(x))
        if cfg.qkv_clip > 0:
            qkv = qkv.clamp(-cfg.qkv_clip, cfg.qkv_clip)
        q, k, v = qkv.view(b, t, 3, cfg.heads, cfg.head_dim).unbind(2)
        bias = ctx.alibi.to(x.dtype) if ctx.alibi is not None else None
        h, x = self.mlp_norm.add(self.wo(cached_attention(q, k, v, ctx, k_cache, v_cache, bias=bias)), x)
        return x + self.fc2(self.act(self.fc1(h)))


class NeoxLayer(nn.Module):
    """GPT-NeoX (OpenFlamingo-4B, RedPajama-INCITE): LayerNorm with bias, partial rotary, linear
    biases, parallel residual (x + attn(ln1 x) + mlp(ln2 x)) or sequential."""

    def __init__(self, cfg: DecoderConfig):
        super().__init__()
        self.cfg = cfg
        self.attn_norm = make_norm("ln", cfg.dim, cfg.norm_eps, True)
        # q rows, then k rows, then v rows (the converter undoes NeoX's per-head interleaving)
        self.wqkv = nn.Linear(cfg.dim, 3 * cfg.heads * cfg.head_dim, bias=True)
        self.wo = nn.Linear(cfg.heads * cfg.head_dim, cfg.dim, bias=True)
        self.mlp_norm = make_norm("ln", cfg.dim, cfg.norm_eps, True)
        self.fc1 = nn.Linear(cfg.dim, cfg.ffn_dim, bias=True)
        self.fc2 = nn.Linear(cfg.ffn_dim, cfg.dim, bias=True)
        self.act = activation(cfg.act)

    def forward(self, x, ctx: StepContext, k_cache, v_cache):
        cfg = self.cfg
        b, t, _ = x.shape
        q, k, v = self.wqkv(self.attn_norm(x)).view(b, t, 3, cfg.heads, cfg.head_dim).unbind(2)
        cos, sin = ctx.rope
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        a = self.wo(cached_attention(q, k, v, ctx, k_cache, v_cache))
        if cfg.parallel_residual:
            return x + a + self.fc2(self.act(self.fc1(self.mlp_norm(x))))
        h, x = self.mlp_norm.add(a, x)
        return x + self.fc2(self.act(self.fc1(h)))


# family name -> (layer class, final-norm kind, whether the family uses RoPE)
LAYERS: dict[str, tuple[type[nn.Module], str, bool]] = {
    "llama": (LlamaLayer, "rms", True),
    "mpt": (MptLayer, "ln", False),
    "neox": (NeoxLayer, "ln", True),
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
        alibi = None
        if self.cfg.alibi:
            alibi = alibi_bias(self.cfg, positions.shape[0], slot, positions.shape[1], kv_len, positions.device)
        return StepContext(positions=positions, slot=slot, kv_len=kv_len, mask=mask, rope=rope, alibi=alibi)
