"""How media reach the language model: the `media_feed` and `connector` fields of config.json.

A model is vision encoder -> connector -> LM, plus a media feed:
- "cross_attention" (Flamingo, IDEFICS, OpenFlamingo): the connector is the Perceiver Resampler
  (config.json's `perceiver` section) or nothing (raw vision tokens); the LM reads the media
  through gated cross-attention blocks (the `xattn` section). `connector` is null.
- "splice" (LLaVA, BLIP-2, MiniGPT-4): the connector turns each image into `tokens` embeddings of
  the LM's width, written into the LM's input sequence in place of the image marker, which the
  prompt builder expanded to that many marker tokens (lmmrt.models.splice).

A config.json without these fields is a cross-attention model (format version 1 as written before
the split existed).
"""

from __future__ import annotations

from dataclasses import dataclass

from lmmrt.errors import ConfigError
from lmmrt.models.config_fields import MAX_DIM, MAX_LAYERS, MAX_MEDIA_TOKENS, boolean, choice, integer, real

MEDIA_FEEDS = ("cross_attention", "splice")
# Connector kinds of splice models. Each has a module class registered in
# lmmrt.models.splice.CONNECTORS; a new kind adds its name here, its fields below (validated in
# `validate`, defaults that keep other kinds' configs valid) and its count in `tokens`.
CONNECTOR_KINDS = ("mlp", "linear", "qformer")


@dataclass
class ConnectorConfig:
    """A splice model's connector.

    kind "mlp" (LLaVA's multi-modal projector): Linear(in_dim, hidden_dim) -> act ->
    Linear(hidden_dim, out_dim), with biases when `bias`; kind "linear": one Linear(in_dim,
    out_dim). in_dim: the width of the vision features it reads (vision.width times the number of
    vision.feature_layers); out_dim: the LM's width (decoder.dim)."""

    kind: str = "mlp"
    in_dim: int = 1024
    hidden_dim: int = 4096
    out_dim: int = 4096
    act: str = "gelu"
    bias: bool = True
    # kind "qformer" (BLIP-2, MiniGPT-4; lmmrt.models.qformer): `queries` learned query tokens of
    # width hidden_dim through `layers` BERT-style layers (`heads` heads, FFN mlp_dim, LayerNorm
    # eps ln_eps), cross-attending to the vision features every `cross_attention_frequency`
    # layers; then Linear(hidden_dim, out_dim) (BLIP-2's language_projection, MiniGPT-4's llama_proj)
    queries: int = 32
    layers: int = 12
    heads: int = 12
    mlp_dim: int = 3072
    cross_attention_frequency: int = 2
    ln_eps: float = 1e-12

    def __post_init__(self):
        self.validate()

    def validate(self) -> None:
        from lmmrt.models.config import ACTIVATIONS  # config.py imports this module

        choice(self.kind, "connector.kind", CONNECTOR_KINDS)
        self.in_dim = integer(self.in_dim, "connector.in_dim", lo=1, hi=16 * MAX_DIM)
        self.hidden_dim = integer(self.hidden_dim, "connector.hidden_dim", lo=1, hi=16 * MAX_DIM)
        self.out_dim = integer(self.out_dim, "connector.out_dim", lo=1, hi=MAX_DIM)
        choice(self.act, "connector.act", ACTIVATIONS)
        boolean(self.bias, "connector.bias")
        self.queries = integer(self.queries, "connector.queries", lo=1, hi=MAX_MEDIA_TOKENS)
        self.layers = integer(self.layers, "connector.layers", lo=1, hi=MAX_LAYERS)
        self.heads = integer(self.heads, "connector.heads", lo=1, hi=MAX_DIM)
        if self.kind == "qformer" and self.hidden_dim % self.heads:
            raise ConfigError(f"connector.heads = {self.heads} does not divide connector.hidden_dim = "
                              f"{self.hidden_dim}")
        self.mlp_dim = integer(self.mlp_dim, "connector.mlp_dim", lo=1, hi=16 * MAX_DIM)
        self.cross_attention_frequency = integer(self.cross_attention_frequency,
                                                 "connector.cross_attention_frequency", lo=1, hi=MAX_LAYERS)
        self.ln_eps = real(self.ln_eps, "connector.ln_eps", lo=0.0, lo_open=True, hi=1.0)

    def tokens(self, vision_tokens: int) -> int:
        """Embeddings per image spliced into the LM's input: mlp and linear map each vision
        token (as selected by vision.output) to one."""
        if self.kind == "qformer":  # one embedding per learned query, whatever the image
            return self.queries
        if vision_tokens > MAX_MEDIA_TOKENS:
            raise ConfigError(f"connector: {vision_tokens} tokens per image; at most {MAX_MEDIA_TOKENS}")
        return vision_tokens
