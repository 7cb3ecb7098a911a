"""BLIP-2's Q-Former as a splice-model connector (transformers `Blip2QFormerModel` with query
tokens only, then `language_projection`; MiniGPT-4 uses the same Q-Former with its `llama_proj`).

Per image, with the vision features `m` (n_tokens, in_dim) after the ViT's post-LayerNorm:
```
x = LN_in(queries)                                   (queries, hidden_dim), the same for every image
layer i (BERT-style: post-LayerNorm, every Linear with bias, attention scale 1/sqrt(head_dim)):
    x = LN_attn(x + Wo · MHA(x, x))                     self-attention over the queries, no mask
    if i % cross_attention_frequency == 0:
        x = LN_cross(x + Wo_c · MHA(x, m))              keys/values projected from the image features
    x = LN_mlp(x + fc2(act(fc1(x))))                    the queries' FFN (intermediate_query)
out = proj(x)                                        (queries, out_dim): the LM's embedding width
```
No final norm after the last layer. The Q-Former's text branch (ITM/ITC heads) is not used by
generation and is not built. Both attentions are the perceiver attention op without its latents
source (lmmrt.kernels.perceiver_attention): queries over one key source, no mask, fused Triton
kernel on the "triton" backend, reading q/k/v as strided views of the fused projections.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from lmmrt.kernels.perceiver_attention import perceiver_attention
from lmmrt.models.config import ModelConfig
from lmmrt.models.connector_config import ConnectorConfig
from lmmrt.models.layers import LayerNorm, activation


class QFormerLayer(nn.Module):
    def __init__(self, cfg: ConnectorConfig, cross: bool):
        super().__init__()
        d = cfg.hidden_dim
        self.heads = cfg.heads
        self.backend = "torch"
        self.wqkv = nn.Linear(d, 3 * d)  # q rows, k rows, v rows
        self.wo = nn.Linear(d, d)
        self.ln_attn = LayerNorm(d, cfg.ln_eps)
        if cross:
            self.cross_wq = nn.Linear(d, d)
            self.cross_wkv = nn.Linear(cfg.in_dim, 2 * d)  # k rows, then v rows
            self.cross_wo = nn.Linear(d, d)
            self.ln_cross = LayerNorm(d, cfg.ln_eps)
        self.cross = cross
        self.fc1 = nn.Linear(d, cfg.mlp_dim)
        self.fc2 = nn.Linear(cfg.mlp_dim, d)
        self.ln_mlp = LayerNorm(d, cfg.ln_eps)
        self.act = activation(cfg.act)

    def _attend(self, q, k, v) -> torch.Tensor:
        """q (N, Tq, H, dh), k/v (N, Tk, H, dh) -> (N, Tq, H * dh)."""
        return perceiver_attention(q, k, v, None, None, backend=self.backend).flatten(2)

    def forward(self, x: torch.Tensor, media: torch.Tensor) -> torch.Tensor:
        h, d = self.heads, x.shape[-1]
        q, k, v = self.wqkv(x).unflatten(-1, (3, h, d // h)).unbind(2)
        x = self.ln_attn(x + self.wo(self._attend(q, k, v)))
        if self.cross:
            k, v = self.cross_wkv(media).unflatten(-1, (2, h, d // h)).unbind(2)
            x = self.ln_cross(x + self.cross_wo(self._attend(self.cross_wq(x).unflatten(-1, (h, d // h)), k, v)))
        return self.ln_mlp(x + self.fc2(self.act(self.fc1(x))))


class QFormer(nn.Module):
    """Vision features (N, n_tokens, in_dim) -> (N, queries, out_dim) embeddings for the LM."""

    def __init__(self, model_cfg: ModelConfig):
        super().__init__()
        cfg = model_cfg.connector
        if cfg.kind != "qformer":
            raise ValueError(f"QFormer needs a connector of kind 'qformer', got {cfg.kind!r}")
        self.cfg = cfg
        self.queries = nn.Parameter(torch.zeros(cfg.queries, cfg.hidden_dim))
        self.ln_in = LayerNorm(cfg.hidden_dim, cfg.ln_eps)
        self.layers = nn.ModuleList(QFormerLayer(cfg, cross=i % cfg.cross_attention_frequency == 0)
                                    for i in range(cfg.layers))
        self.proj = nn.Linear(cfg.hidden_dim, cfg.out_dim, bias=cfg.bias)

    def forward(self, media: torch.Tensor) -> torch.Tensor:
        if media.dim() != 3 or media.shape[-1] != self.cfg.in_dim:
            raise ValueError(f"Q-Former expects vision features (N, tokens, {self.cfg.in_dim}), "
                             f"got {tuple(media.shape)}")
        media = media.to(self.queries.dtype)
        x = self.ln_in(self.queries).expand(media.shape[0], -1, -1)
        for layer in self.layers:
            x = layer(x, media)
        return self.proj(x)
