"""Model configuration: one dataclass per part, serialized as lmmrt's config.json.

The same classes describe every checkpoint family; the fields that differ between IDEFICS,
OpenFlamingo and friends are explicit options (activation, norm kind, mask mode, placement).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path

FORMAT_VERSION = 1


@dataclass
class VisionConfig:
    """CLIP ViT. `output`: "all_tokens" (IDEFICS: class + patches, no post-LN) or
    "patch_tokens" (OpenFlamingo: patches only, no ln_post)."""

    image_size: int = 224
    patch_size: int = 14
    width: int = 1024
    layers: int = 24
    heads: int = 16
    mlp_dim: int = 4096
    act: str = "gelu"  # gelu | quick_gelu | gelu_tanh
    ln_eps: float = 1e-5
    output: str = "all_tokens"
    # Preprocessing: "resize" (IDEFICS: bicubic to a square) or "resize_crop" (CLIP: shortest side, centre crop).
    resize: str = "resize"
    image_mean: tuple[float, float, float] = (0.48145466, 0.4578275, 0.40821073)
    image_std: tuple[float, float, float] = (0.26862954, 0.26130258, 0.27577711)

    @property
    def grid(self) -> int:
        return self.image_size // self.patch_size

    @property
    def n_tokens(self) -> int:
        """Tokens per frame handed to the perceiver (or straight to cross-attention)."""
        n = self.grid * self.grid
        return n + 1 if self.output == "all_tokens" else n


@dataclass
class PerceiverConfig:
    """Perceiver Resampler (flamingo.md §3)."""

    dim: int = 1024
    depth: int = 6
    heads: int = 8
    head_dim: int = 64
    n_latents: int = 64
    mlp_dim: int = 4096
    mlp_act: str = "gelu"  # gelu (OpenFlamingo) | relu (IDEFICS)
    qk_norm: bool = False  # IDEFICS qk_layer_norms_perceiver: LayerNorm(head_dim) on q and k
    ln_eps: float = 1e-5
    max_frames: int = 0  # > 0 when the checkpoint has frame_embs
    max_media_time: int = 0  # > 0 when the checkpoint has media_time_embs


@dataclass
class DecoderConfig:
    """The language model. `family`: llama (IDEFICS), mpt, neox (OpenFlamingo)."""

    family: str = "llama"
    vocab_size: int = 32000  # total rows of the embedding, extra tokens included
    dim: int = 4096
    layers: int = 32
    heads: int = 32
    kv_heads: int = 0  # 0 -> heads (no GQA)
    head_dim: int = 0  # 0 -> dim // heads
    ffn_dim: int = 11008
    act: str = "silu"
    norm_eps: float = 1e-6
    norm_bias: bool = False  # LayerNorm families: whether the LN has a bias
    rope_theta: float = 10000.0
    rotary_pct: float = 1.0  # NeoX partial rotary
    parallel_residual: bool = False  # NeoX
    alibi: bool = False  # MPT
    alibi_bias_max: float = 8.0
    qkv_clip: float = 0.0  # MPT clip_qkv, 0 = off
    max_seq_len: int = 2048
    tie_embeddings: bool = False

    def __post_init__(self):
        if self.kv_heads == 0:
            self.kv_heads = self.heads
        if self.head_dim == 0:
            self.head_dim = self.dim // self.heads
        if self.heads % self.kv_heads:
            raise ValueError(f"heads ({self.heads}) must be a multiple of kv_heads ({self.kv_heads})")


@dataclass
class XAttnConfig:
    """GATED XATTN-DENSE blocks (flamingo.md §4).

    style: "idefics" (RMSNorm, q/k/v/o, SwiGLU FF, zero rows for text with no media) or
    "openflamingo" (LayerNorm, to_q/to_kv/to_out, GELU FF). `layers`: the decoder layer indices
    before which a block runs (placement rules live in the converters)."""

    style: str = "idefics"
    layers: list[int] = field(default_factory=list)
    heads: int = 32
    head_dim: int = 128
    media_dim: int = 1024
    ffn_dim: int = 11008
    qk_norm: bool = False  # IDEFICS qk_layer_norms: RMSNorm(head_dim) on q and k
    norm_eps: float = 1e-6
    gate_type: str = "float"  # float: (1,) | vector: (dim,)
    mask_mode: str = "immediate"  # immediate | cumulative


@dataclass
class ModelConfig:
    vision: VisionConfig = field(default_factory=VisionConfig)
    perceiver: PerceiverConfig | None = field(default_factory=PerceiverConfig)
    decoder: DecoderConfig = field(default_factory=DecoderConfig)
    xattn: XAttnConfig = field(default_factory=XAttnConfig)
    family: str = "idefics"  # idefics | openflamingo
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

    @property
    def media_tokens(self) -> int:
        """Keys per media item seen by cross-attention (perceiver latents, or raw vision tokens)."""
        return self.perceiver.n_latents if self.perceiver is not None else self.vision.n_tokens

    # --- serialization -------------------------------------------------------------------------
    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> ModelConfig:
        d = dict(d)
        version = d.get("format_version", FORMAT_VERSION)
        if version > FORMAT_VERSION:
            raise ValueError(f"config.json has format_version {version}; this lmmrt reads up to {FORMAT_VERSION}")
        parts = {
            "vision": VisionConfig,
            "perceiver": PerceiverConfig,
            "decoder": DecoderConfig,
            "xattn": XAttnConfig,
        }
        kw = {}
        for name, klass in parts.items():
            sub = d.pop(name, None)
            if sub is None:
                kw[name] = None if name == "perceiver" else klass()
                continue
            known = {f.name for f in dataclasses.fields(klass)}
            unknown = set(sub) - known
            if unknown:
                raise ValueError(f"config.json: unknown {name} fields {sorted(unknown)}")
            if "image_mean" in sub:
                sub["image_mean"] = tuple(sub["image_mean"])
                sub["image_std"] = tuple(sub["image_std"])
            kw[name] = klass(**sub)
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"config.json: unknown fields {sorted(unknown)}")
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
            raise ValueError(f"{path} is not valid JSON: {e}") from None
        return cls.from_dict(d)
