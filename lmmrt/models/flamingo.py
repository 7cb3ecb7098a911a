"""The whole Flamingo-style model: vision encoder -> perceiver -> LM decoder with gated
cross-attention blocks placed before the configured decoder layers (flamingo.md §1, §4.2)."""

from __future__ import annotations

import torch
import torch.nn as nn

from lmmrt.kernels.cpu_linear import use_cpu_linears
from lmmrt.models.config import ModelConfig
from lmmrt.models.decoder import Decoder, StepContext
from lmmrt.models.perceiver import PerceiverResampler
from lmmrt.models.vision import VisionEncoder
from lmmrt.models.xattn import GatedCrossAttention, MediaContext


class MediaLanguageModel(nn.Module):
    """What every model the decode engine runs shares, whatever feeds the media to the LM
    (cross-attention blocks here, embeddings spliced into the prompt in lmmrt.models.splice):
    subclasses set `decoder`, `xattn` (empty when there are no gated blocks) and `xattn_at`
    (decoder layer -> block index)."""

    # --- setup ----------------------------------------------------------------------------------
    def set_backend(self, backend: str) -> None:
        """Hand the backend name to every module that dispatches an op."""
        self.backend = backend
        for m in self.modules():
            if hasattr(m, "backend"):
                m.backend = backend

    def use_decode_weight_layout(self) -> None:
        """On the CPU, the decoder's and cross-attention blocks' linear layers run through oneDNN,
        each weight in the layout oneDNN streams fastest for its shape (lmmrt/kernels/cpu_linear.py):
        a decode step multiplies one row per sequence by each weight, so the step is bound by how
        fast the weights stream. Values and shapes are unchanged; checkpoint writers store them
        contiguous. On CUDA: nothing."""
        if self.device.type != "cpu":
            return
        for part in (self.decoder, self.xattn):
            use_cpu_linears(part)

    def fold_gates(self) -> None:
        for blk in self.xattn:
            blk.fold_gates()

    @property
    def dtype(self) -> torch.dtype:
        return self.decoder.embed.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.decoder.embed.weight.device

    def run_decoder(self, x: torch.Tensor, ctx: StepContext, kv_cache, media: MediaContext,
                    logits_for: str) -> torch.Tensor:
        """Input embeddings x (B, T, D) through the decoder layers, each gated block before its
        layer -> float32 logits (B, T, V) ("all") or (B, V) ("last"), filling kv_cache."""
        x = self.decoder.layer_input(x, ctx)
        for i, layer in enumerate(self.decoder.layers):
            j = self.xattn_at.get(i)
            if j is not None:
                x = self.xattn[j](x, media, j)
            x = layer(x, ctx, kv_cache.k[i], kv_cache.v[i])
        if logits_for == "last":
            x = x[:, -1]
        logits = self.decoder.head(x)
        return logits if logits.dtype == torch.float32 else logits.float()


class FlamingoModel(MediaLanguageModel):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.vision = VisionEncoder(cfg.vision)
        self.perceiver = PerceiverResampler(cfg.perceiver) if cfg.perceiver is not None else None
        self.decoder = Decoder(cfg.decoder)
        bad = [i for i in cfg.xattn.layers if not 0 <= i < cfg.decoder.layers]
        if bad:
            raise ValueError(f"cross-attention placed before decoder layers {bad}, but the decoder has "
                             f"{cfg.decoder.layers} layers")
        self.xattn = nn.ModuleList(GatedCrossAttention(cfg) for _ in cfg.xattn.layers)
        self.xattn_at = {layer: j for j, layer in enumerate(cfg.xattn.layers)}
        self.backend = "torch"

    # --- media ----------------------------------------------------------------------------------
    def encode_media(self, pixels: torch.Tensor, media_time: torch.Tensor | None = None) -> torch.Tensor:
        """pixels (M, F, 3, S, S) normalized -> media latents (M, L, media_dim)."""
        m, f = pixels.shape[:2]
        feats = self.vision(pixels.flatten(0, 1).to(self.dtype))
        feats = feats.view(m, f, feats.shape[1], feats.shape[2])
        if self.perceiver is None:
            return feats.reshape(m, -1, feats.shape[-1])
        return self.perceiver(feats, media_time)

    def project_media(self, latents: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Each block's media K/V, computed once per media item (the media cache)."""
        return [blk.project_media(latents) for blk in self.xattn]

    # --- text -----------------------------------------------------------------------------------
    def forward(self, tokens: torch.Tensor, ctx: StepContext, kv_cache, media: MediaContext,
                logits_for: str = "all") -> torch.Tensor:
        """tokens (B, T) -> logits (B, T, V) ("all") or (B, V) ("last"), filling kv_cache."""
        return self.run_decoder(self.decoder.embed(tokens), ctx, kv_cache, media, logits_for)
