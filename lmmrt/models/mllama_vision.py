"""Llama 3.2 Vision's (Mllama's) tiled vision encoder: transformers' MllamaVisionModel.

An image arrives as max_num_tiles tiles (padding tiles are zero pixels), its aspect_ratio_id naming
the tile grid and aspect_ratio_mask marking the real tiles. Each tile becomes a class token and its
patches; embeddings chosen by the aspect ratio are added; every tile's tokens are padded to a
multiple of 8; then the local layers and, after layernorm_post and the post-tile embedding, the
gated global layers each attend over all tokens of all tiles of the image at once. The features are
the last global layer's output followed by the chosen local layers' outputs, interleaved per channel
as transformers stacks them.

The converter (lmmrt.convert.mllama_vision) folds every gate into the tensors it scales, so this
module has none: `position_embed[aspect_ratio_id]` is the sum of the pre-tile, gated position and
gated tile-position embeddings; `post_tile_embed` is pre-multiplied by its tanh gate; the global
layers' tanh gates are multiplied into their wo and fc2.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from lmmrt.models.layers import LayerNorm
from lmmrt.models.part_configs import VisionConfig
from lmmrt.models.vision import VisionBlock

# transformers builds layernorm_pre / layernorm_post with nn.LayerNorm's default eps, not norm_eps.
OUTER_LN_EPS = 1e-5


def padded_token_mask(aspect_ratio_mask: torch.Tensor, tile_tokens: int, padded_tokens: int) -> torch.Tensor:
    """(N, tiles) 0/1 -> (N, 1, L, L) bool attention mask, L = tiles * padded_tokens.

    transformers' rule (_prepare_aspect_ratio_attention_mask): a token is padding when its tile is a
    padding tile or it is one of the tile's padding tokens; a query reads a key unless BOTH are
    padding. So real tokens read every key, padding ones included, and padding tokens read the real
    ones only."""
    n, tiles = aspect_ratio_mask.shape
    pad_tile = (aspect_ratio_mask == 0)[:, :, None]
    pad_token = torch.arange(padded_tokens, device=aspect_ratio_mask.device) >= tile_tokens
    padding = (pad_tile | pad_token).reshape(n, tiles * padded_tokens)
    return ~(padding[:, None, :, None] & padding[:, None, None, :])


class MllamaVisionEncoder(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        if cfg.kind != "mllama":
            raise ValueError(f"MllamaVisionEncoder needs a VisionConfig of kind 'mllama', got {cfg.kind!r}")
        self.cfg = cfg
        d, tiles, ratios = cfg.width, cfg.max_num_tiles, len(cfg.supported_aspect_ratios)
        self.patch_embed = nn.Conv2d(3, d, cfg.patch_size, stride=cfg.patch_size, bias=False)
        self.class_embed = nn.Parameter(torch.zeros(d))
        # row 0: aspect_ratio_id 0 (padding); row i: supported_aspect_ratios[i - 1]
        self.position_embed = nn.Parameter(torch.zeros(ratios + 1, tiles, cfg.tile_tokens, d))
        self.post_tile_embed = nn.Parameter(torch.zeros(ratios + 1, tiles, d))
        self.ln_pre = LayerNorm(d, OUTER_LN_EPS)
        self.ln_post = LayerNorm(d, OUTER_LN_EPS)
        self.blocks = nn.ModuleList(VisionBlock(cfg, attn_bias=False) for _ in range(cfg.layers))
        self.global_blocks = nn.ModuleList(VisionBlock(cfg, attn_bias=False) for _ in range(cfg.global_layers))

    def forward(self, pixels: torch.Tensor, aspect_ratio_ids: torch.Tensor,
                aspect_ratio_mask: torch.Tensor) -> torch.Tensor:
        """pixels (N, max_num_tiles, 3, S, S) normalized, padding tiles zero; aspect_ratio_ids (N,)
        (1-based index into supported_aspect_ratios, 0 = padding); aspect_ratio_mask (N, max_num_tiles)
        1 for real tiles -> features (N, max_num_tiles, tile_tokens, output_dim) in the weights' dtype."""
        cfg = self.cfg
        self._check_inputs(pixels, aspect_ratio_ids, aspect_ratio_mask)
        n, tiles, p = pixels.shape[0], cfg.max_num_tiles, cfg.tile_tokens
        x = self.patch_embed(pixels.flatten(0, 1).to(self.patch_embed.weight.dtype)).flatten(2).transpose(1, 2)
        x = torch.cat([self.class_embed.to(x.dtype).expand(n * tiles, 1, -1), x], dim=1)
        x = x.view(n, tiles, p, -1) + self.position_embed[aspect_ratio_ids].to(x.dtype)
        x = self.ln_pre(x)
        # transformers pads every tile's tokens to a multiple of 8 (zeros after layernorm_pre); the
        # padding tokens take part in attention (see padded_token_mask), so they are kept until the end
        padded = -(-p // 8) * 8
        x = F.pad(x, (0, 0, 0, padded - p)).view(n, tiles * padded, -1)
        allowed = padded_token_mask(aspect_ratio_mask, p, padded)
        wanted = set(cfg.intermediate_layers)
        states = {}
        for i, blk in enumerate(self.blocks):
            x = blk(x, allowed)
            if i in wanted:
                states[i] = x
        x = self.ln_post(x).view(n, tiles, padded, -1) + self.post_tile_embed[aspect_ratio_ids, :, None].to(x.dtype)
        x = x.view(n, tiles * padded, -1)
        for blk in self.global_blocks:
            x = blk(x, allowed)
        # transformers stacks the intermediate states on a last axis and flattens it: channel c of
        # state k lands at c * K + k
        inter = torch.stack([states[i] for i in cfg.intermediate_layers], dim=-1).flatten(-2)
        out = torch.cat([x, inter], dim=-1).view(n, tiles, padded, cfg.output_dim)
        return out[:, :, :p]

    def _check_inputs(self, pixels, aspect_ratio_ids, aspect_ratio_mask) -> None:
        cfg = self.cfg
        shape = (cfg.max_num_tiles, 3, cfg.image_size, cfg.image_size)
        if pixels.dim() != 5 or tuple(pixels.shape[1:]) != shape:
            raise ValueError(f"Mllama vision encoder expects pixels of shape (N, {', '.join(map(str, shape))}), "
                             f"got {tuple(pixels.shape)}")
        n = pixels.shape[0]
        for name, t, want in (("aspect_ratio_ids", aspect_ratio_ids, (n,)),
                              ("aspect_ratio_mask", aspect_ratio_mask, (n, cfg.max_num_tiles))):
            if not isinstance(t, torch.Tensor) or t.dtype.is_floating_point or t.dtype.is_complex:
                raise TypeError(f"{name} must be an integer tensor, got "
                                f"{t.dtype if isinstance(t, torch.Tensor) else type(t).__name__}")
            if tuple(t.shape) != want:
                raise ValueError(f"{name} must have shape {want} for {n} images, got {tuple(t.shape)}")
        ratios = len(cfg.supported_aspect_ratios)
        # one host sync per encoded batch: an out-of-range id would index past the embedding tables
        # on the device, and an image with no real tile would have no key its padding may read
        bad_id = (aspect_ratio_ids < 0) | (aspect_ratio_ids > ratios)
        bad_mask = ((aspect_ratio_mask != 0) & (aspect_ratio_mask != 1)).any(1) | (aspect_ratio_mask == 0).all(1)
        if bool((bad_id | bad_mask).any()):
            i = int((bad_id | bad_mask).nonzero()[0, 0])
            if bad_id[i]:
                raise ValueError(f"aspect_ratio_ids[{i}] = {int(aspect_ratio_ids[i])}: must be between 0 and "
                                 f"{ratios} (the number of supported aspect ratios)")
            raise ValueError(f"aspect_ratio_mask[{i}] = {aspect_ratio_mask[i].tolist()}: must be 0/1 with at "
                             f"least one real tile (1)")
