"""CLIP ViT vision encoder (flamingo.md §2), with both output conventions.

IDEFICS hands the perceiver every token of the last layer (class token included, no
post-LayerNorm); OpenFlamingo hands it the patch tokens only (no class token, no ln_post).
BLIP-2 (and MiniGPT-4) hand the Q-Former every token after a post-LayerNorm (`ln_post`); their ViT
has no ln_pre and a patch conv with bias.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from lmmrt.models.config import VisionConfig
from lmmrt.models.layers import LayerNorm, activation


class VisionBlock(nn.Module):
    """A pre-norm ViT block: attention, then an MLP, each added to the residual. attn_bias: the q/k/v and
    output projections have biases (CLIP) or not (Llama 3.2 Vision's encoder)."""

    causal = False  # CLIP's text encoder (lmmrt.models.clip.CausalBlock): each token sees those before it

    def __init__(self, cfg: VisionConfig, *, attn_bias: bool = True):
        super().__init__()
        d = cfg.width
        self.heads = cfg.heads
        self.ln1 = LayerNorm(d, cfg.ln_eps)
        self.wqkv = nn.Linear(d, 3 * d, bias=attn_bias)  # q, k, v stacked along the output dim
        self.wo = nn.Linear(d, d, bias=attn_bias)
        self.ln2 = LayerNorm(d, cfg.ln_eps)
        self.fc1 = nn.Linear(d, cfg.mlp_dim, bias=True)
        self.fc2 = nn.Linear(cfg.mlp_dim, d, bias=True)
        self.act = activation(cfg.act)

    def forward(self, x, allowed: torch.Tensor | None = None):
        """x (N, L, d); allowed: None (every key), or (N, 1, L, L) bool, True where a query may read a key."""
        n, s, d = x.shape
        qkv = self.wqkv(self.ln1(x)).view(n, s, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2], attn_mask=allowed, is_causal=self.causal)
        x = x + self.wo(a.transpose(1, 2).reshape(n, s, d))
        return x + self.fc2(self.act(self.fc1(self.ln2(x))))


class VisionEncoder(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.cfg = cfg
        d = cfg.width
        self.patch_embed = nn.Conv2d(3, d, cfg.patch_size, stride=cfg.patch_size, bias=cfg.patch_bias)
        self.class_embed = nn.Parameter(torch.zeros(d))
        self.pos_embed = nn.Parameter(torch.zeros(cfg.grid * cfg.grid + 1, d))
        self.ln_pre = LayerNorm(d, cfg.ln_eps) if cfg.ln_pre else None
        self.blocks = nn.ModuleList(VisionBlock(cfg) for _ in range(cfg.layers))
        self.ln_post = LayerNorm(d, cfg.ln_eps) if cfg.ln_post else None

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        """pixels: (N, 3, S, S) normalized -> (N, n_tokens, feature_dim): the hidden states named by
        cfg.feature_layers (the last block's by default), concatenated."""
        cfg = self.cfg
        if pixels.dim() != 4 or pixels.shape[1] != 3 or pixels.shape[2:] != (cfg.image_size, cfg.image_size):
            raise ValueError(f"vision encoder expects pixels of shape (N, 3, {cfg.image_size}, {cfg.image_size}), "
                             f"got {tuple(pixels.shape)}")
        x = self.patch_embed(pixels.to(self.patch_embed.weight.dtype)).flatten(2).transpose(1, 2)
        cls = self.class_embed.to(x.dtype).expand(x.shape[0], 1, -1)
        x = torch.cat([cls, x], dim=1) + self.pos_embed.to(x.dtype)
        if self.ln_pre is not None:
            x = self.ln_pre(x)
        # hidden state i: after block i (0: after ln_pre); blocks past the last one wanted never run
        wanted = [i % (cfg.layers + 1) for i in cfg.feature_layers]
        states = {0: x}
        for i, blk in enumerate(self.blocks[:max(wanted)], start=1):
            x = blk(x)
            states[i] = x
        x = states[wanted[0]] if len(wanted) == 1 else torch.cat([states[i] for i in wanted], dim=-1)
        if self.ln_post is not None:
            x = self.ln_post(x)
        if cfg.output == "patch_tokens":
            x = x[:, 1:]
        return x
