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
    wanted = _source_names(layers, global_layers)
    missing = [prefix + n for n in wanted if prefix + n not in hf_state]
    unused = sorted(prefix + n for n in set(names) - set(wanted))
    if missing or unused:
        raise CheckpointError(describe_key_problems(missing, unused, [], f"the Mllama vision weights ({prefix}*)"))

    def get(name):
        return hf_state.get(prefix + name)

    def tanh(name):
        return torch.tanh(get(name).float())

    try:
        state = _folded_embeddings(get, tanh)
        state.update(_layers(get, tanh, layers, global_layers))
    except RuntimeError as e:  # tensors whose sizes do not fit together (a reshape or concatenation fails)
        raise CheckpointError(f"the Mllama vision weights ({prefix}*) do not fit together: "
                              f"{str(e).splitlines()[0]}") from None
    if config is not None:
        _check_shapes(state, config, prefix)
    return {out_prefix + k: v.contiguous() for k, v in state.items()}


def _layers(get, tanh, layers: int, global_layers: int) -> dict[str, torch.Tensor]:
    """blocks.* (the local layers) and global_blocks.* (tanh gates folded into wo and fc2)."""
    state = {}
    for i in range(layers + global_layers):
        local = i < layers
        src = f"transformer.layers.{i}." if local else f"global_transformer.layers.{i - layers}."
        dst = f"blocks.{i}." if local else f"global_blocks.{i - layers}."
        state[dst + "wqkv.weight"] = torch.cat([get(src + f"self_attn.{p}_proj.weight") for p in "qkv"])
        state[dst + "fc1.weight"] = get(src + "mlp.fc1.weight")
        state[dst + "fc1.bias"] = get(src + "mlp.fc1.bias")
        for s in ("weight", "bias"):
            state[dst + f"ln1.{s}"] = get(src + f"input_layernorm.{s}")
            state[dst + f"ln2.{s}"] = get(src + f"post_attention_layernorm.{s}")
        attn_gate = 1.0 if local else tanh(src + "gate_attn")
        ffn_gate = 1.0 if local else tanh(src + "gate_ffn")
        for name, g, key in (("wo.weight", attn_gate, "self_attn.o_proj.weight"),
                             ("fc2.weight", ffn_gate, "mlp.fc2.weight"), ("fc2.bias", ffn_gate, "mlp.fc2.bias")):
            t = get(src + key)
            state[dst + name] = t if local else (t.float() * g).to(t.dtype)
    return state


def _source_names(layers: int, global_layers: int) -> list[str]:
    names = ["patch_embedding.weight", "class_embedding", "gated_positional_embedding.gate",
             "gated_positional_embedding.embedding", "gated_positional_embedding.tile_embedding.weight",
             "layernorm_pre.weight", "layernorm_pre.bias", "layernorm_post.weight", "layernorm_post.bias"]
    for which in ("pre", "post"):
        names += [f"{which}_tile_positional_embedding.gate", f"{which}_tile_positional_embedding.embedding.weight"]
    layer = [f"self_attn.{p}_proj.weight" for p in "qkvo"] + [
        f"{part}.{s}" for part in ("mlp.fc1", "mlp.fc2", "input_layernorm", "post_attention_layernorm")
        for s in ("weight", "bias")]
    names += [f"transformer.layers.{i}.{n}" for i in range(layers) for n in layer]
    names += [f"global_transformer.layers.{i}.{n}" for i in range(global_layers)
              for n in layer + ["gate_attn", "gate_ffn"]]
    return names


def _folded_embeddings(get, tanh) -> dict[str, torch.Tensor]:
    """patch_embed, class_embed, position_embed (R+1, T, P, d), post_tile_embed (R+1, T, d), ln_pre, ln_post."""
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
    state = {"patch_embed.weight": get("patch_embedding.weight"), "class_embed": get("class_embedding"),
             "position_embed": table.to(pos.dtype), "post_tile_embed": post_folded.to(post.dtype)}
    for ours, theirs in (("ln_pre", "layernorm_pre"), ("ln_post", "layernorm_post")):
        for s in ("weight", "bias"):
            state[f"{ours}.{s}"] = get(f"{theirs}.{s}")
    return state


def _check_shapes(state: dict[str, torch.Tensor], config: VisionConfig, prefix: str) -> None:
    with torch.device("meta"):
        expected = {k: tuple(v.shape) for k, v in MllamaVisionEncoder(config).state_dict().items()}
    bad = [(k, tuple(v.shape), expected[k]) for k, v in state.items() if tuple(v.shape) != expected[k]]
    if bad:
        raise CheckpointError(describe_key_problems([], [], bad, f"the Mllama vision weights ({prefix}*), "
                                                                 f"converted,"))
