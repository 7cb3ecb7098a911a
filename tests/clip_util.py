"""Tiny random transformers CLIPModel checkpoints (non-zero everything) with a word-level
tokenizer.json whose post-processor adds BOS and EOS, as CLIP's does, for the CLIP tests."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from random_init import randomize_parameters

WORDS = ["a", "photo", "of", "the", "cat", "dog", "car", "red", "big", "small", ".", "picture", "on", "table",
         "blue", "tiny", "very"]
# ids: <unk> 0, <bos> 1, the words, then <eos> last: the highest id, as in OpenAI's vocabulary
VOCAB = {"<unk>": 0, "<bos>": 1, **{w: i + 2 for i, w in enumerate(WORDS)}}
EOS_ID = len(VOCAB)
VOCAB["<eos>"] = EOS_ID
MAX_POSITIONS = 12


def make_tokenizer():
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors

    tok = Tokenizer(models.WordLevel(VOCAB, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="<bos> $A <eos>",
                                                       special_tokens=[("<bos>", 1), ("<eos>", EOS_ID)])
    return tok


def tiny_clip(seed: int = 0, *, legacy_eos: bool = False, open_clip_shapes: bool = False):
    """A CLIPModel with random weights, norms and logit scale. legacy_eos: eos_token_id = 2 in the
    config (pooled at the highest id, transformers' rule for configs before PR #24773).
    open_clip_shapes: widths of 128 in heads of 64 and QuickGELU, as open_clip's OpenAI models."""
    text_w, vision_w, heads = (128, 128, 2) if open_clip_shapes else (32, 40, 4)
    from transformers import CLIPConfig, CLIPModel

    torch.manual_seed(seed)
    cfg = CLIPConfig(
        text_config=dict(vocab_size=len(VOCAB), hidden_size=text_w, intermediate_size=48, num_hidden_layers=2,
                         num_attention_heads=heads, max_position_embeddings=MAX_POSITIONS,
                         bos_token_id=1, eos_token_id=2 if legacy_eos else EOS_ID, pad_token_id=EOS_ID),
        vision_config=dict(hidden_size=vision_w, intermediate_size=56, num_hidden_layers=2, num_attention_heads=heads,
                           image_size=28, patch_size=7, hidden_act="quick_gelu" if open_clip_shapes else "gelu"),
        projection_dim=24)
    model = CLIPModel(cfg).eval()
    randomize_parameters(model, torch.Generator().manual_seed(seed + 1), special=_fixed_logit_scale)
    return model


def _fixed_logit_scale(name: str, p: torch.nn.Parameter) -> bool:
    if name != "logit_scale":
        return False
    p.fill_(1.7)
    return True


def save_tiny_clip(path: Path, seed: int = 0, *, legacy_eos: bool = False):
    model = tiny_clip(seed, legacy_eos=legacy_eos)
    model.save_pretrained(path)
    make_tokenizer().save(str(Path(path) / "tokenizer.json"))
    return model


def sample_images(seed: int = 0) -> list[np.ndarray]:
    """Non-square uint8 images with smooth structure plus noise (like photos, not flat)."""
    rng = np.random.default_rng(seed)
    out = []
    for h, w in ((37, 53), (61, 29), (28, 28), (45, 90)):
        y, x = np.mgrid[0:h, 0:w]
        base = np.stack([np.sin(x / 5.0 + c) * np.cos(y / 7.0 - c) for c in range(3)], axis=-1)
        img = 127 + 90 * base + rng.normal(0, 20, (h, w, 3))
        out.append(np.clip(img, 0, 255).astype(np.uint8))
    return out


def open_clip_state_dict(model) -> dict:
    """A transformers CLIPModel's weights under open_clip's names and layouts (q/k/v stacked as
    in_proj, projections stored (width, embed)), as open_clip's own conversion maps them."""
    sd = model.state_dict()
    out = {}

    def blocks(src: str, dst: str, layers: int):
        for i in range(layers):
            p, o = f"{src}encoder.layers.{i}.", f"{dst}transformer.resblocks.{i}."
            for s in ("weight", "bias"):
                out[o + f"attn.in_proj_{s}"] = torch.cat([sd[p + f"self_attn.{x}_proj.{s}"] for x in "qkv"])
                out[o + f"attn.out_proj.{s}"] = sd[p + f"self_attn.out_proj.{s}"]
                out[o + f"ln_1.{s}"] = sd[p + f"layer_norm1.{s}"]
                out[o + f"ln_2.{s}"] = sd[p + f"layer_norm2.{s}"]
                out[o + f"mlp.c_fc.{s}"] = sd[p + f"mlp.fc1.{s}"]
                out[o + f"mlp.c_proj.{s}"] = sd[p + f"mlp.fc2.{s}"]

    v, t = "vision_model.", "text_model."
    out["visual.conv1.weight"] = sd[v + "embeddings.patch_embedding.weight"]
    out["visual.class_embedding"] = sd[v + "embeddings.class_embedding"]
    out["visual.positional_embedding"] = sd[v + "embeddings.position_embedding.weight"]
    blocks(v, "visual.", model.config.vision_config.num_hidden_layers)
    blocks(t, "", model.config.text_config.num_hidden_layers)
    for s in ("weight", "bias"):
        out[f"visual.ln_pre.{s}"] = sd[v + f"pre_layrnorm.{s}"]
        out[f"visual.ln_post.{s}"] = sd[v + f"post_layernorm.{s}"]
        out[f"ln_final.{s}"] = sd[t + f"final_layer_norm.{s}"]
    out["visual.proj"] = sd["visual_projection.weight"].T.contiguous()
    out["text_projection"] = sd["text_projection.weight"].T.contiguous()
    out["token_embedding.weight"] = sd[t + "embeddings.token_embedding.weight"]
    out["positional_embedding"] = sd[t + "embeddings.position_embedding.weight"]
    out["logit_scale"] = sd["logit_scale"]
    return out
