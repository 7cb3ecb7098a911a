"""The per-part configs of a model — vision tower, perceiver resampler, decoder, gated cross-attention
blocks — each a dataclass that checks its own fields. lmmrt.models.config assembles them into
ModelConfig (and re-exports them: import them from either module).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from lmmrt.errors import ConfigError
from lmmrt.models.config_fields import (
    MAX_DIM,
    MAX_IMAGE_SIZE,
    MAX_LAYERS,
    MAX_MEDIA_TOKENS,
    MAX_SEQ_LEN,
    MAX_VOCAB,
    boolean,
    choice,
    integer,
    integer_list,
    real,
    real_triple,
)
from lmmrt.models.rope_scaling import checked_rope_scaling

# The names lmmrt.models.layers.activation knows.
ACTIVATIONS = ("gelu", "gelu_tanh", "gelu_new", "gelu_pytorch_tanh", "quick_gelu", "relu", "silu")
DECODER_FAMILIES = ("llama", "mpt", "neox", "opt")
ROPE_FAMILIES = ("llama", "neox")


@dataclass
class VisionConfig:
    """The vision tower. `kind` "clip": a CLIP ViT; `output`: "all_tokens" (IDEFICS: class + patches,
    no post-LN) or "patch_tokens" (OpenFlamingo: patches only, no ln_post). `kind` "mllama": Llama 3.2
    Vision's tiled encoder (lmmrt.models.mllama_vision), which uses the common ViT fields and the
    Mllama ones below; output, resize, feature_layers, patch_bias, ln_pre and ln_post are CLIP's only."""

    image_size: int = 224
    patch_size: int = 14
    width: int = 1024
    layers: int = 24
    heads: int = 16
    mlp_dim: int = 4096
    act: str = "gelu"  # gelu | quick_gelu | gelu_tanh
    ln_eps: float = 1e-5
    output: str = "all_tokens"
    # Preprocessing: "resize" (IDEFICS: bicubic to a square) or "resize_crop" (CLIP: shortest side, centre crop);
    # "resize_crop_hf" is resize_crop with transformers' CLIPImageProcessor's crop offsets (floored, not rounded).
    resize: str = "resize"
    image_mean: tuple[float, float, float] = (0.48145466, 0.4578275, 0.40821073)
    image_std: tuple[float, float, float] = (0.26862954, 0.26130258, 0.27577711)
    # Which hidden states are the features (transformers' hidden_states indices: 0 = after ln_pre,
    # i = after block i, negative from the end; LLaVA's vision_feature_layer, default -2 there);
    # several are concatenated along the feature dimension. Blocks after the last one used never run.
    feature_layers: list[int] = field(default_factory=lambda: [-1])
    # BLIP-2's ViT (EVA): a patch conv with bias, no ln_pre, a LayerNorm over every output token
    patch_bias: bool = False
    ln_pre: bool = True
    ln_post: bool = False
    kind: str = "clip"
    # Mllama only (0 / empty for CLIP): an image is up to max_num_tiles tiles of image_size, laid out as
    # one of supported_aspect_ratios (tile grids; aspect_ratio_id i + 1 names entry i); global_layers
    # gated layers follow the `layers` local ones; the features are the last global layer's output and
    # the local layers' outputs at intermediate_layers (0-based), output_dim wide in all (0 -> derived).
    max_num_tiles: int = 0
    supported_aspect_ratios: list[list[int]] = field(default_factory=list)
    global_layers: int = 0
    intermediate_layers: list[int] = field(default_factory=list)
    output_dim: int = 0

    def __post_init__(self):
        self.validate()

    def validate(self) -> None:
        """Every field's type and range, and that the patches tile the image and heads split the width."""
        choice(self.kind, "vision.kind", ("clip", "mllama"))
        self.image_size = integer(self.image_size, "vision.image_size", lo=1, hi=MAX_IMAGE_SIZE)
        self.patch_size = integer(self.patch_size, "vision.patch_size", lo=1, hi=self.image_size)
        if self.image_size % self.patch_size:
            raise ConfigError(f"vision.image_size = {self.image_size} is not a multiple of "
                              f"vision.patch_size = {self.patch_size}")
        self.width = integer(self.width, "vision.width", lo=1, hi=MAX_DIM)
        self.layers = integer(self.layers, "vision.layers", lo=1, hi=MAX_LAYERS)
        self.heads = integer(self.heads, "vision.heads", lo=1, hi=self.width)
        if self.width % self.heads:
            raise ConfigError(f"vision.heads = {self.heads} does not divide vision.width = {self.width}")
        self.mlp_dim = integer(self.mlp_dim, "vision.mlp_dim", lo=1, hi=16 * MAX_DIM)
        choice(self.act, "vision.act", ACTIVATIONS)
        self.ln_eps = real(self.ln_eps, "vision.ln_eps", lo=0.0, lo_open=True, hi=1.0)
        choice(self.output, "vision.output", ("all_tokens", "patch_tokens"))
        choice(self.resize, "vision.resize", ("resize", "resize_crop", "resize_crop_hf"))
        self.image_mean = real_triple(self.image_mean, "vision.image_mean", positive=False)
        self.image_std = real_triple(self.image_std, "vision.image_std", positive=True)
        boolean(self.patch_bias, "vision.patch_bias")
        boolean(self.ln_pre, "vision.ln_pre")
        boolean(self.ln_post, "vision.ln_post")
        self.feature_layers = integer_list(self.feature_layers, "vision.feature_layers", lo=-(self.layers + 1),
                                           hi=self.layers, max_len=self.layers + 1)
        if not self.feature_layers:
            raise ConfigError("vision.feature_layers: must name at least one hidden state")
        states = [i % (self.layers + 1) for i in self.feature_layers]  # -1 and `layers` are the same state
        if len(set(states)) != len(states):
            raise ConfigError(f"vision.feature_layers = {self.feature_layers}: names a hidden state twice")
        if self.kind == "mllama":
            self._validate_mllama()
        else:
            used = [name for name in _MLLAMA_FIELDS if getattr(self, name)]
            if used:
                raise ConfigError(f"vision.{used[0]} = {getattr(self, used[0])!r}: a Mllama field, but "
                                  f"vision.kind = {self.kind!r} (leave it 0 / empty, or set kind \"mllama\")")
        if self.n_tokens > MAX_MEDIA_TOKENS:
            raise ConfigError(f"vision: {self.n_tokens} tokens per image (image_size {self.image_size}, "
                              f"patch_size {self.patch_size}); at most {MAX_MEDIA_TOKENS} are supported")

    def _validate_mllama(self) -> None:
        """The tile count, the tile grids (each fits in max_num_tiles, none twice), the layer indices,
        and output_dim = width x (1 + len(intermediate_layers)): the features' width by construction."""
        self.max_num_tiles = integer(self.max_num_tiles, "vision.max_num_tiles", lo=1, hi=MAX_MEDIA_TOKENS)
        ratios = self.supported_aspect_ratios
        if not isinstance(ratios, (list, tuple)) or not ratios:
            raise ConfigError(f"vision.supported_aspect_ratios = {ratios!r}: must be a non-empty list of "
                              f"[tiles, tiles] grids")
        grids = []
        for i, r in enumerate(ratios):
            name = f"vision.supported_aspect_ratios[{i}]"
            if not isinstance(r, (list, tuple)) or len(r) != 2:
                raise ConfigError(f"{name} = {r!r}: must be a pair of tile counts")
            a, b = (integer(n, f"{name}[{j}]", lo=1, hi=self.max_num_tiles) for j, n in enumerate(r))
            if a * b > self.max_num_tiles:
                raise ConfigError(f"{name} = {[a, b]}: {a * b} tiles, more than vision.max_num_tiles = "
                                  f"{self.max_num_tiles}")
            if [a, b] in grids:
                raise ConfigError(f"{name} = {[a, b]}: listed twice")
            grids.append([a, b])
        self.supported_aspect_ratios = grids
        self.global_layers = integer(self.global_layers, "vision.global_layers", lo=0, hi=MAX_LAYERS)
        self.intermediate_layers = integer_list(self.intermediate_layers, "vision.intermediate_layers", lo=0,
                                                hi=self.layers - 1, max_len=self.layers)
        if not self.intermediate_layers:
            raise ConfigError("vision.intermediate_layers: must name at least one local layer")
        if len(set(self.intermediate_layers)) != len(self.intermediate_layers):
            raise ConfigError(f"vision.intermediate_layers = {self.intermediate_layers}: names a layer twice")
        width = self.width * (1 + len(self.intermediate_layers))
        self.output_dim = integer(self.output_dim, "vision.output_dim", lo=0, hi=MAX_DIM) or width
        if self.output_dim != width:
            raise ConfigError(f"vision.output_dim = {self.output_dim}: the features are vision.width x "
                              f"(1 + len(vision.intermediate_layers)) = {width} wide")

    @property
    def grid(self) -> int:
        return self.image_size // self.patch_size

    @property
    def tile_tokens(self) -> int:
        """Mllama: tokens per tile (the class token and the patches)."""
        return self.grid * self.grid + 1

    @property
    def feature_dim(self) -> int:
        """Width of the features handed on: vision.width per selected hidden state (Mllama: output_dim)."""
        if self.kind == "mllama":
            return self.output_dim
        return self.width * len(self.feature_layers)

    @property
    def n_tokens(self) -> int:
        """Tokens per frame handed to the perceiver (or straight to cross-attention); Mllama: per image,
        every tile's (padding tiles included)."""
        if self.kind == "mllama":
            return self.max_num_tiles * self.tile_tokens
        n = self.grid * self.grid
        return n + 1 if self.output == "all_tokens" else n


_MLLAMA_FIELDS = ("max_num_tiles", "supported_aspect_ratios", "global_layers", "intermediate_layers", "output_dim")


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

    def __post_init__(self):
        self.validate()

    def validate(self) -> None:
        self.dim = integer(self.dim, "perceiver.dim", lo=1, hi=MAX_DIM)
        self.depth = integer(self.depth, "perceiver.depth", lo=1, hi=MAX_LAYERS)
        self.heads = integer(self.heads, "perceiver.heads", lo=1, hi=MAX_DIM)
        self.head_dim = integer(self.head_dim, "perceiver.head_dim", lo=1, hi=MAX_DIM)
        self.n_latents = integer(self.n_latents, "perceiver.n_latents", lo=1, hi=MAX_MEDIA_TOKENS)
        self.mlp_dim = integer(self.mlp_dim, "perceiver.mlp_dim", lo=1, hi=16 * MAX_DIM)
        choice(self.mlp_act, "perceiver.mlp_act", ACTIVATIONS)
        boolean(self.qk_norm, "perceiver.qk_norm")
        self.ln_eps = real(self.ln_eps, "perceiver.ln_eps", lo=0.0, lo_open=True, hi=1.0)
        self.max_frames = integer(self.max_frames, "perceiver.max_frames", lo=0, hi=MAX_MEDIA_TOKENS)
        self.max_media_time = integer(self.max_media_time, "perceiver.max_media_time", lo=0, hi=MAX_MEDIA_TOKENS)


@dataclass
class DecoderConfig:
    """The language model. `family`: llama (IDEFICS), mpt, neox (OpenFlamingo)."""

    family: str = "llama"
    vocab_size: int = 32002  # total rows of the embedding, extra tokens included (IDEFICS: 32000 + 2)
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
    # RoPE frequency scaling (lmmrt.models.rope_scaling): null, or a {"rope_type": "llama3", ...} object
    rope_scaling: dict | None = None
    rotary_pct: float = 1.0  # NeoX partial rotary
    parallel_residual: bool = False  # NeoX
    alibi: bool = False  # MPT
    alibi_bias_max: float = 8.0
    qkv_clip: float = 0.0  # MPT clip_qkv, 0 = off
    max_seq_len: int = 2048
    tie_embeddings: bool = False
    # OPT: word_embed_proj_dim, the width of the embeddings and head when it differs from dim (0 -> dim)
    embed_dim: int = 0
    # OPT do_layer_norm_before: False puts each layer's norms after its residual adds and drops the final norm
    pre_norm: bool = True

    def __post_init__(self):
        self.validate()

    def validate(self) -> None:
        """Every field's type and range; fills kv_heads, head_dim and embed_dim when they are 0 (derived)."""
        choice(self.family, "decoder.family", DECODER_FAMILIES)
        self.vocab_size = integer(self.vocab_size, "decoder.vocab_size", lo=1, hi=MAX_VOCAB)
        self.dim = integer(self.dim, "decoder.dim", lo=1, hi=MAX_DIM)
        self.layers = integer(self.layers, "decoder.layers", lo=1, hi=MAX_LAYERS)
        self.heads = integer(self.heads, "decoder.heads", lo=1, hi=MAX_DIM)
        self.kv_heads = integer(self.kv_heads, "decoder.kv_heads", lo=0, hi=MAX_DIM) or self.heads
        if self.heads % self.kv_heads:
            raise ConfigError(f"decoder.heads = {self.heads} must be a multiple of decoder.kv_heads = {self.kv_heads}")
        self.head_dim = integer(self.head_dim, "decoder.head_dim", lo=0, hi=MAX_DIM)
        if self.head_dim == 0:
            if self.dim % self.heads:
                raise ConfigError(f"decoder.heads = {self.heads} does not divide decoder.dim = {self.dim} "
                                  f"(head_dim is derived from them when it is 0)")
            self.head_dim = self.dim // self.heads
        self.ffn_dim = integer(self.ffn_dim, "decoder.ffn_dim", lo=1, hi=16 * MAX_DIM)
        choice(self.act, "decoder.act", ACTIVATIONS)
        self.norm_eps = real(self.norm_eps, "decoder.norm_eps", lo=0.0, lo_open=True, hi=1.0)
        boolean(self.norm_bias, "decoder.norm_bias")
        self.rope_theta = real(self.rope_theta, "decoder.rope_theta", lo=0.0, lo_open=True)
        self.rope_scaling = checked_rope_scaling(self.rope_scaling)
        if self.rope_scaling is not None and self.family not in ROPE_FAMILIES:
            raise ConfigError(f"decoder.rope_scaling: family {self.family!r} has no RoPE")
        self.rotary_pct = real(self.rotary_pct, "decoder.rotary_pct", lo=0.0, lo_open=True, hi=1.0)
        rot = int(self.head_dim * self.rotary_pct)
        if self.family in ROPE_FAMILIES and (rot < 2 or rot % 2):
            raise ConfigError(f"decoder.rotary_pct = {self.rotary_pct} of head_dim {self.head_dim} rotates {rot} "
                              f"dims; RoPE needs an even number, at least 2")
        boolean(self.parallel_residual, "decoder.parallel_residual")
        boolean(self.alibi, "decoder.alibi")
        self.alibi_bias_max = real(self.alibi_bias_max, "decoder.alibi_bias_max", lo=0.0, lo_open=True)
        self.qkv_clip = real(self.qkv_clip, "decoder.qkv_clip", lo=0.0)
        self.max_seq_len = integer(self.max_seq_len, "decoder.max_seq_len", lo=1, hi=MAX_SEQ_LEN)
        boolean(self.tie_embeddings, "decoder.tie_embeddings")
        self.embed_dim = integer(self.embed_dim, "decoder.embed_dim", lo=0, hi=MAX_DIM) or self.dim
        boolean(self.pre_norm, "decoder.pre_norm")
        if self.family != "opt" and (self.embed_dim != self.dim or not self.pre_norm):
            raise ConfigError(f"decoder.embed_dim / decoder.pre_norm = false are OPT options; family {self.family!r} "
                              f"has embeddings of width decoder.dim and pre-norm layers")


@dataclass
class XAttnConfig:
    """GATED XATTN-DENSE blocks (flamingo.md §4).

    style: "idefics" (RMSNorm, q/k/v/o, SwiGLU FF, zero rows for text with no media),
    "openflamingo" (LayerNorm, to_q/to_kv/to_out, GELU FF) or "mllama" (Llama 3.2 Vision's
    cross-attention decoder layers: RMSNorm, GQA with q/k RMSNorm, SwiGLU FF, mask_mode "range").
    `layers`: the decoder layer indices before which a block runs (placement rules live in the
    converters); an mllama block may also run after the last layer (index decoder.layers), and
    two blocks may share an index (consecutive cross-attention layers)."""

    style: str = "idefics"
    layers: list[int] = field(default_factory=list)
    heads: int = 32
    kv_heads: int = 0  # 0 -> heads (no GQA)
    head_dim: int = 128
    media_dim: int = 1024
    ffn_dim: int = 11008
    qk_norm: bool = False  # IDEFICS qk_layer_norms: RMSNorm(head_dim) on q and k
    norm_eps: float = 1e-6
    gate_type: str = "float"  # float: (1,) | vector: (dim,)
    mask_mode: str = "immediate"  # immediate | cumulative | range (mllama)

    def __post_init__(self):
        self.validate()

    def validate(self) -> None:
        """Every field's type and range; the layer list strictly increasing (its range against the
        decoder is checked by ModelConfig)."""
        choice(self.style, "xattn.style", ("idefics", "openflamingo", "mllama"))
        mllama = self.style == "mllama"
        self.layers = integer_list(self.layers, "xattn.layers", lo=0, hi=MAX_LAYERS, max_len=MAX_LAYERS)
        if mllama and any(b < a for a, b in zip(self.layers, self.layers[1:])):
            raise ConfigError(f"xattn.layers = {self.layers}: must be non-decreasing decoder layer indices")
        if not mllama and any(b <= a for a, b in zip(self.layers, self.layers[1:])):
            raise ConfigError(f"xattn.layers = {self.layers}: must be strictly increasing decoder layer indices")
        self.heads = integer(self.heads, "xattn.heads", lo=1, hi=MAX_DIM)
        self.kv_heads = integer(self.kv_heads, "xattn.kv_heads", lo=0, hi=MAX_DIM) or self.heads
        if self.heads % self.kv_heads:
            raise ConfigError(f"xattn.heads = {self.heads} must be a multiple of xattn.kv_heads = {self.kv_heads}")
        if self.kv_heads != self.heads and not mllama:
            raise ConfigError(f"xattn.kv_heads = {self.kv_heads}: grouped K/V heads are an mllama option "
                              f"(style {self.style!r} has as many K/V heads as query heads)")
        self.head_dim = integer(self.head_dim, "xattn.head_dim", lo=1, hi=MAX_DIM)
        self.media_dim = integer(self.media_dim, "xattn.media_dim", lo=1, hi=MAX_DIM)
        self.ffn_dim = integer(self.ffn_dim, "xattn.ffn_dim", lo=1, hi=16 * MAX_DIM)
        boolean(self.qk_norm, "xattn.qk_norm")
        self.norm_eps = real(self.norm_eps, "xattn.norm_eps", lo=0.0, lo_open=True, hi=1.0)
        choice(self.gate_type, "xattn.gate_type", ("float", "vector"))
        choice(self.mask_mode, "xattn.mask_mode", ("immediate", "cumulative", "range"))
        if mllama != (self.mask_mode == "range"):
            raise ConfigError(f"xattn.mask_mode = {self.mask_mode!r} with style {self.style!r}: mllama blocks use "
                              "mask_mode \"range\", and only they do")
        if mllama and not (self.qk_norm and self.gate_type == "float"):
            raise ConfigError("xattn: mllama blocks have q/k norms (qk_norm true) and scalar gates (gate_type float)")
