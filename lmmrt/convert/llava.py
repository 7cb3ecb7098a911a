"""transformers LlavaForConditionalGeneration directory (LLaVA-1.5) -> lmmrt checkpoint
(`lmmrt convert llava`).

LLaVA-1.5 is a splice model: CLIP ViT -> hidden state(s) `vision_feature_layer` (default -2, the
penultimate layer; a list concatenates several) with the class token dropped ("default") or kept
("full") -> 2-layer projector with biases -> LLaMA/Vicuna, the projected features standing in
the LM's input at the `<image>` marker positions. The weight names of every transformers
version are read: the llava-hf hub checkpoints (`vision_tower.vision_model.`,
`multi_modal_projector.`, `language_model.model.`, `language_model.lm_head.`), what transformers 5
saves (`vision_tower.` without `vision_model.`) and its in-memory names (`model.vision_tower.`,
`model.multi_modal_projector.`, `model.language_model.`, `lm_head.`). The tokenizer gets an `<image>` token when it
has none; the chat template, when the source has one, is kept as chat_template.jinja.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from lmmrt.convert.clip import CLIP_MEAN, CLIP_STD
from lmmrt.convert.common import (
    SourceWeights,
    clip_vision_map,
    convert_state,
    find_tokenizer_json,
    llama_layers_map,
    read_hf_source_config,
    read_source_json,
    warn_no_tokenizer,
)
from lmmrt.convert.hf_lm import lm_spec
from lmmrt.errors import CheckpointError
from lmmrt.models.config import ModelConfig, VisionConfig, XAttnConfig
from lmmrt.models.connector_config import ConnectorConfig
from lmmrt.runtime.checkpoint_writer import check_output_path, save_checkpoint
from lmmrt.runtime.safetensors_file import check_readable
from lmmrt.runtime.weights import CHAT_TEMPLATE

IMAGE_TOKEN = "<image>"
# transformers CLIPVisionConfig's defaults for fields a config.json leaves out
_HF_VISION = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                  image_size=224, patch_size=32, hidden_act="quick_gelu", layer_norm_eps=1e-5)
# where each part's names start, in the layouts listed above
VISION_PREFIXES = ("vision_tower.vision_model.", "vision_tower.", "model.vision_tower.vision_model.",
                   "model.vision_tower.")
PROJECTOR_PREFIXES = ("multi_modal_projector.", "model.multi_modal_projector.")
LM_PREFIXES = ("language_model.model.", "model.language_model.")
HEADS = ("language_model.lm_head.weight", "lm_head.weight")


def _section(hf: dict, name: str) -> dict:
    part = hf.get(name) or {}
    if not isinstance(part, dict):
        raise CheckpointError(f"config.json: {name} must be a JSON object, not {type(part).__name__}")
    return part


def config_from_hf(hf: dict, image_token_id: int, preprocessor: dict | None = None) -> ModelConfig:
    """The lmmrt config of a LlavaConfig dict; `image_token_id`: the marker's id in the tokenizer."""
    v = {**_HF_VISION, **_section(hf, "vision_config")}
    if v.get("model_type", "clip_vision_model") != "clip_vision_model":
        raise ValueError(f"LLaVA vision tower {v['model_type']!r} is not supported (only CLIP, clip_vision_model)")
    text = _section(hf, "text_config")
    text.setdefault("model_type", "llama")
    if text["model_type"] != "llama":
        raise ValueError(f"LLaVA language model {text['model_type']!r} is not supported (only LLaMA / Vicuna)")
    strategy = hf.get("vision_feature_select_strategy", "default")
    if strategy not in ("default", "full"):
        raise ValueError(f"vision_feature_select_strategy {strategy!r} is not supported (default or full)")
    layer = hf.get("vision_feature_layer", -2)
    pre = preprocessor or {}
    crop = pre.get("crop_size")
    size = v["image_size"]
    if isinstance(crop, dict) and crop.get("height", size) != size:
        raise ValueError(f"preprocessor_config.json crops to {crop}, but the vision tower takes {size}x{size}")
    vision = VisionConfig(
        image_size=size, patch_size=v["patch_size"], width=v["hidden_size"], layers=v["num_hidden_layers"],
        heads=v["num_attention_heads"], mlp_dim=v["intermediate_size"], act=v["hidden_act"],
        ln_eps=v["layer_norm_eps"], output="patch_tokens" if strategy == "default" else "all_tokens",
        resize="resize_crop_hf", image_mean=tuple(pre.get("image_mean", CLIP_MEAN)),
        image_std=tuple(pre.get("image_std", CLIP_STD)),
        feature_layers=layer if isinstance(layer, list) else [layer])
    spec = lm_spec(text, "config.json text_config")
    decoder = spec.cfg
    connector = ConnectorConfig(kind="mlp", in_dim=vision.feature_dim, hidden_dim=decoder.dim, out_dim=decoder.dim,
                                act=hf.get("projector_hidden_act", "gelu"),
                                bias=hf.get("multimodal_projector_bias", True))
    pad = hf.get("pad_token_id", spec.pad_token_id)
    return ModelConfig(
        vision=vision, perceiver=None, decoder=decoder, xattn=XAttnConfig(layers=[], media_dim=vision.width),
        family="llava", media_feed="splice", connector=connector, image_token_id=image_token_id,
        bos_token_id=spec.bos_token_id, eos_token_id=spec.eos_token_id,
        pad_token_id=pad if pad is not None and 0 <= pad < decoder.vocab_size else None,
        reset_media_after_eos=False, image_token=IMAGE_TOKEN)


def _layout(weights: SourceWeights, src: Path) -> tuple[str, str, str, str]:
    """(vision, projector, LM body, LM head) source names: the first of each list the file has."""
    def first(candidates, marker, what):
        found = next((c for c in candidates if c + marker in weights), None)
        if found is None:
            raise CheckpointError(f"{src}: no {what} ({' or '.join(c + marker for c in candidates)}): not a "
                                  f"LlavaForConditionalGeneration checkpoint (first keys: {sorted(weights.keys())[:6]})")
        return found

    vision = first(VISION_PREFIXES, "embeddings.class_embedding", "CLIP vision tower")
    proj = first(PROJECTOR_PREFIXES, "linear_1.weight", "multi-modal projector")
    lm = first(LM_PREFIXES, "embed_tokens.weight", "language model")
    head = next((h for h in HEADS if h in weights), HEADS[0])  # absent: named as missing, unless tied
    return vision, proj, lm, head


def weight_map(cfg: ModelConfig, layout: tuple[str, str, str, str]) -> dict[str, list[str]]:
    """lmmrt name -> the source tensors concatenated (along dim 0) to make it."""
    vision, proj, lm, head = layout
    m = clip_vision_map(vision, cfg.vision.layers)
    for s in (("weight", "bias") if cfg.connector.bias else ("weight",)):
        m[f"connector.fc1.{s}"] = [proj + f"linear_1.{s}"]
        m[f"connector.fc2.{s}"] = [proj + f"linear_2.{s}"]
    m["decoder.embed.weight"] = [lm + "embed_tokens.weight"]
    m["decoder.norm.weight"] = [lm + "norm.weight"]
    if not cfg.decoder.tie_embeddings:
        m["decoder.lm_head.weight"] = [head]
    m.update(llama_layers_map(lm + "layers.", cfg.decoder.layers))
    return m


def _tokenizer(src: Path, image_token_id: int | None, vocab: int):
    """(tokenizers.Tokenizer or None, the marker's id). A tokenizer without <image> gets it as a
    special token; its id must fall inside the LM's vocabulary (whose row the features replace)."""
    path = find_tokenizer_json(src)
    if path is None:
        if image_token_id is None:
            raise CheckpointError(f"{src} has no tokenizer.json and config.json no image_token_id: the id of "
                                  f"the {IMAGE_TOKEN} marker is unknown")
        warn_no_tokenizer(src, IMAGE_TOKEN, image_token_id)
        return None, image_token_id
    from tokenizers import AddedToken
    from tokenizers import Tokenizer as HFTokenizer

    check_readable(path)
    tok = HFTokenizer.from_file(str(path))
    tid = tok.token_to_id(IMAGE_TOKEN)
    if tid is None:
        tok.add_special_tokens([AddedToken(IMAGE_TOKEN, normalized=False, special=True)])
        tid = tok.token_to_id(IMAGE_TOKEN)
    if not 0 <= tid < vocab:
        raise CheckpointError(f"{path}: {IMAGE_TOKEN} is token {tid}, outside the LM's vocabulary of {vocab} "
                              f"(its embedding rows)")
    return tok, tid


def _chat_template(src: Path) -> bytes | None:
    """The source's chat template: chat_template.jinja, chat_template.json's, or
    tokenizer_config.json's chat_template (a string; a list of named templates keeps 'default')."""
    if (src / CHAT_TEMPLATE).exists():
        return (src / CHAT_TEMPLATE).read_bytes()
    for name in ("chat_template.json", "tokenizer_config.json"):
        if (src / name).exists():
            tpl = read_source_json(src / name).get("chat_template")
            if isinstance(tpl, list):
                tpl = next((t.get("template") for t in tpl if isinstance(t, dict) and t.get("name") == "default"),
                           None)
            if isinstance(tpl, str) and tpl:
                return tpl.encode()
    return None


def llava_state(src_dir: str | Path, *, dtype: torch.dtype | None = None, progress: bool = True):
    """Read a LLaVA directory: (lmmrt config, lmmrt state dict, tokenizer or None, chat template or None)."""
    src = Path(src_dir)
    hf = read_hf_source_config(src, architecture="LlavaForConditionalGeneration", model="LLaVA", model_type="llava",
                               expected_note=" (LlavaForConditionalGeneration)")
    vocab = _section(hf, "text_config").get("vocab_size", 32000)
    tok, image_id = _tokenizer(src, hf.get("image_token_id", hf.get("image_token_index")), vocab)
    pre_path = src / "preprocessor_config.json"
    pre = read_source_json(pre_path) if pre_path.exists() else None
    cfg = config_from_hf(hf, image_id, pre)
    weights = SourceWeights.open(src)
    layout = _layout(weights, src)
    # LLaVA feeds the projector the encoder's hidden states of one layer, which the vision tower's
    # post_layernorm (it norms the pooled output only) never touches: its weights are unused
    state = convert_state(weights, weight_map(cfg, layout), cfg, dtype=dtype, progress=progress,
                          ignored_prefixes=(layout[0] + "post_layernorm.",))
    return cfg, state, tok, _chat_template(src)


def convert_llava(src_dir: str | Path, out_dir: str | Path, *, dtype: torch.dtype | None = None,
                  progress: bool = True, force: bool = False) -> Path:
    """Convert a transformers LLaVA-1.5 directory into an lmmrt checkpoint at `out_dir` (refused if
    it exists, unless force; never inside the source)."""
    check_output_path(out_dir, sources=[src_dir], force=force)
    cfg, state, tok, template = llava_state(src_dir, dtype=dtype, progress=progress)
    extra = {CHAT_TEMPLATE: template} if template is not None else {}
    return save_checkpoint(out_dir, cfg, state, tokenizer=tok, sources=[src_dir], force=force, extra_files=extra,
                           metadata={"source": "llava", "source_dir": Path(src_dir).name,
                                     "vision_feature_layer": json.dumps(cfg.vision.feature_layers)})
