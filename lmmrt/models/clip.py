"""CLIP: a ViT image tower and a causal text tower, each pooled to one vector and projected into
the shared embedding space (transformers' CLIPModel.get_image_features / get_text_features).

The image tower is lmmrt's VisionEncoder (all tokens out), then the post-LayerNorm on the class
token and the visual projection. The text tower uses the same pre-LN block, causal: token +
position embeddings, the blocks, a final LayerNorm, the vector at the end-of-text position, the
text projection. Embeddings come out unnormalized, as transformers returns them.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from lmmrt.models.clip_config import ClipConfig, ClipTextConfig
from lmmrt.models.layers import LayerNorm
from lmmrt.models.vision import VisionBlock, VisionEncoder


class CausalBlock(VisionBlock):
    """The CLIP encoder block with a causal mask: each token sees itself and the tokens before it."""

    causal = True


class TextEncoder(nn.Module):
    def __init__(self, cfg: ClipTextConfig):
        super().__init__()
        self.cfg = cfg
        self.token_embed = nn.Embedding(cfg.vocab_size, cfg.width)
        self.pos_embed = nn.Parameter(torch.zeros(cfg.max_positions, cfg.width))
        self.blocks = nn.ModuleList(CausalBlock(cfg) for _ in range(cfg.layers))
        self.final_ln = LayerNorm(cfg.width, cfg.ln_eps)

    def pool_positions(self, ids: torch.Tensor) -> torch.Tensor:
        """The position each row is pooled at, by the checkpoint's rule (see clip_config.POOLING)."""
        if self.cfg.pooling == "argmax":
            return ids.to(torch.int).argmax(dim=-1)  # the first of equal maxima, as transformers
        return (ids == self.cfg.eos_token_id).to(torch.int).argmax(dim=-1)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        """ids: (N, L) right-padded token ids, L <= max_positions -> (N, width) pooled states.
        The mask is causal, so padding after a row's end-of-text token never reaches it."""
        n, length = ids.shape
        x = self.token_embed(ids) + self.pos_embed[:length].to(self.token_embed.weight.dtype)
        for blk in self.blocks:
            x = blk(x)
        pos = self.pool_positions(ids)
        return self.final_ln(x[torch.arange(n, device=ids.device), pos])


class ClipModel(nn.Module):
    def __init__(self, cfg: ClipConfig):
        super().__init__()
        self.cfg = cfg
        self.vision = VisionEncoder(cfg.vision)
        self.vision_post_ln = LayerNorm(cfg.vision.width, cfg.vision.ln_eps)
        self.visual_proj = nn.Linear(cfg.vision.width, cfg.projection_dim, bias=False)
        self.text = TextEncoder(cfg.text)
        self.text_proj = nn.Linear(cfg.text.width, cfg.projection_dim, bias=False)
        self.logit_scale = nn.Parameter(torch.zeros(()))  # log of the similarity scale

    @property
    def device(self) -> torch.device:
        return self.visual_proj.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.visual_proj.weight.dtype

    def image_features(self, pixels: torch.Tensor) -> torch.Tensor:
        """(N, 3, S, S) normalized pixels -> (N, projection_dim), not normalized."""
        cls = self.vision(pixels)[:, 0]
        return self.visual_proj(self.vision_post_ln(cls))

    def text_features(self, ids: torch.Tensor) -> torch.Tensor:
        """(N, L) token ids -> (N, projection_dim), not normalized."""
        return self.text_proj(self.text(ids))
