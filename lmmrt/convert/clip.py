"""CLIP ViT weights for OpenFlamingo's vision encoder -> lmmrt `vision.*` tensors.

Two sources:
- an open_clip state dict file (.safetensors, or .bin/.pt read with weights_only=True), keys
  `visual.{conv1, class_embedding, positional_embedding, ln_pre, transformer.resblocks.{i}.*,
  ln_post, proj}` (the `visual.` prefix may be absent; a `vision_encoder.` prefix, as in a whole
  OpenFlamingo state dict, is accepted too; text-tower keys are ignored);
- a transformers CLIPVisionModel / CLIPModel directory (keys `vision_model.*` or bare).
The architecture is read from the tensor shapes (open_clip) or config.json (transformers).
OpenFlamingo feeds the perceiver the patch tokens with no ln_post: ln_post and proj are accepted
and not used.
"""

from __future__ import annotations

import re
from pathlib import Path

from lmmrt.convert.common import SourceWeights, clip_vision_map, read_source_json, torch_load_weights_only
from lmmrt.models.config import VisionConfig
from lmmrt.runtime.safetensors_file import why_missing
from lmmrt.runtime.weights import CheckpointError, describe_key_problems

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


class VisionSource:
    """The vision weights with a uniform naming: `kind` "open_clip" (names after `visual.`) or
    "hf" (names after `vision_model.`); `keys` maps those names to the file's names."""

    def __init__(self, weights: SourceWeights, kind: str, keys: dict[str, str], hf_config: dict | None, path: Path):
        self.weights, self.kind, self.keys, self.hf_config, self.path = weights, kind, keys, hf_config, path

    def shape(self, name: str) -> tuple:
        return self.weights.shape(self.keys[name])


def _open_file(path: Path) -> SourceWeights:
    w = SourceWeights()
    if path.suffix == ".safetensors":
        w.add_safetensors(path)
    else:
        d = torch_load_weights_only(path)
        if isinstance(d, dict) and isinstance(d.get("state_dict"), dict):
            d = d["state_dict"]
        w.add_dict(d, path)
    return w


def open_vision(path: str | Path) -> VisionSource:
    path = Path(path)
    reason = why_missing(path)
    if reason is not None:
        raise FileNotFoundError(f"no vision weights: {reason}")
    if path.is_dir():
        cfg_path = path / "config.json"
        if not cfg_path.exists():
            raise FileNotFoundError(f"no config.json in {path} (expected a transformers CLIPVisionModel directory)")
        hf = read_source_json(cfg_path, "a transformers CLIP config (a JSON object)")
        hf = hf.get("vision_config") or hf
        w = SourceWeights.open(path)
        keys = {}
        for k in w.keys():
            if k.startswith("vision_model."):
                keys[k[len("vision_model."):]] = k
            elif k.startswith(("embeddings.", "encoder.", "pre_layrnorm.", "post_layernorm.")):
                keys[k] = k
        if not keys:
            raise CheckpointError(f"{path}: no CLIP vision tensors (vision_model.*) found")
        return VisionSource(w, "hf", keys, hf, path)
    w = _open_file(path)
    names = {(k[len("module."):] if k.startswith("module.") else k): k for k in w.keys()}
    # a whole open_clip model has its text tower at the top level: take only the visual.* names then
    prefix = next((p for p in ("visual.", "vision_encoder.") if any(n.startswith(p) for n in names)), "")
    keys = {n[len(prefix):]: k for n, k in names.items() if n.startswith(prefix)}
    if "conv1.weight" not in keys:
        raise CheckpointError(f"{path}: not an open_clip vision state dict (no visual.conv1.weight); "
                              f"first keys: {sorted(w.keys())[:8]}")
    return VisionSource(w, "open_clip", keys, None, path)


def vision_config(src: VisionSource, act: str | None = None) -> VisionConfig:
    """OpenFlamingo's vision config: patch tokens out, CLIP resize + centre crop, CLIP mean/std.
    act: open_clip files do not record the activation (OpenAI weights use QuickGELU): default
    quick_gelu; a transformers config's hidden_act wins unless `act` is given."""
    if src.kind == "hf":
        hf = src.hf_config
        return VisionConfig(
            image_size=hf.get("image_size", 224), patch_size=hf.get("patch_size", 32), width=hf.get("hidden_size", 768),
            layers=hf.get("num_hidden_layers", 12), heads=hf.get("num_attention_heads", 12),
            mlp_dim=hf.get("intermediate_size", 3072), act=act or hf.get("hidden_act", "quick_gelu"),
            ln_eps=hf.get("layer_norm_eps", 1e-5), output="patch_tokens", resize="resize_crop",
            image_mean=CLIP_MEAN, image_std=CLIP_STD)
    width, _, patch, _ = src.shape("conv1.weight")
    n_pos = src.shape("positional_embedding")[0]
    grid = int(round((n_pos - 1) ** 0.5))
    if grid * grid + 1 != n_pos:
        raise CheckpointError(f"{src.path}: positional_embedding has {n_pos} rows, not 1 + a square grid")
    layers = 1 + max((int(m.group(1)) for k in src.keys
                      if (m := re.match(r"transformer\.resblocks\.(\d+)\.", k))), default=-1)
    if layers == 0:
        raise CheckpointError(f"{src.path}: no transformer.resblocks.* tensors")
    if width % 64:
        raise CheckpointError(f"{src.path}: width {width} is not a multiple of open_clip's head width 64")
    return VisionConfig(
        image_size=grid * patch, patch_size=patch, width=width, layers=layers, heads=width // 64,
        mlp_dim=src.shape("transformer.resblocks.0.mlp.c_fc.weight")[0], act=act or "quick_gelu", ln_eps=1e-5,
        output="patch_tokens", resize="resize_crop", image_mean=CLIP_MEAN, image_std=CLIP_STD)


def vision_weight_map(src: VisionSource, cfg: VisionConfig) -> tuple[dict[str, list[str]], dict, list[str]]:
    """(lmmrt name -> [file names], transforms, file names deliberately not used)."""
    k = src.keys
    m: dict[str, list[str]] = {}
    tf = {}
    missing: list[str] = []

    def need(name):  # every missing tensor is collected, then named in one error
        if name not in k:
            missing.append(name)
        return k.get(name, name)

    if src.kind == "open_clip":
        m["vision.patch_embed.weight"] = [need("conv1.weight")]
        m["vision.class_embed"] = [need("class_embedding")]
        m["vision.pos_embed"] = [need("positional_embedding")]
        for s in ("weight", "bias"):
            m[f"vision.ln_pre.{s}"] = [need(f"ln_pre.{s}")]
        for i in range(cfg.layers):
            p, o = f"transformer.resblocks.{i}.", f"vision.blocks.{i}."
            for s in ("weight", "bias"):
                m[o + f"wqkv.{s}"] = [need(p + f"attn.in_proj_{s}")]  # q, k, v stacked: lmmrt's layout
                m[o + f"wo.{s}"] = [need(p + f"attn.out_proj.{s}")]
                m[o + f"ln1.{s}"] = [need(p + f"ln_1.{s}")]
                m[o + f"ln2.{s}"] = [need(p + f"ln_2.{s}")]
                m[o + f"fc1.{s}"] = [need(p + f"mlp.c_fc.{s}")]
                m[o + f"fc2.{s}"] = [need(p + f"mlp.c_proj.{s}")]
        unused = [v for n, v in k.items() if n.startswith(("ln_post.", "proj"))]
    else:
        for dst, srcs in clip_vision_map("", cfg.layers).items():
            m[dst] = [need(name) for name in srcs]
        unused = [v for n, v in k.items() if n.startswith(("post_layernorm.", "embeddings.position_ids"))]
    used = {s for srcs in m.values() for s in srcs}
    # every file key that is neither vision (mapped or ignored) is another tower's: not ours to check
    extra = [v for v in k.values() if v not in used and v not in unused]
    if missing or extra:
        raise CheckpointError(describe_key_problems(missing, extra, [], f"{src.path} (a {cfg.layers}-layer ViT)"))
    ignored = [name for name in src.weights.keys() if name not in used]
    return m, tf, ignored
