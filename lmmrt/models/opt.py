"""OPT decoder family (BLIP-2's language model; transformers `OPTForCausalLM`).

LayerNorm with bias, q/k/v/out and fc1/fc2 with biases, ReLU FFN, no rotary: positions come from a
learned table indexed at position + 2 (OPT's offset), the position counted from each row's first
real token (transformers derives it from the attention mask, so left padding changes nothing).
`pre_norm` (do_layer_norm_before) is true for every OPT size but 350m, which normalizes after each
residual add, has no final norm and projects its 512-wide embeddings in and out of the 1024-wide
layers (`embed_dim`, word_embed_proj_dim).

Importing this module registers the family in decoder.LAYERS (lmmrt.models imports it).
"""

from __future__ import annotations

import torch
import torch.nn as nn

from lmmrt.models.config import DecoderConfig
from lmmrt.models.decoder import LAYERS, NeoxLayer, StepContext, cached_attention

# transformers' OPTLearnedPositionalEmbedding: rows 0 and 1 were the padding index's in fairseq
POSITION_OFFSET = 2


class OptEdges(nn.Module):
    """What OPT has around its layers: learned positions, and project_in/out when the embeddings
    are narrower than the layers."""

    def __init__(self, cfg: DecoderConfig):
        super().__init__()
        self.pos_embed = nn.Embedding(cfg.max_seq_len + POSITION_OFFSET, cfg.dim)
        narrow = cfg.embed_dim != cfg.dim
        self.project_in = nn.Linear(cfg.embed_dim, cfg.dim, bias=False) if narrow else None
        self.project_out = nn.Linear(cfg.dim, cfg.embed_dim, bias=False) if narrow else None

    def layer_input(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        if self.project_in is not None:
            x = self.project_in(x)
        return x + self.pos_embed(positions + POSITION_OFFSET).to(x.dtype)

    def layer_output(self, x: torch.Tensor) -> torch.Tensor:
        return x if self.project_out is None else self.project_out(x)


class OptLayer(NeoxLayer):
    """One OPT decoder layer: NeoX's parameters (LayerNorm with bias, fused q/k/v rows, biased
    linears) with its own forward (no rotary, sequential residual, optional post-norm); `edges`
    builds the family's parts around the layers (Decoder)."""

    edges = OptEdges

    def forward(self, x, ctx: StepContext, k_cache, v_cache):
        cfg = self.cfg
        b, t, _ = x.shape
        if not cfg.pre_norm:  # OPT-350m: norm after each residual add
            q, k, v = self.wqkv(x).view(b, t, 3, cfg.heads, cfg.head_dim).unbind(2)
            x = self.attn_norm(x + self.wo(cached_attention(q, k, v, ctx, k_cache, v_cache)))
            return self.mlp_norm(x + self.fc2(self.act(self.fc1(x))))
        q, k, v = self.wqkv(self.attn_norm(x)).view(b, t, 3, cfg.heads, cfg.head_dim).unbind(2)
        h, x = self.mlp_norm.add(self.wo(cached_attention(q, k, v, ctx, k_cache, v_cache)), x)
        return x + self.fc2(self.act(self.fc1(h)))


LAYERS["opt"] = (OptLayer, "ln", False)
