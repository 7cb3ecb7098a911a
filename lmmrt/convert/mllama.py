"""transformers MllamaForConditionalGeneration (Llama 3.2 Vision): config and weights -> lmmrt's
(lmmrt.models.mllama). The files (reading the directory, writing the checkpoint) are
lmmrt.convert.mllama_files'; the vision part is lmmrt.convert.mllama_vision's.

Checkpoint key spellings (both read):
- transformers >= 4.52: model.language_model.*, model.vision_model.*, model.multi_modal_projector.*,
  lm_head.*;
- the original release: language_model.model.*, vision_model.*, multi_modal_projector.*,
  language_model.lm_head.*.

Text layers: HF's layer list mixes self-attention layers and cross-attention-only layers (those
at cross_attention_layers); lmmrt numbers the self-attention layers alone (decoder.layers.*) and the
cross-attention layers as blocks (xattn.*), the k-th running before decoder layer c_k - k.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import torch

from lmmrt.convert.common import SourceWeights, check_source, llama_layer_map
from lmmrt.convert.mllama_vision import mllama_vision_config, mllama_vision_layout, mllama_vision_state
from lmmrt.errors import CheckpointError, ConfigError
from lmmrt.models.config import MLLAMA_EXTRA_EMBEDDINGS, DecoderConfig, ModelConfig, XAttnConfig
from lmmrt.models.splice import build_model

IMAGE_TOKEN = "<|image|>"
# MllamaTextConfig's defaults for fields a config.json leaves out
_TEXT_DEFAULTS = {"vocab_size": 128256, "hidden_size": 4096, "hidden_act": "silu", "num_hidden_layers": 40,
                  "num_attention_heads": 32, "num_key_value_heads": 8, "intermediate_size": 14336,
                  "rms_norm_eps": 1e-5, "max_position_embeddings": 131072, "tie_word_embeddings": False,
                  "cross_attention_layers": [3, 8, 13, 18, 23, 28, 33, 38], "bos_token_id": 128000,
                  "eos_token_id": 128001, "pad_token_id": 128004}
DEFAULT_ROPE_THETA = 500000.0
# (language model prefix, vision prefix, projector prefix, LM head) of each spelling
SPELLINGS = (("model.language_model.", "model.vision_model.", "model.multi_modal_projector.", "lm_head.weight"),
             ("language_model.model.", "vision_model.", "multi_modal_projector.", "language_model.lm_head.weight"))


def _rope(text: dict) -> tuple[float, dict | None]:
    """rope_theta and lmmrt's rope_scaling from transformers' rope_parameters (5.x) or the
    rope_theta / rope_scaling pair of older config.json files."""
    rope = text.get("rope_parameters") or text.get("rope_scaling") or {}
    if not isinstance(rope, dict):
        raise ConfigError(f"text_config.rope_parameters = {rope!r}: must be a JSON object")
    theta = float(rope.get("rope_theta", text.get("rope_theta", DEFAULT_ROPE_THETA)))
    kind = rope.get("rope_type", rope.get("type", "default"))
    if kind in ("default", None):
        return theta, None
    if kind != "llama3":
        raise ConfigError(f"text_config rope_type {kind!r} is not supported (default or llama3)")
    fields = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
    return theta, {"rope_type": "llama3", **{k: rope.get(k) for k in fields}}


def _token_ids(value) -> tuple[int | None, list[int]]:
    """An eos_token_id that may be a list -> (the eos id, the other stop ids)."""
    if isinstance(value, list):
        return (value[0] if value else None), list(value[1:])
    return value, []


def placement(cross_attention_layers, layers: int) -> list[int]:
    """HF's cross-attention layer indices (of `layers` in all) -> lmmrt's xattn.layers: the k-th
    (sorted) runs before self-attention layer c_k - k (== the count of self-attention layers: after
    the last one)."""
    cross = cross_attention_layers
    if (not isinstance(cross, list) or not all(isinstance(c, int) and not isinstance(c, bool) for c in cross)
            or sorted(set(cross)) != sorted(cross) or any(not 0 <= c < layers for c in cross)):
        raise ConfigError(f"text_config.cross_attention_layers = {cross!r}: must be distinct layer indices "
                          f"in [0, {layers})")
    return [c - k for k, c in enumerate(sorted(cross))]


def mllama_config_from_hf(hf_config: dict) -> ModelConfig:
    """A transformers MllamaConfig (config.json as a dict) -> lmmrt's ModelConfig of family "mllama"."""
    if not isinstance(hf_config.get("text_config"), dict):
        raise ConfigError("config.json: text_config must be a JSON object")
    text = {**_TEXT_DEFAULTS, **{k: v for k, v in hf_config["text_config"].items() if v is not None}}
    if text["tie_word_embeddings"]:
        raise ConfigError("text_config.tie_word_embeddings = true is not supported (Llama 3.2 Vision's LM head "
                          "is its own matrix)")
    L, d, heads = text["num_hidden_layers"], text["hidden_size"], text["num_attention_heads"]
    if not (isinstance(d, int) and isinstance(heads, int) and heads > 0 and d % heads == 0):
        raise ConfigError(f"text_config: hidden_size = {d!r} must be a multiple of num_attention_heads = {heads!r}")
    xlayers = placement(text["cross_attention_layers"], L)
    theta, scaling = _rope(text)
    eos, stops = _token_ids(text["eos_token_id"])
    decoder = DecoderConfig(
        family="llama", vocab_size=text["vocab_size"] + MLLAMA_EXTRA_EMBEDDINGS, dim=d, layers=L - len(xlayers),
        heads=heads, kv_heads=text["num_key_value_heads"], head_dim=d // heads, ffn_dim=text["intermediate_size"],
        act=text["hidden_act"], norm_eps=text["rms_norm_eps"], rope_theta=theta, rope_scaling=scaling,
        max_seq_len=text["max_position_embeddings"], tie_embeddings=False)
    xattn = XAttnConfig(
        style="mllama", layers=xlayers, heads=heads, kv_heads=text["num_key_value_heads"], head_dim=d // heads,
        media_dim=d, ffn_dim=text["intermediate_size"], qk_norm=True, norm_eps=text["rms_norm_eps"],
        gate_type="float", mask_mode="range")
    return ModelConfig(
        vision=mllama_vision_config(hf_config.get("vision_config") or {}), perceiver=None, decoder=decoder,
        xattn=xattn, family="mllama", media_feed="cross_attention",
        image_token_id=hf_config.get("image_token_index", hf_config.get("image_token_id", 128256)),
        bos_token_id=text["bos_token_id"], eos_token_id=eos, pad_token_id=text["pad_token_id"], stop_token_ids=stops,
        reset_media_after_eos=False, image_token=IMAGE_TOKEN)


def _spelling(hf_state: Mapping[str, torch.Tensor]) -> tuple[str, str, str, str]:
    for spelling in SPELLINGS:
        if spelling[0] + "embed_tokens.weight" in hf_state:
            return spelling
    raise CheckpointError("not a Llama 3.2 Vision checkpoint: no model.language_model.embed_tokens.weight "
                          "(transformers >= 4.52) nor language_model.model.embed_tokens.weight (original release)")


def text_weight_map(layers: int, cross: set[int], lm: str, head: str) -> dict[str, list[str]]:
    """lmmrt's decoder.* and xattn.* names -> the source tensors concatenated (dim 0) to make each;
    layers: HF's text layer count, cross: the indices of its cross-attention layers, lm: the
    language model's prefix, head: the LM head's name."""
    m = {"decoder.embed.weight": [lm + "embed_tokens.weight"], "decoder.norm.weight": [lm + "norm.weight"],
         "decoder.lm_head.weight": [head]}
    i = k = 0
    for hf_index in range(layers):
        src = f"{lm}layers.{hf_index}."
        if hf_index in cross:
            dst = f"xattn.{k}."
            k += 1
            m[dst + "attn_norm.weight"] = [src + "input_layernorm.weight"]
            m[dst + "wq.weight"] = [src + "cross_attn.q_proj.weight"]
            m[dst + "wkv.weight"] = [src + "cross_attn.k_proj.weight", src + "cross_attn.v_proj.weight"]
            m[dst + "wo.weight"] = [src + "cross_attn.o_proj.weight"]
            m[dst + "q_norm.weight"] = [src + "cross_attn.q_norm.weight"]
            m[dst + "k_norm.weight"] = [src + "cross_attn.k_norm.weight"]
            m[dst + "attn_gate"] = [src + "cross_attn_attn_gate"]
            m[dst + "ff_gate"] = [src + "cross_attn_mlp_gate"]
            m[dst + "ff_norm.weight"] = [src + "post_attention_layernorm.weight"]
            m[dst + "ff_w13.weight"] = [src + "mlp.gate_proj.weight", src + "mlp.up_proj.weight"]
            m[dst + "ff_w2.weight"] = [src + "mlp.down_proj.weight"]
        else:
            m.update(llama_layer_map(src, f"decoder.layers.{i}."))
            i += 1
    return m


def _text_layout(names, lm: str) -> tuple[int, set[int]]:
    """(HF's text layer count, its cross-attention layers) read from the tensor names: a text layer with
    a cross_attn_attn_gate is a cross-attention layer."""
    layer = re.compile(re.escape(lm) + r"layers\.(\d+)\.")
    names = set(names)
    layers = 1 + max((int(m.group(1)) for k in names if (m := layer.match(k))), default=-1)
    return layers, {i for i in range(layers) if f"{lm}layers.{i}.cross_attn_attn_gate" in names}


def _weight_map(layers: int, cross: set[int], spelling: tuple[str, str, str, str]) -> dict[str, list[str]]:
    """text_weight_map and the projector: every lmmrt tensor but the vision encoder's."""
    lm, _, projector, head = spelling
    wmap = text_weight_map(layers, cross, lm, head)
    wmap["projector.weight"] = [projector + "weight"]
    wmap["projector.bias"] = [projector + "bias"]
    return wmap


def check_mllama_source(src: SourceWeights, cfg: ModelConfig) -> None:
    """A Llama 3.2 Vision source against the model `cfg` builds, before any tensor is read: its
    cross-attention layers must be the config's (the shapes alone cannot tell a block moved to another
    layer, which would convert into a silently wrong model); then one CheckpointError
    (lmmrt.convert.common.check_source) names every missing, unused or misshapen source tensor, the
    parts of the fused q/k/v, k/v and gate/up included."""
    spelling = _spelling(src)
    cross = [c + k for k, c in enumerate(cfg.xattn.layers)]  # HF's indices, back from placement()
    _, found = _text_layout(src.keys(), spelling[0])
    if sorted(found) != cross:
        raise CheckpointError(f"text_config.cross_attention_layers = {cross}, but the weights have "
                              f"cross-attention layers (cross_attn_attn_gate) at {sorted(found)}")
    wmap = _weight_map(cfg.decoder.layers + len(cross), set(cross), spelling)
    vision_map, folded = mllama_vision_layout(cfg.vision, spelling[1], out_prefix="vision.")
    wmap.update(vision_map)
    with torch.device("meta"):
        model = build_model(cfg)
    check_source(src, wmap, model, cfg, source_shapes=folded)


def mllama_state_from_hf(hf_state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A transformers Mllama state dict (either key spelling; any Mapping, each tensor read once) ->
    lmmrt's MllamaModel state, the layer layout read from the names. Tensors keep the source dtype. A
    missing source tensor is a CheckpointError naming them; the shapes are the caller's to check
    (check_mllama_source before, or lmmrt.runtime.weights.check_state after)."""
    spelling = _spelling(hf_state)
    layers, cross = _text_layout(hf_state.keys(), spelling[0])
    wmap = _weight_map(layers, cross, spelling)
    missing = sorted(s for srcs in wmap.values() for s in srcs if s not in hf_state)
    if missing:
        shown = ", ".join(missing[:8]) + (f" and {len(missing) - 8} more" if len(missing) > 8 else "")
        raise CheckpointError(f"the Llama 3.2 Vision checkpoint lacks {len(missing)} tensors: {shown}")
    state = {}
    for name, srcs in wmap.items():
        parts = [hf_state[s] for s in srcs]
        state[name] = parts[0] if len(parts) == 1 else torch.cat(parts, dim=0)
    state.update(mllama_vision_state(hf_state, spelling[1], out_prefix="vision."))
    return state
