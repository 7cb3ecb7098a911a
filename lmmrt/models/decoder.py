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

from lmmrt.kernels.cpu_linear import linear
from lmmrt.kernels.decode_attention import decode_attention
from lmmrt.models.config import DecoderConfig
from lmmrt.models.layers import activation, make_norm
from lmmrt.models.rope_scaling import scale_inv_freq


@dataclass
class StepContext:
    """What every layer needs to know about the tokens of this forward call, built once per call
    (per decode step) and shared by every layer.

    positions: (B, T) logical positions (per sequence; left padding does not count);
    slot: index in the KV cache where this call's tokens are written (an int, or a (1,) device
    tensor in the fixed-shape decode step); kv_len: cache entries attended to (slot + T);
    attn_mask: None (every key of the prefix, or causal), a bool (B, 1, T, kv_len) mask (True: may
    see), or for ALiBi families a (B, H, T, kv_len) additive bias in the model dtype with the mask
    folded in as -inf; causal: SDPA's is_causal (a prefill with no left padding).
    The fixed-shape decode step sets key_start/key_end instead: (B,) device tensors, row b attends
    to cache slots [key_start[b], key_end[b]) (decode_attention), with alibi_slopes (H,) for ALiBi."""

    positions: torch.Tensor
    slot: int | torch.Tensor
    kv_len: int
    attn_mask: torch.Tensor | None = None
    causal: bool = False
    rope: tuple[torch.Tensor, torch.Tensor] | None = None
    key_start: torch.Tensor | None = None
    key_end: torch.Tensor | None = None
    alibi_slopes: torch.Tensor | None = None
    backend: str = "torch"
    # lmmrt.serve's decode step: (B,) the cache slot of each row's one token (rows are requests at
    # their own positions, no shared slot); None: every row writes at `slot`
    row_slots: torch.Tensor | None = None


def rope_inv_freq(cfg: DecoderConfig, device) -> torch.Tensor:
    """(rotary_dim / 2,) float32 inverse frequencies of the rotary embedding."""
    rot = int(cfg.head_dim * cfg.rotary_pct)
    inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, rot, 2, device=device, dtype=torch.float32) / rot))
    return inv_freq if cfg.rope_scaling is None else scale_inv_freq(inv_freq, cfg.rope_scaling)


def rope_tables(inv_freq: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The rotary tables of one forward call, built once and shared by every layer: cos and a signed
    sin, each (B, T, 1, rotary_dim) float32 (HF's rotate-half layout, broadcast over the heads).
    The signed sin is (-sin, +sin) over the two halves, so apply_rope needs no negation per layer."""
    freqs = positions[..., None].float() * inv_freq
    emb = torch.cat([freqs, freqs], dim=-1)[:, :, None]
    sin = emb.sin()
    half = freqs.shape[-1]
    sin[..., :half].neg_()
    return emb.cos(), sin


def apply_rope(x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> torch.Tensor:
    """x: (B, T, H, hd); cos, signed_sin from rope_tables. Rotates the first `rot` dims (all for LLaMA):
    x * cos + rotate_half(x) * sin, with rotate_half(x) * sin = swap_halves(x) * signed_sin (the same
    products: a sign moved from one factor to the other), the swap one flip of a (2, half) view."""
    rot = cos.shape[-1]
    partial = rot != x.shape[-1]
    xr = x[..., :rot] if partial else x
    low_precision = x.dtype != torch.float32  # rotate in float32; skip no-op casts when already so
    if low_precision:
        xr = xr.float()
    swapped = xr.unflatten(-1, (2, rot // 2)).flip(-2).flatten(-2)
    out = xr * cos + swapped * signed_sin
    if low_precision:
        out = out.to(x.dtype)
    return torch.cat([out, x[..., rot:]], dim=-1) if partial else out


def cached_attention(q, k, v, ctx: StepContext, k_cache, v_cache):
    """Write this call's k, v into the static cache, then attend over the filled cache.

    q: (B, T, H, hd); k, v: (B, T, KV, hd); caches: (B, KV, max_len, hd). Returns (B, T, H*hd)."""
    b, t, h, hd = q.shape
    if ctx.row_slots is not None:  # one token per row, each at its own slot (no host value)
        at = ctx.row_slots.view(b, 1, 1, 1).expand(b, k.shape[2], 1, hd)
        k_cache.scatter_(2, at, k.transpose(1, 2))
        v_cache.scatter_(2, at, v.transpose(1, 2))
    if ctx.key_end is not None:
        # fixed-shape decode step (CUDA graphs): the slot lives on the device and the attention
        # reads only each row's filled slots [key_start, key_end), whatever the rest holds
        if ctx.row_slots is None:
            k_cache.index_copy_(2, ctx.slot, k.transpose(1, 2))
            v_cache.index_copy_(2, ctx.slot, v.transpose(1, 2))
        out = decode_attention(q[:, 0], k_cache, v_cache, ctx.key_start, ctx.key_end,
                               alibi_slopes=ctx.alibi_slopes, backend=ctx.backend)
        return out.reshape(b, t, h * hd)
    if ctx.row_slots is None:
        k_cache[:, :, ctx.slot:ctx.slot + t] = k.transpose(1, 2)
        v_cache[:, :, ctx.slot:ctx.slot + t] = v.transpose(1, 2)
    keys, vals = k_cache[:, :, :ctx.kv_len], v_cache[:, :, :ctx.kv_len]
    out = F.scaled_dot_product_attention(q.transpose(1, 2), keys, vals, attn_mask=ctx.attn_mask,
                                         is_causal=ctx.causal, enable_gqa=keys.shape[1] != h)
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
        qk, v = qkv.split([(cfg.heads + cfg.kv_heads) * cfg.head_dim, cfg.kv_heads * cfg.head_dim], -1)
        # q and k rotated together: one apply_rope per layer (its ops are per call, not per head)
        q, k = apply_rope(qk.view(b, t, cfg.heads + cfg.kv_heads, cfg.head_dim), *ctx.rope).split(
            [cfg.heads, cfg.kv_heads], 2)
        v = v.view(b, t, cfg.kv_heads, cfg.head_dim)
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


def alibi_mask(slopes: torch.Tensor, slot: int, t: int, kv_len: int, dtype: torch.dtype, *,
               mask: torch.Tensor | None = None, causal: bool = False) -> torch.Tensor:
    """(B or 1, H, T, kv_len) additive attention bias in `dtype`: slope_h * (key slot - query slot),
    -inf where `mask` (bool, broadcastable to (B, 1, T, kv_len)) is False, or above the diagonal
    when `causal`.

    MPT adds slope * (key position) to every score row; softmax ignores a per-row constant, so
    only the distance to the query matters and the cache slot stands in for the position: left
    padding shifts keys and queries alike and changes nothing. Built once per forward call, in the
    model dtype with the mask folded in, so layers pass it to SDPA as is."""
    dev = slopes.device
    q_slot = torch.arange(slot, slot + t, device=dev, dtype=torch.float32)
    k_slot = torch.arange(kv_len, device=dev, dtype=torch.float32)
    distance = k_slot[None, :] - q_slot[:, None]  # (T, kv_len)
    bias = (slopes[:, None, None] * distance).to(dtype)[None]  # (1, H, T, kv_len)
    if mask is not None:
        return bias.masked_fill(~mask, float("-inf"))
    return bias.masked_fill(distance > 0, float("-inf")) if causal else bias


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
        h, x = self.mlp_norm.add(self.wo(cached_attention(q, k, v, ctx, k_cache, v_cache)), x)
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
        self.embed = nn.Embedding(cfg.vocab_size, cfg.embed_dim)
        self.layers = nn.ModuleList(layer_cls(cfg) for _ in range(cfg.layers))
        # a family's parts around the layers (OPT: learned positions, project_in/out), when it has any
        edges = getattr(layer_cls, "edges", None)
        self.edges = edges(cfg) if edges is not None else None
        self.norm = make_norm(norm_kind, cfg.dim, cfg.norm_eps, cfg.norm_bias) if cfg.pre_norm else None
        if not cfg.tie_embeddings:
            self.lm_head = nn.Linear(cfg.embed_dim, cfg.vocab_size, bias=False)
        self._constants: dict[tuple[str, str], torch.Tensor] = {}

    def layer_input(self, x: torch.Tensor, ctx: StepContext) -> torch.Tensor:
        """Input embeddings (B, T, embed_dim) -> the first layer's input (B, T, dim): unchanged, but
        for a family with edges (OPT: project_in, then its learned positions at ctx.positions)."""
        return x if self.edges is None else self.edges.layer_input(x, ctx.positions)

    def head(self, x: torch.Tensor) -> torch.Tensor:
        w = self.embed.weight if self.cfg.tie_embeddings else self.lm_head.weight
        if self.norm is not None:
            x = self.norm(x)
        if self.edges is not None:
            x = self.edges.layer_output(x)
        return linear(x, w)

    def _cached(self, name: str, device, build):
        # Per-device constants (RoPE inverse frequencies, ALiBi slopes), built on first use: not
        # buffers, so state_dict() and checkpoints are unchanged.
        key = (name, str(device))
        if key not in self._constants:
            self._constants[key] = build()
        return self._constants[key]

    def rope(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
        if not self.uses_rope:
            return None
        dev = positions.device
        return rope_tables(self._cached("inv_freq", dev, lambda: rope_inv_freq(self.cfg, dev)), positions)

    def alibi_slopes(self, device) -> torch.Tensor | None:
        if not self.cfg.alibi:
            return None
        return self._cached("alibi", device, lambda: alibi_slopes(self.cfg.heads, self.cfg.alibi_bias_max, device))

    def context(self, positions: torch.Tensor, slot: int, kv_len: int, mask: torch.Tensor | None, *,
                causal: bool = False) -> StepContext:
        """Context of a forward call writing T = positions.shape[1] tokens at the int `slot`.
        mask: bool (B, 1, T, kv_len), or None for every key of the prefix (causal=True in a prefill)."""
        attn_mask = mask
        if self.cfg.alibi:
            attn_mask = alibi_mask(self.alibi_slopes(positions.device), slot, positions.shape[1], kv_len,
                                   self.embed.weight.dtype, mask=mask, causal=causal)
            causal = False  # folded into the bias
        return StepContext(positions=positions, slot=slot, kv_len=kv_len, attn_mask=attn_mask, causal=causal,
                           rope=self.rope(positions))

    def fixed_decode_context(self, positions: torch.Tensor, slot: torch.Tensor, key_start: torch.Tensor,
                             kv_len: int, backend: str) -> StepContext:
        """Context of the fixed-shape decode step: one token per row written at the device `slot`
        (1,); row b attends to slots [key_start[b], slot + 1). No host value, no data-dependent shape."""
        return StepContext(positions=positions, slot=slot, kv_len=kv_len, rope=self.rope(positions),
                           key_start=key_start, key_end=(slot + 1).expand(positions.shape[0]),
                           alibi_slopes=self.alibi_slopes(positions.device), backend=backend)
