"""Configuration of a CLIP checkpoint (family "clip"): a vision tower, a text tower and the two
projections into the shared embedding space, serialized as lmmrt's config.json.

A model kind of its own, not a FlamingoModel option: it has no language model and no media
connector, only the two encoders whose pooled outputs are compared.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from lmmrt.errors import ConfigError
from lmmrt.models.config import FORMAT_VERSION
from lmmrt.models.config_fields import (
    MAX_DIM,
    MAX_LAYERS,
    MAX_SEQ_LEN,
    MAX_VOCAB,
    JsonConfig,
    check_known_fields,
    choice,
    integer,
    real,
)
from lmmrt.models.part_configs import ACTIVATIONS, VisionConfig

CLIP_FAMILY = "clip"
# Where the text tower pools, as transformers' CLIPTextTransformer decides it from the config's
# eos_token_id: "argmax" (eos_token_id == 2, configs from before transformers PR #24773: the
# position of the highest token id, which is the end-of-text token in OpenAI's vocabulary) or
# "eos" (the first position holding eos_token_id).
POOLING = ("argmax", "eos")


@dataclass
class ClipTextConfig:
    """CLIP's causal text transformer. The field names match VisionConfig's where the two towers'
    blocks are the same (width, heads, mlp_dim, act, ln_eps), so both build the same block."""

    vocab_size: int = 49408
    width: int = 512
    layers: int = 12
    heads: int = 8
    mlp_dim: int = 2048
    act: str = "quick_gelu"
    ln_eps: float = 1e-5
    max_positions: int = 77
    pooling: str = "eos"
    eos_token_id: int = 49407  # where "eos" pooling pools; a legacy config's 2 is not the real end-of-text id

    def __post_init__(self):
        self.validate()

    def validate(self) -> None:
        self.vocab_size = integer(self.vocab_size, "text.vocab_size", lo=1, hi=MAX_VOCAB)
        self.width = integer(self.width, "text.width", lo=1, hi=MAX_DIM)
        self.layers = integer(self.layers, "text.layers", lo=1, hi=MAX_LAYERS)
        self.heads = integer(self.heads, "text.heads", lo=1, hi=self.width)
        if self.width % self.heads:
            raise ConfigError(f"text.heads = {self.heads} does not divide text.width = {self.width}")
        self.mlp_dim = integer(self.mlp_dim, "text.mlp_dim", lo=1, hi=16 * MAX_DIM)
        choice(self.act, "text.act", ACTIVATIONS)
        self.ln_eps = real(self.ln_eps, "text.ln_eps", lo=0.0, lo_open=True, hi=1.0)
        self.max_positions = integer(self.max_positions, "text.max_positions", lo=2, hi=MAX_SEQ_LEN)
        choice(self.pooling, "text.pooling", POOLING)
        self.eos_token_id = integer(self.eos_token_id, "text.eos_token_id", lo=0, hi=self.vocab_size - 1)


@dataclass
class ClipConfig(JsonConfig):
    vision: VisionConfig = field(default_factory=lambda: VisionConfig(output="all_tokens", resize="resize_crop_hf",
                                                                      act="quick_gelu"))
    text: ClipTextConfig = field(default_factory=ClipTextConfig)
    projection_dim: int = 512
    family: str = CLIP_FAMILY
    format_version: int = FORMAT_VERSION

    def __post_init__(self):
        self.validate()

    def validate(self) -> None:
        for name, klass in (("vision", VisionConfig), ("text", ClipTextConfig)):
            part = getattr(self, name)
            if not isinstance(part, klass):
                raise ConfigError(f"{name}: must be a {klass.__name__} (got {type(part).__name__})")
            part.validate()
        if self.vision.output != "all_tokens":
            raise ConfigError(f"vision.output = {self.vision.output!r}: a CLIP model pools the class token, "
                              f"so it must be 'all_tokens'")
        self.projection_dim = integer(self.projection_dim, "projection_dim", lo=1, hi=MAX_DIM)
        choice(self.family, "family", (CLIP_FAMILY,))
        self.format_version = integer(self.format_version, "format_version", lo=1, hi=FORMAT_VERSION)

    @classmethod
    def _from_dict(cls, d: dict) -> ClipConfig:
        kw = {}
        for name, klass in (("vision", VisionConfig), ("text", ClipTextConfig)):
            sub = d.pop(name, None)
            if not isinstance(sub, dict):
                raise ConfigError(f"{name}: must be a JSON object of {klass.__name__} fields"
                                  + ("" if sub is None else f", not {type(sub).__name__}"))
            check_known_fields(sub, klass, part=name)
            kw[name] = klass(**sub)
        check_known_fields(d, cls)
        return cls(**kw, **d)
