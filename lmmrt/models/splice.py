"""Embedding-splice models (LLaVA, BLIP-2, MiniGPT-4): vision encoder -> connector -> LM, the
connector's output written into the LM's input embeddings in place of the image markers.

The prompt builder (lmmrt.runtime.batch) expands each image marker the user wrote into
`cfg.media_tokens` marker tokens; in the prompt's forward call the k-th marker position of the
batch, in row-major order, takes the k-th feature row of the batch's media in batch order (media
of prompt 0, then prompt 1, ...). Image features thus live in the LM's own KV cache, and every
later step is a plain text step: batching with left padding, the fixed-shape decode step and its
CUDA graphs run unchanged. The model offers the interface the decode engine calls on a
FlamingoModel (encode_media, project_media, forward, decoder, xattn, fold_gates, set_backend,
use_decode_weight_layout, dtype, device).

A new connector: a module taking vision features (M, tokens, cfg.vision.feature_dim) to
(M, cfg.media_tokens, decoder.embed_dim), registered in CONNECTORS under its config kind (see
lmmrt.models.connector_config for the config side).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn as nn

from lmmrt.models.config import ModelConfig
from lmmrt.models.decoder import Decoder, StepContext
from lmmrt.models.flamingo import FlamingoModel, MediaLanguageModel
from lmmrt.models.layers import activation
from lmmrt.models.mllama import MllamaModel
from lmmrt.models.qformer import QFormer
from lmmrt.models.vision import VisionEncoder
from lmmrt.models.xattn import MediaContext


class MlpConnector(nn.Module):
    """LLaVA's multi-modal projector: Linear -> activation -> Linear."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        c = cfg.connector
        self.fc1 = nn.Linear(c.in_dim, c.hidden_dim, bias=c.bias)
        self.fc2 = nn.Linear(c.hidden_dim, c.out_dim, bias=c.bias)
        self.act = activation(c.act)

    def forward(self, feats: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(feats)))


class LinearConnector(nn.Module):
    """One linear map from the vision features to the LM's width."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        c = cfg.connector
        self.proj = nn.Linear(c.in_dim, c.out_dim, bias=c.bias)

    def forward(self, feats: torch.Tensor) -> torch.Tensor:
        return self.proj(feats)


# connector kind (ConnectorConfig.kind) -> module class built from the whole ModelConfig
CONNECTORS: dict[str, Callable[[ModelConfig], nn.Module]] = {"mlp": MlpConnector, "linear": LinearConnector,
                                                              "qformer": QFormer}


class SpliceModel(MediaLanguageModel):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        if cfg.media_feed != "splice":
            raise ValueError(f"SpliceModel needs a config with media_feed 'splice', got {cfg.media_feed!r}")
        self.cfg = cfg
        self.vision = VisionEncoder(cfg.vision)
        self.connector = CONNECTORS[cfg.connector.kind](cfg)
        self.decoder = Decoder(cfg.decoder)
        self.xattn = nn.ModuleList()  # no cross-attention blocks: the engine's media gathering skips them
        self.xattn_at: dict[int, int] = {}
        self.backend = "torch"

    # --- media ----------------------------------------------------------------------------------
    def encode_media(self, pixels: torch.Tensor, media_time: torch.Tensor | None = None) -> torch.Tensor:
        """pixels (M, 1, 3, S, S) normalized -> (M, media_tokens, embed_dim) LM input embeddings.
        media_time is not used (a splice model places media by position in the prompt)."""
        m, f = pixels.shape[:2]
        if f != 1:
            raise ValueError(f"a {self.cfg.family} model takes single images, got a media item of {f} frames")
        return self.connector(self.vision(pixels[:, 0].to(self.dtype)))

    def project_media(self, features: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """The media cache of a splice model: the features themselves, as one (K, V) pair (the
        prompt's forward reads K; after it nothing reads them)."""
        return [(features, features)]

    # --- text -----------------------------------------------------------------------------------
    def forward(self, tokens: torch.Tensor, ctx: StepContext, kv_cache, media: MediaContext,
                logits_for: str = "all") -> torch.Tensor:
        """tokens (B, T) -> logits (B, T, V) ("all") or (B, V) ("last"), filling kv_cache.

        The call writing the prompt (cache slot 0) takes the media features at the image-marker
        positions; decode steps (a later slot, or the device slot of the fixed-shape step) never
        do, so a generated marker token is read as the plain token it is."""
        if media.any_media and isinstance(ctx.slot, int) and ctx.slot == 0:
            x = self.embed_with_features(tokens, media.kv[0][0])
        else:
            x = self.decoder.embed(tokens)
        return self.run_decoder(x, ctx, kv_cache, media, logits_for)

    def embed_with_features(self, tokens: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
        """tokens (B, T) -> input embeddings (B, T, D), the k-th image-marker position of the call
        (row-major) taking features' k-th row (features: (rows, D) or (M, media_tokens, D)).
        lmmrt.serve calls it for each prefill chunk, with the feature rows of that chunk's markers."""
        x = self.decoder.embed(tokens)
        marks = tokens == self.cfg.image_token_id
        return x.masked_scatter(marks[..., None], features.to(x.dtype))


def build_model(cfg: ModelConfig) -> nn.Module:
    """The model a config describes: a SpliceModel for media_feed "splice", a MllamaModel for family
    "mllama", else a FlamingoModel."""
    if cfg.family == "mllama":
        return MllamaModel(cfg)
    return SpliceModel(cfg) if cfg.media_feed == "splice" else FlamingoModel(cfg)
