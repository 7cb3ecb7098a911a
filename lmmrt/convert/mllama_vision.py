"""transformers' MllamaVisionModel (config + weights) -> lmmrt's MllamaVisionEncoder.

The source names are those under the vision model's prefix: "model.vision_model." in checkpoints
written by transformers >= 4.52, "vision_model." in the original Llama 3.2 Vision release; the
caller says which. Every gate is folded here (tanh(gate) times what it scales, in float32, stored in
the source dtype), so the lmmrt checkpoint holds no vision gates:
- position_embed[r, t] = (1 - tanh g) * embedding + tanh g * tile_embedding[r, t], plus the pre-tile
  embedding tanh g' * pre_tile[r, t] on the patch tokens (not the class token, as transformers adds
  it before the class token is prepended);
- post_tile_embed = tanh g'' * post_tile;
- global layer i: wo *= tanh(gate_attn), fc2 (weight and bias) *= tanh(gate_ffn).
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping

import torch

from lmmrt.errors import CheckpointError, ConfigError
from lmmrt.models.mllama_vision import MllamaVisionEncoder
from lmmrt.models.part_configs import VisionConfig
from lmmrt.runtime.mllama_image import tile_arrangements
from lmmrt.runtime.weights import describe_key_problems

# transformers' CLIP mean / std, which MllamaImageProcessor uses by default
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
# MllamaVisionConfig's defaults for fields a config.json leaves out
_HF_DEFAULTS = {"hidden_size": 1280, "hidden_act": "gelu", "num_hidden_layers": 32, "num_global_layers": 8,
                "attention_heads": 16, "num_channels": 3, "intermediate_size": 5120, "vision_output_dim": 7680,
                "image_size": 448, "patch_size": 14, "norm_eps": 1e-5, "max_num_tiles": 4,
                "intermediate_layers_indices": [3, 7, 15, 23, 30],
                "supported_aspect_ratios": [[1, 1], [1, 2], [1, 3], [1, 4], [2, 1], [2, 2], [3, 1], [4, 1]]}


def _square(value, name: str):
    """transformers allows image_size / patch_size as [h, w]; lmmrt's tiles are square."""
    if isinstance(value, (list, tuple)):
        if len(value) != 2 or value[0] != value[1]:
            raise ConfigError(f"vision_config.{name} = {value!r}: only square sizes are supported")
        return value[0]
    return value


def mllama_vision_config(hf_vision: dict, *, image_mean=CLIP_MEAN, image_std=CLIP_STD) -> VisionConfig:
    """A transformers MllamaVisionConfig (its config.json `vision_config` object) -> VisionConfig of kind
    "mllama"; image_mean / image_std: the image processor's normalization."""
    if not isinstance(hf_vision, dict):
        raise ConfigError(f"vision_config must be a JSON object, not {type(hf_vision).__name__}")
    hf = {**_HF_DEFAULTS, **{k: v for k, v in hf_vision.items() if v is not None}}
    if hf["num_channels"] != 3:
        raise ConfigError(f"vision_config.num_channels = {hf['num_channels']!r}: lmmrt takes RGB images (3)")
    cfg = VisionConfig(
        kind="mllama", image_size=_square(hf["image_size"], "image_size"),
        patch_size=_square(hf["patch_size"], "patch_size"), width=hf["hidden_size"],
        layers=hf["num_hidden_layers"], heads=hf["attention_heads"], mlp_dim=hf["intermediate_size"],
        act=hf["hidden_act"], ln_eps=hf["norm_eps"], image_mean=image_mean, image_std=image_std,
        max_num_tiles=hf["max_num_tiles"], supported_aspect_ratios=hf["supported_aspect_ratios"],
        global_layers=hf["num_global_layers"], intermediate_layers=hf["intermediate_layers_indices"],
        output_dim=hf["vision_output_dim"])
    # transformers' model reads only the list's length (its aspect-ratio embedding rows); the image
    # processor numbers the arrangements itself, so a list in another order means that numbering
    numbered = [list(r) for r in tile_arrangements(cfg.max_num_tiles)]
    if sorted(cfg.supported_aspect_ratios) != sorted(numbered):
        raise ConfigError(f"vision_config.supported_aspect_ratios = {hf['supported_aspect_ratios']!r}: Mllama's "
                          f"image processor numbers the {len(numbered)} tile arrangements of max_num_tiles = "
                          f"{cfg.max_num_tiles} itself ({numbered}, aspect_ratio_id = index + 1), so the list "
                          f"must hold those {len(numbered)}")
    return dataclasses.replace(cfg, supported_aspect_ratios=numbered)


def _layer_count(names, pattern: str) -> int:
    rx = re.compile(pattern)
    return 1 + max((int(m.group(1)) for k in names if (m := rx.match(k))), default=-1)


def _weight_map(layers: int, global_layers: int) -> dict[str, list[str]]:
    """The encoder's tensors that are source tensors as they are, or concatenated (q/k/v), by name
    (both sides relative to their prefixes); a global layer's wo and fc2 are then scaled by its gates,
    which keeps their shapes."""
    m = {"patch_embed.weight": ["patch_embedding.weight"], "class_embed": ["class_embedding"]}
    for ours, theirs in (("ln_pre", "layernorm_pre"), ("ln_post", "layernorm_post")):
        for s in ("weight", "bias"):
            m[f"{ours}.{s}"] = [f"{theirs}.{s}"]
    for i in range(layers + global_layers):
        local = i < layers
        src = f"transformer.layers.{i}." if local else f"global_transformer.layers.{i - layers}."
        dst = f"blocks.{i}." if local else f"global_blocks.{i - layers}."
        m[dst + "wqkv.weight"] = [src + f"self_attn.{p}_proj.weight" for p in "qkv"]
        m[dst + "wo.weight"] = [src + "self_attn.o_proj.weight"]
        for s in ("weight", "bias"):
            m[dst + f"fc1.{s}"] = [src + f"mlp.fc1.{s}"]
            m[dst + f"fc2.{s}"] = [src + f"mlp.fc2.{s}"]
            m[dst + f"ln1.{s}"] = [src + f"input_layernorm.{s}"]
            m[dst + f"ln2.{s}"] = [src + f"post_attention_layernorm.{s}"]
    return m


_EMBEDDING_SOURCES = ("gated_positional_embedding.gate", "gated_positional_embedding.embedding",
                      "gated_positional_embedding.tile_embedding.weight", "pre_tile_positional_embedding.gate",
                      "pre_tile_positional_embedding.embedding.weight", "post_tile_positional_embedding.gate",
                      "post_tile_positional_embedding.embedding.weight")


def _folded_sources(global_layers: int) -> list[str]:
    """The source tensors folded into others: the positional embeddings and every tanh gate."""
    return [*_EMBEDDING_SOURCES] + [f"global_transformer.layers.{i}.{g}" for i in range(global_layers)
                                    for g in ("gate_attn", "gate_ffn")]


def _folded_shape(name: str, config: VisionConfig) -> tuple:
    """The shape transformers gives a folded source: (1,) for a gate; the tile embeddings have a row per
    aspect-ratio id (0 for none), each every tile's tokens (or one vector per tile) flattened."""
    if name.endswith(("gate", "gate_attn", "gate_ffn")):
        return (1,)
    ids, tiles, tokens, d = len(config.supported_aspect_ratios) + 1, config.max_num_tiles, config.tile_tokens, config.width
    return {"gated_positional_embedding.embedding": (tokens, d),
            "gated_positional_embedding.tile_embedding.weight": (ids, tiles * tokens * d)}.get(name, (ids, tiles * d))


def mllama_vision_layout(config: VisionConfig, prefix: str, *,
                         out_prefix: str = "") -> tuple[dict[str, list[str]], dict[str, tuple]]:
    """What lmmrt.convert.common.check_source needs to check a source's vision tensors (names under
    `prefix`) before any is read: the weight map of the tensors made by copying or concatenating (to
    names after `out_prefix`), and the shape each folded source (embeddings, gates) must have."""
    wmap = {out_prefix + k: [prefix + s for s in srcs]
            for k, srcs in _weight_map(config.layers, config.global_layers).items()}
    return wmap, {prefix + n: _folded_shape(n, config) for n in _folded_sources(config.global_layers)}


def mllama_vision_state(hf_state: Mapping[str, torch.Tensor], prefix: str, *,
                        config: VisionConfig | None = None, out_prefix: str = "") -> dict[str, torch.Tensor]:
    """The vision tensors of a transformers Mllama state dict (names under `prefix`) -> lmmrt's
    MllamaVisionEncoder state (names after `out_prefix`), gates folded. `hf_state` needs only `in`,
    `keys()` and `get` (a dict, or lmmrt.convert.common.SourceWeights, which reads lazily). The layer
    counts come from `config` when given (and every shape is checked against it), else from the keys.
    A missing, unused or misshapen source tensor is a CheckpointError naming them all."""
    names = [k[len(prefix):] for k in hf_state.keys() if k.startswith(prefix)]
    if config is not None:
        layers, global_layers = config.layers, config.global_layers
    else:
        layers = _layer_count(names, r"transformer\.layers\.(\d+)\.")
        global_layers = _layer_count(names, r"global_transformer\.layers\.(\d+)\.")
    wmap = _weight_map(layers, global_layers)
    wanted = [s for srcs in wmap.values() for s in srcs] + _folded_sources(global_layers)
    missing = [prefix + n for n in wanted if prefix + n not in hf_state]
    unused = sorted(prefix + n for n in set(names) - set(wanted))
    if missing or unused:
        raise CheckpointError(describe_key_problems(missing, unused, [], f"the Mllama vision weights ({prefix}*)"))

    def get(name):
        return hf_state.get(prefix + name)

    def tanh(name):
        return torch.tanh(get(name).float())

    try:
        state = {dst: get(srcs[0]) if len(srcs) == 1 else torch.cat([get(s) for s in srcs])
                 for dst, srcs in wmap.items()}
        _fold_layer_gates(state, tanh, global_layers)
        state.update(_folded_embeddings(get, tanh))
    except RuntimeError as e:  # tensors whose sizes do not fit together (a reshape or concatenation fails)
        raise CheckpointError(f"the Mllama vision weights ({prefix}*) do not fit together: "
                              f"{str(e).splitlines()[0]}") from None
    if config is not None:
        _check_shapes(state, config, prefix)
    return {out_prefix + k: v.contiguous() for k, v in state.items()}


def _fold_layer_gates(state: dict[str, torch.Tensor], tanh, global_layers: int) -> None:
    """A global layer's wo *= tanh(gate_attn), fc2 (weight and bias) *= tanh(gate_ffn), in place."""
    for i in range(global_layers):
        src, dst = f"global_transformer.layers.{i}.", f"global_blocks.{i}."
        for name, gate in (("wo.weight", "gate_attn"), ("fc2.weight", "gate_ffn"), ("fc2.bias", "gate_ffn")):
            t = state[dst + name]
            state[dst + name] = (t.float() * tanh(src + gate)).to(t.dtype)


def _folded_embeddings(get, tanh) -> dict[str, torch.Tensor]:
    """position_embed (R+1, T, P, d) and post_tile_embed (R+1, T, d), their gates folded."""
    pos = get("gated_positional_embedding.embedding")
    p, d = pos.shape
    g = tanh("gated_positional_embedding.gate")
    tile_pos = get("gated_positional_embedding.tile_embedding.weight").float()
    tile_pos = tile_pos.view(tile_pos.shape[0], -1, p, d)
    table = (1 - g) * pos.float() + g * tile_pos
    pre = get("pre_tile_positional_embedding.embedding.weight").float().view(table.shape[0], table.shape[1], d)
    table[:, :, 1:] += tanh("pre_tile_positional_embedding.gate") * pre[:, :, None]
    post = get("post_tile_positional_embedding.embedding.weight")
    post_folded = tanh("post_tile_positional_embedding.gate") * post.float().view(table.shape[0], table.shape[1], d)
    return {"position_embed": table.to(pos.dtype), "post_tile_embed": post_folded.to(post.dtype)}


def _check_shapes(state: dict[str, torch.Tensor], config: VisionConfig, prefix: str) -> None:
    with torch.device("meta"):
        expected = {k: tuple(v.shape) for k, v in MllamaVisionEncoder(config).state_dict().items()}
    bad = [(k, tuple(v.shape), expected[k]) for k, v in state.items() if tuple(v.shape) != expected[k]]
    if bad:
        raise CheckpointError(describe_key_problems([], [], bad, f"the Mllama vision weights ({prefix}*), "
                                                                 f"converted,"))
