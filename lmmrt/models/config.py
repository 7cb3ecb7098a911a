"""Model configuration: one dataclass per part (lmmrt.models.part_configs, re-exported here) and
ModelConfig, which holds them and is serialized as lmmrt's config.json.

The same classes describe every checkpoint family; the fields that differ between IDEFICS,
OpenFlamingo and friends are explicit options (activation, norm kind, mask mode, placement).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

from lmmrt.errors import ConfigError
from lmmrt.models.config_fields import (
    JsonConfig,
    boolean,
    check_known_fields,
    choice,
    integer,
    integer_list,
    optional_integer,
    text,
)
from lmmrt.models.connector_config import MEDIA_FEEDS, ConnectorConfig
from lmmrt.models.part_configs import ACTIVATIONS as ACTIVATIONS
from lmmrt.models.part_configs import DECODER_FAMILIES as DECODER_FAMILIES
from lmmrt.models.part_configs import ROPE_FAMILIES as ROPE_FAMILIES
from lmmrt.models.part_configs import DecoderConfig, PerceiverConfig, VisionConfig, XAttnConfig

FORMAT_VERSION = 1
# Checkpoint families (which converter made it, how prompts are written) and their media feed.
FAMILIES = {"idefics": "cross_attention", "openflamingo": "cross_attention", "llava": "splice",
            "blip2": "splice", "minigpt4": "splice", "mllama": "cross_attention"}
# Llama 3.2 Vision's embedding has 8 rows more than its LM head (<|image|> is the first of them):
# decoder.vocab_size counts the embedding rows, the head has vocab_size - 8.
MLLAMA_EXTRA_EMBEDDINGS = 8


@dataclass
class ModelConfig(JsonConfig):
    vision: VisionConfig = field(default_factory=VisionConfig)
    perceiver: PerceiverConfig | None = field(default_factory=PerceiverConfig)
    decoder: DecoderConfig = field(default_factory=DecoderConfig)
    xattn: XAttnConfig = field(default_factory=XAttnConfig)
    family: str = "idefics"  # one of FAMILIES
    # How media reach the LM and through what (see lmmrt.models.connector_config): cross-attention
    # models keep `connector` null (their connector is `perceiver`); splice models need one.
    media_feed: str = "cross_attention"
    connector: ConnectorConfig | None = None
    image_token_id: int = 32001
    bos_token_id: int | None = 1
    eos_token_id: int | None = 2
    pad_token_id: int | None = 0
    end_of_chunk_token_id: int | None = None  # OpenFlamingo <|endofchunk|>
    # IDEFICS: after an end-of-sequence token, text sees no media until the next image marker.
    reset_media_after_eos: bool = True
    # Token ids at which generation stops by default (besides eos).
    stop_token_ids: list[int] = field(default_factory=list)
    # How the prompt builder writes one media item, e.g. IDEFICS wraps <image> in
    # <fake_token_around_image>. "{image}" is replaced by the image marker text.
    image_prompt_template: str = "{image}"
    image_token: str = "<image>"
    format_version: int = FORMAT_VERSION

    def __post_init__(self):
        self.validate()

    def validate(self) -> None:
        """Every field, the sub-configs again (a converter may have changed them after building
        them) and the fields that must agree with each other."""
        parts = {"vision": VisionConfig, "perceiver": PerceiverConfig, "decoder": DecoderConfig, "xattn": XAttnConfig}
        for name, klass in parts.items():
            part = getattr(self, name)
            if part is None and name == "perceiver":
                continue
            if not isinstance(part, klass):
                raise ConfigError(f"{name}: must be a {klass.__name__} (got {type(part).__name__})")
            part.validate()
        self.format_version = integer(self.format_version, "format_version", lo=1, hi=FORMAT_VERSION)
        choice(self.family, "family", tuple(FAMILIES))
        choice(self.media_feed, "media_feed", MEDIA_FEEDS)
        if self.media_feed != FAMILIES[self.family]:
            raise ConfigError(f"media_feed = {self.media_feed!r}, but family {self.family!r} models are "
                              f"{FAMILIES[self.family]!r} models")
        vocab = self.decoder.vocab_size
        self.image_token_id = integer(self.image_token_id, "image_token_id", lo=0, hi=vocab - 1)
        for name in ("bos_token_id", "eos_token_id", "pad_token_id", "end_of_chunk_token_id"):
            setattr(self, name, optional_integer(getattr(self, name), name, lo=0, hi=vocab - 1))
        self.stop_token_ids = integer_list(self.stop_token_ids, "stop_token_ids", lo=0, hi=vocab - 1, max_len=vocab)
        clash = [name for name in ("bos_token_id", "eos_token_id", "pad_token_id")
                 if getattr(self, name) == self.image_token_id]
        if clash:  # every such token in a prompt would be taken for an image
            raise ConfigError(f"image_token_id = {self.image_token_id} is also {' and '.join(clash)}: the image "
                              "marker needs a token id of its own")
        boolean(self.reset_media_after_eos, "reset_media_after_eos")
        text(self.image_prompt_template, "image_prompt_template")
        if self.image_prompt_template.count("{image}") != 1:
            raise ConfigError(f"image_prompt_template = {self.image_prompt_template!r}: must contain \"{{image}}\" "
                              f"exactly once (where the image marker goes)")
        others = sorted(set(re.findall(r"\{[^{}]*\}", self.image_prompt_template)) - {"{image}"})
        if others:  # the rest of the template is literal text: a {field} there is a mistake, never filled in
            raise ConfigError(f"image_prompt_template = {self.image_prompt_template!r}: {', '.join(others)} is "
                              "not a field; {image} is the only one (the rest is inserted as written)")
        text(self.image_token, "image_token")
        if self.media_feed == "splice":
            self._validate_splice()
            return
        if self.connector is not None:
            raise ConfigError("connector: cross-attention models take their connector from the perceiver "
                              "section (connector must be null)")
        for field_name, value in (("xattn.style", self.xattn.style), ("vision.kind", self.vision.kind)):
            if (self.family == "mllama") != (value == "mllama"):
                raise ConfigError(f"{field_name} = {value!r} with family {self.family!r}: mllama models have an "
                                  "mllama vision encoder and mllama blocks, and only they do")
        if self.family == "mllama":
            self._validate_mllama()
            return
        bad = [i for i in self.xattn.layers if i >= self.decoder.layers]
        if bad:
            raise ConfigError(f"xattn.layers = {self.xattn.layers}: layers {bad} are past the last decoder layer "
                              f"(decoder.layers = {self.decoder.layers})")
        features = self.vision.feature_dim  # vision.width per hidden state in vision.feature_layers
        media_dim, media_from = ((self.perceiver.dim, "perceiver.dim") if self.perceiver is not None
                                 else (features, "the vision features' width"))
        if self.perceiver is not None and self.perceiver.dim != features:
            raise ConfigError(f"perceiver.dim = {self.perceiver.dim} differs from the vision features' width "
                              f"{features} (vision.width x len(vision.feature_layers))")
        if self.xattn.media_dim != media_dim:
            raise ConfigError(f"xattn.media_dim = {self.xattn.media_dim} differs from {media_from} = {media_dim}")

    def _validate_mllama(self) -> None:
        """Llama 3.2 Vision: the projected vision features (decoder.dim wide) are the media, no
        perceiver; a block may run after the last decoder layer (index decoder.layers)."""
        if self.perceiver is not None:
            raise ConfigError("an mllama model has no perceiver section (its vision features are projected "
                              "straight to the text width)")
        bad = [i for i in self.xattn.layers if i > self.decoder.layers]
        if bad:
            raise ConfigError(f"xattn.layers = {self.xattn.layers}: layers {bad} are past the end of the decoder "
                              f"(decoder.layers = {self.decoder.layers}; a block may run after the last one)")
        if self.xattn.media_dim != self.decoder.dim:
            raise ConfigError(f"xattn.media_dim = {self.xattn.media_dim} differs from decoder.dim = "
                              f"{self.decoder.dim} (mllama's projector maps the vision features to the text width)")
        if self.decoder.family != "llama" or self.decoder.tie_embeddings:
            raise ConfigError("an mllama model has a llama decoder with an untied LM head")
        if self.decoder.vocab_size <= MLLAMA_EXTRA_EMBEDDINGS:
            raise ConfigError(f"decoder.vocab_size = {self.decoder.vocab_size}: an mllama embedding has "
                              f"{MLLAMA_EXTRA_EMBEDDINGS} rows more than its LM head, so more than that")

    def _validate_splice(self) -> None:
        """A splice model: a connector from the vision features to the LM's input width, and no
        Flamingo parts (no perceiver, no cross-attention layers)."""
        if not isinstance(self.connector, ConnectorConfig):
            raise ConfigError(f"connector: a splice model needs a connector section (got "
                              f"{type(self.connector).__name__})")
        self.connector.validate()
        if self.perceiver is not None or self.xattn.layers:
            raise ConfigError("a splice model has no perceiver section and no xattn.layers (its media go "
                              "through the connector into the LM's input)")
        c = self.connector
        if c.in_dim != self.vision.feature_dim:
            raise ConfigError(f"connector.in_dim = {c.in_dim} differs from the vision features' width "
                              f"{self.vision.feature_dim} (vision.width x len(vision.feature_layers))")
        if c.out_dim != self.decoder.embed_dim:
            raise ConfigError(f"connector.out_dim = {c.out_dim} differs from the LM's embedding width "
                              f"decoder.embed_dim = {self.decoder.embed_dim}")
        self.connector.tokens(self.vision.n_tokens)

    @property
    def media_tokens(self) -> int:
        """Keys per media item seen by cross-attention (perceiver latents, or raw vision tokens);
        for a splice model, the embeddings each image becomes in the LM's input."""
        if self.media_feed == "splice":
            return self.connector.tokens(self.vision.n_tokens)
        return self.perceiver.n_latents if self.perceiver is not None else self.vision.n_tokens

    # --- serialization -------------------------------------------------------------------------
    @classmethod
    def _from_dict(cls, d: dict) -> ModelConfig:
        version = d.get("format_version", FORMAT_VERSION)
        if isinstance(version, int) and not isinstance(version, bool) and version > FORMAT_VERSION:
            raise ConfigError(f"format_version {version}; this lmmrt reads up to {FORMAT_VERSION}")
        parts = {
            "vision": VisionConfig,
            "perceiver": PerceiverConfig,
            "decoder": DecoderConfig,
            "xattn": XAttnConfig,
            "connector": ConnectorConfig,
        }
        kw = {}
        for name, klass in parts.items():
            sub = d.pop(name, None)
            if sub is None:
                kw[name] = None if name in ("perceiver", "connector") else klass()
                continue
            if not isinstance(sub, dict):
                raise ConfigError(f"{name}: must be a JSON object, not {type(sub).__name__}")
            check_known_fields(sub, klass, part=name)
            kw[name] = klass(**sub)
        check_known_fields(d, cls)
        return cls(**kw, **d)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> ModelConfig:
        path = Path(path)
        try:
            d = json.loads(path.read_text())
        except FileNotFoundError:
            raise FileNotFoundError(f"no lmmrt config.json at {path}") from None
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path} is not valid JSON: {e}") from None
        return cls.from_dict(d, where=str(path))
