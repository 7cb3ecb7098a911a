"""Tiny random transformers CLIPModel checkpoints (non-zero everything) with a word-level
tokenizer.json whose post-processor adds BOS and EOS, as CLIP's does, for the CLIP tests."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

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


def tiny_clip(seed: int = 0, *, legacy_eos: bool = False):
    """A CLIPModel with random weights, norms and logit scale. legacy_eos: eos_token_id = 2 in the
    config (pooled at the highest id, transformers' rule for configs before PR #24773)."""
    from transformers import CLIPConfig, CLIPModel

    torch.manual_seed(seed)
    cfg = CLIPConfig(
        text_config=dict(vocab_size=len(VOCAB), hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                         num_attention_heads=4, max_position_embeddings=MAX_POSITIONS,
                         bos_token_id=1, eos_token_id=2 if legacy_eos else EOS_ID, pad_token_id=EOS_ID),
        vision_config=dict(hidden_size=40, intermediate_size=56, num_hidden_layers=2, num_attention_heads=4,
                           image_size=28, patch_size=7, hidden_act="gelu"),
        projection_dim=24)
    model = CLIPModel(cfg).eval()
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name == "logit_scale":
                p.fill_(1.7)
            elif name.endswith("weight") and p.dim() == 1:
                p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=g))
            elif name.endswith("bias"):
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(0.2 * torch.randn(p.shape, generator=g))
    return model


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
