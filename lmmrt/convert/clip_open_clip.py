"""An open_clip CLIP state dict (both towers) -> lmmrt's CLIP config and weight map.

The file is read as lmmrt.convert.clip reads open_clip vision weights (.safetensors, or .bin/.pt
with weights_only=True; a `module.` prefix or a `state_dict` wrapper accepted). The text tower's
names: token_embedding, positional_embedding, transformer.resblocks.{i}.*, ln_final,
text_projection; logit_scale. The architecture comes from the tensor shapes (heads: open_clip's
head width of 64); the activation is not recorded in the file (OpenAI's weights use QuickGELU).
open_clip pools the text at the highest token id (its end-of-text token is the last of the
vocabulary) and crops images with torchvision's rounding: lmmrt's "argmax" pooling and
"resize_crop". The projections are stored (width, embed) and used as x @ proj: transposed here.
"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

from lmmrt.convert.clip import open_vision, vision_config, vision_weight_map
from lmmrt.convert.common import SourceWeights
from lmmrt.errors import CheckpointError
from lmmrt.models.clip_config import ClipConfig, ClipTextConfig

OPEN_CLIP_HEAD_WIDTH = 64


def _text_names(weights: SourceWeights) -> dict[str, str]:
    """Text-tower (and logit_scale) names without a `module.` prefix -> the file's names."""
    names = {(k[len("module."):] if k.startswith("module.") else k): k for k in weights.keys()}
    return {n: k for n, k in names.items() if not n.startswith("visual.")}


def open_clip_source(path: str | Path, *, act: str | None = None
                     ) -> tuple[ClipConfig, SourceWeights, dict[str, list[str]], frozenset]:
    """(config, the file's weights, weight map, names to transpose) for an open_clip state dict."""
    vsrc = open_vision(path)
    if vsrc.kind != "open_clip" or not any(k.startswith(("visual.", "module.visual.")) for k in vsrc.weights.keys()):
        raise CheckpointError(f"{path}: not a whole open_clip CLIP state dict (visual.* and the text tower)")
    text = _text_names(vsrc.weights)
    for need in ("token_embedding.weight", "positional_embedding", "text_projection", "logit_scale"):
        if need not in text:
            raise CheckpointError(f"{path}: no {need}: an open_clip CLIP state dict has the text tower "
                                  f"(token_embedding, positional_embedding, transformer.resblocks.*, ln_final, "
                                  f"text_projection) and logit_scale")

    def shape(name: str) -> tuple:
        return vsrc.weights.shape(text[name])

    vocab, width = shape("token_embedding.weight")
    layers = 1 + max((int(m.group(1)) for n in text if (m := re.match(r"transformer\.resblocks\.(\d+)\.", n))),
                     default=-1)
    if layers == 0:
        raise CheckpointError(f"{path}: no transformer.resblocks.* tensors (the text tower)")
    if width % OPEN_CLIP_HEAD_WIDTH:
        raise CheckpointError(f"{path}: text width {width} is not a multiple of open_clip's head width 64")
    vision = dataclasses.replace(vision_config(vsrc, act), output="all_tokens", resize="resize_crop")
    cfg = ClipConfig(
        vision=vision,
        text=ClipTextConfig(vocab_size=vocab, width=width, layers=layers, heads=width // OPEN_CLIP_HEAD_WIDTH,
                            mlp_dim=shape("transformer.resblocks.0.mlp.c_fc.weight")[0], act=act or "quick_gelu",
                            ln_eps=1e-5, max_positions=shape("positional_embedding")[0], pooling="argmax",
                            eos_token_id=vocab - 1),
        projection_dim=shape("text_projection")[-1])
    m, _, _ = vision_weight_map(vsrc, vision)
    vk = vsrc.keys
    for s in ("weight", "bias"):
        m[f"vision_post_ln.{s}"] = [vk.get(f"ln_post.{s}", f"visual.ln_post.{s}")]
        m[f"text.final_ln.{s}"] = [text.get(f"ln_final.{s}", f"ln_final.{s}")]
    m["visual_proj.weight"] = [vk.get("proj", "visual.proj")]
    for i in range(layers):
        p, o = f"transformer.resblocks.{i}.", f"text.blocks.{i}."
        for s in ("weight", "bias"):
            for dst, src in (("wqkv", "attn.in_proj_"), ("wo", "attn.out_proj."), ("ln1", "ln_1."),
                             ("ln2", "ln_2."), ("fc1", "mlp.c_fc."), ("fc2", "mlp.c_proj.")):
                m[f"{o}{dst}.{s}"] = [text.get(p + src + s, p + src + s)]
    for dst, src in (("text.token_embed.weight", "token_embedding.weight"), ("text.pos_embed", "positional_embedding"),
                     ("text_proj.weight", "text_projection"), ("logit_scale", "logit_scale")):
        m[dst] = [text[src]]
    return cfg, vsrc.weights, m, frozenset({"visual_proj.weight", "text_proj.weight"})
