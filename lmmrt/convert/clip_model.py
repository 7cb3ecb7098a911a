"""transformers CLIPModel directory (or an open_clip state dict, see clip_open_clip.py) -> lmmrt
CLIP checkpoint (`lmmrt convert clip`).

The weights are read as every converter reads them (safetensors, single or sharded, or
pytorch_model*.bin with weights_only=True); q/k/v are fused as in lmmrt's vision blocks, for the
text tower too. Before any tensor is read, one CheckpointError names every missing, unexpected and
misshapen source key. The image preprocessing (size, mean, std) comes from
preprocessor_config.json when the directory has one, else CLIP's defaults.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import torch

from lmmrt.convert.clip import CLIP_MEAN, CLIP_STD
from lmmrt.convert.common import (
    SourceWeights,
    clip_vision_map,
    find_tokenizer_json,
    misshapen_sources,
    read_source_json,
    source_config_path,
)
from lmmrt.errors import CheckpointError
from lmmrt.models.clip import ClipModel
from lmmrt.models.clip_config import ClipConfig, ClipTextConfig
from lmmrt.models.config import VisionConfig
from lmmrt.runtime.checkpoint_writer import check_output_path, save_checkpoint
from lmmrt.runtime.tokenizer import Tokenizer
from lmmrt.runtime.weights import FiniteCheck, describe_key_problems

# Source tensors lmmrt does not need: position-id buffers (arange) and open_clip's causal mask, which
# some files carry.
IGNORED_SUFFIXES = ("embeddings.position_ids", "attn_mask")
# transformers CLIPConfig's defaults, for fields a config.json leaves out
_HF_VISION = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                  image_size=224, patch_size=32, hidden_act="quick_gelu", layer_norm_eps=1e-5)
_HF_TEXT = dict(vocab_size=49408, hidden_size=512, intermediate_size=2048, num_hidden_layers=12,
                num_attention_heads=8, max_position_embeddings=77, hidden_act="quick_gelu", layer_norm_eps=1e-5,
                eos_token_id=49407)


def config_from_hf(hf: dict, preprocessor: dict | None = None) -> ClipConfig:
    def sub(name, defaults):
        part = hf.get(name) or {}
        if not isinstance(part, dict):
            raise CheckpointError(f"config.json: {name} must be a JSON object, not {type(part).__name__}")
        return {**defaults, **part}

    v, t = sub("vision_config", _HF_VISION), sub("text_config", _HF_TEXT)
    pre = preprocessor or {}
    vision = VisionConfig(
        image_size=v["image_size"], patch_size=v["patch_size"], width=v["hidden_size"],
        layers=v["num_hidden_layers"], heads=v["num_attention_heads"], mlp_dim=v["intermediate_size"],
        act=v["hidden_act"], ln_eps=v["layer_norm_eps"], output="all_tokens", resize="resize_crop_hf",
        image_mean=tuple(pre.get("image_mean", CLIP_MEAN)), image_std=tuple(pre.get("image_std", CLIP_STD)))
    eos = t["eos_token_id"]
    text = ClipTextConfig(
        vocab_size=t["vocab_size"], width=t["hidden_size"], layers=t["num_hidden_layers"],
        heads=t["num_attention_heads"], mlp_dim=t["intermediate_size"], act=t["hidden_act"],
        ln_eps=t["layer_norm_eps"], max_positions=t["max_position_embeddings"],
        # transformers' rule (CLIPTextTransformer.forward): eos_token_id == 2 marks a config from before
        # PR #24773, pooled at the highest token id
        pooling="argmax" if eos == 2 else "eos", eos_token_id=eos)
    return ClipConfig(vision=vision, text=text, projection_dim=hf.get("projection_dim", 512))


def weight_map(cfg: ClipConfig) -> dict[str, list[str]]:
    """lmmrt name -> the source tensors concatenated (along dim 0) to make it."""
    m = clip_vision_map("vision_model.", cfg.vision.layers)
    for s in ("weight", "bias"):
        m[f"vision_post_ln.{s}"] = [f"vision_model.post_layernorm.{s}"]
        m[f"text.final_ln.{s}"] = [f"text_model.final_layer_norm.{s}"]
    # the text blocks have the vision blocks' layout: the same map, under other names
    for name, srcs in clip_vision_map("text_model.", cfg.text.layers).items():
        if name.startswith("vision.blocks."):
            m["text." + name[len("vision."):]] = srcs
    m["text.token_embed.weight"] = ["text_model.embeddings.token_embedding.weight"]
    m["text.pos_embed"] = ["text_model.embeddings.position_embedding.weight"]
    m["visual_proj.weight"] = ["visual_projection.weight"]
    m["text_proj.weight"] = ["text_projection.weight"]
    m["logit_scale"] = ["logit_scale"]
    return m


def convert_weights(src: SourceWeights, cfg: ClipConfig, wmap: dict[str, list[str]], *, transposed=frozenset(),
                    dtype: torch.dtype | None = None, progress: bool = True,
                    where: str = "the source checkpoint") -> dict[str, torch.Tensor]:
    """Apply a weight map (lmmrt name -> source names concatenated along dim 0; the names in
    `transposed` are a single 2-D source stored the other way round, as open_clip's projections)
    after checking every key and shape: one error names all problems."""
    with torch.device("meta"):
        expected = {k: tuple(v.shape) for k, v in ClipModel(cfg).state_dict().items()}
    needed = {s for srcs in wmap.values() for s in srcs}
    missing = sorted(s for s in needed if s not in src)
    unused = sorted(k for k in src.keys() if k not in needed and not k.endswith(IGNORED_SUFFIXES))
    # torch.t: a 2-D tensor the other way round; refuses more dims, so a misshapen source is named
    transforms = {name: torch.t for name in transposed}
    misshapen = misshapen_sources(src, wmap, expected, transforms=transforms)
    if missing or unused or misshapen:
        msg = describe_key_problems(missing, unused, [], where)
        msg += "".join(f"\n  misshapen: {line}" for line in misshapen[:20])
        if len(misshapen) > 20:
            msg += f"\n  ... and {len(misshapen) - 20} more misshapen tensors"
        raise CheckpointError(msg)
    items = list(wmap.items())
    if progress:
        from lmmrt.runtime.progress import progress_bar

        items = progress_bar(items, desc="converting", unit="tensor", say_when_hidden=True)
    out = {}
    finite = FiniteCheck()  # the loader's check, so that a NaN source is refused now, not at load
    for name, srcs in items:
        parts = [src.get(s) for s in srcs]
        t = parts[0] if len(parts) == 1 else torch.cat(parts, dim=0)
        if name in transforms:
            t = transforms[name](t)
        out[name] = t.to(dtype) if dtype is not None else t.contiguous()
        finite.add(" + ".join(srcs), out[name])
    finite.check(where, dtype or out[name].dtype)
    return out


def clip_state(src: str | Path, *, dtype: torch.dtype | None = None, act: str | None = None,
               progress: bool = True) -> tuple[ClipConfig, dict[str, torch.Tensor], Path | None]:
    """Read a transformers CLIPModel directory, or an open_clip state dict file (`act`: its
    activation, default quick_gelu): (lmmrt config, lmmrt state dict, tokenizer.json or None)."""
    src = Path(src)
    if src.is_file():
        from lmmrt.convert.clip_open_clip import open_clip_source

        cfg, weights, wmap, transposed = open_clip_source(src, act=act)
        state = convert_weights(weights, cfg, wmap, transposed=transposed, dtype=dtype, progress=progress,
                                where=str(src))
        return cfg, state, None
    cfg_path = source_config_path(src, "a transformers CLIPModel directory or an open_clip state dict file")
    hf = read_source_json(cfg_path, "a transformers CLIP config (a JSON object)")
    if hf.get("family") == "clip" and "model_type" not in hf:
        raise ValueError(f"{src} is already an lmmrt checkpoint: load it with lmmrt.load, no conversion needed")
    if hf.get("model_type") != "clip":
        raise ValueError(f"{cfg_path}: model_type is {hf.get('model_type')!r}, expected 'clip' (a CLIPModel with "
                         f"both towers; a vision-only CLIP is converted as part of `lmmrt convert openflamingo`)")
    if act is not None:
        raise ValueError("act is for open_clip files, which do not record it; a transformers config has hidden_act")
    pre_path = src / "preprocessor_config.json"
    pre = read_source_json(pre_path, "an image processor config") if pre_path.exists() else None
    cfg = config_from_hf(hf, pre)
    state = convert_weights(SourceWeights.open(src), cfg, weight_map(cfg), dtype=dtype, progress=progress,
                            where=str(src))
    return cfg, state, find_tokenizer_json(src)


def convert_clip(src: str | Path, out_dir: str | Path, *, tokenizer: str | Path | None = None,
                 dtype: torch.dtype | None = None, act: str | None = None, progress: bool = True,
                 force: bool = False) -> Path:
    """Convert a transformers CLIPModel directory or an open_clip state dict file into an lmmrt
    checkpoint at `out_dir` (refused if it exists, unless force; never inside the source).
    `tokenizer`: a tokenizer.json to use (open_clip files have none; a directory's own is used
    otherwise). Without one the model embeds images only."""
    sources = [src] + ([tokenizer] if tokenizer is not None else [])
    check_output_path(out_dir, sources=sources, force=force)
    if tokenizer is not None:
        Tokenizer.from_file(tokenizer)  # a broken file is reported before the conversion
    cfg, state, tok_json = clip_state(src, dtype=dtype, act=act, progress=progress)
    if tokenizer is None and tok_json is None:
        warnings.warn(f"{src} has no tokenizer.json: the model will embed images only. Give a tokenizer.json "
                      f"(--tokenizer) to embed texts too.", stacklevel=2)
    return save_checkpoint(out_dir, cfg, state, tokenizer=tokenizer or tok_json, sources=sources, force=force,
                           metadata={"source": "clip", "source_path": Path(src).name})
