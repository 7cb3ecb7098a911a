"""Llama 3.2 Vision (transformers' MllamaForConditionalGeneration): tiled vision encoder ->
projector -> LLaMA decoder with cross-attention blocks (lmmrt.models.mllama_xattn).

transformers' text model is one list of num_hidden_layers layers, those at cross_attention_layers
being cross-attention-only layers; lmmrt's Decoder holds the self-attention layers alone (with
their static KV cache) and the blocks run between them: the block of HF layer c_k (the k-th in
sorted order) runs before decoder layer c_k - k, and one that is HF's last layer runs after the
last decoder layer, before the final norm (XAttnConfig.layers holds c_k - k).

Media: each image is max_num_tiles tiles (padding tiles included) of P = patches + 1 tokens, whose
features are projected to the text width once (encode_media) and then into each block's K/V once
(project_media): the media cache holds (N, max_num_tiles * P, kv_heads, head_dim) per block.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from lmmrt.models.config import MLLAMA_EXTRA_EMBEDDINGS, ModelConfig
from lmmrt.models.decoder import Decoder, StepContext
from lmmrt.models.flamingo import MediaLanguageModel
from lmmrt.models.mllama_vision import MllamaVisionEncoder
from lmmrt.models.mllama_xattn import MllamaCrossAttention, tokens_before_media
from lmmrt.models.xattn import MediaContext


class MllamaModel(MediaLanguageModel):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        if cfg.family != "mllama":
            raise ValueError(f"MllamaModel needs a config of family 'mllama', got {cfg.family!r}")
        self.cfg = cfg
        self.vision = MllamaVisionEncoder(cfg.vision)
        self.projector = nn.Linear(cfg.vision.feature_dim, cfg.decoder.dim, bias=True)
        self.decoder = Decoder(cfg.decoder)
        # the head scores the text vocabulary only, not the embedding's extra rows (<|image|>, ...)
        self.decoder.lm_head = nn.Linear(cfg.decoder.embed_dim, cfg.decoder.vocab_size - MLLAMA_EXTRA_EMBEDDINGS,
                                         bias=False)
        self.xattn = nn.ModuleList(MllamaCrossAttention(cfg) for _ in cfg.xattn.layers)
        # decoder layer index (decoder.layers: after the last one) -> the blocks that run before it
        self.blocks_before: dict[int, list[int]] = {}
        for j, layer in enumerate(cfg.xattn.layers):
            self.blocks_before.setdefault(layer, []).append(j)
        self.backend = "torch"

    # --- media ----------------------------------------------------------------------------------
    def encode_media(self, pixels: torch.Tensor, media_time: torch.Tensor | None = None, *,
                     aspect_ratio_ids: torch.Tensor, aspect_ratio_mask: torch.Tensor) -> torch.Tensor:
        """pixels (N, max_num_tiles, 3, S, S) normalized (padding tiles zero), aspect_ratio_ids (N,),
        aspect_ratio_mask (N, max_num_tiles) -> (N, max_num_tiles * P, decoder.dim) projected
        features. media_time is not used (an image has no frames)."""
        feats = self.vision(pixels.to(self.dtype), aspect_ratio_ids, aspect_ratio_mask)
        return self.projector(feats.flatten(1, 2))

    def project_media(self, latents: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Each block's media K/V (N, max_num_tiles * P, kv_heads, head_dim), k normalized, computed
        once per image (the media cache)."""
        return [blk.project_media(latents) for blk in self.xattn]

    # --- text -----------------------------------------------------------------------------------
    def forward(self, tokens: torch.Tensor, ctx: StepContext, kv_cache, media: MediaContext,
                logits_for: str = "all") -> torch.Tensor:
        """tokens (B, T) -> float32 logits (B, T, V) ("all") or (B, V) ("last") over the text
        vocabulary (decoder.vocab_size - 8), filling kv_cache. media carries text_time_first and
        media_len besides the usual fields (see lmmrt.models.mllama_xattn for the mask rule)."""
        # a decode step's token comes after all its prompt's markers: only a prompt has tokens
        # before its first image, and only then is the (host-read) check worth making
        before = tokens_before_media(media) if tokens.shape[1] > 1 else None
        return self.run_decoder(self.decoder.embed(tokens), ctx, kv_cache, media, logits_for, before_media=before)

    def run_decoder(self, x: torch.Tensor, ctx: StepContext, kv_cache, media: MediaContext, logits_for: str, *,
                    before_media: torch.Tensor | None = None) -> torch.Tensor:
        """The decoder layers with each layer's blocks before it and the last blocks after it."""
        x = self.decoder.layer_input(x, ctx)
        layers = self.decoder.layers
        for i in range(len(layers) + 1):
            for j in self.blocks_before.get(i, ()):
                x = self.xattn[j](x, media, j, before_media=before_media)
            if i < len(layers):
                x = layers[i](x, ctx, kv_cache.k[i], kv_cache.v[i])
        if logits_for == "last":
            x = x[:, -1]
        logits = self.decoder.head(x)
        return logits if logits.dtype == torch.float32 else logits.float()
