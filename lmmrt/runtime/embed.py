"""CLIP checkpoints at run time: loading, image and text embeddings, zero-shot classification.

`lmmrt.load` hands a checkpoint whose config.json says "family": "clip" to load_clip, which
returns a ClipRuntime (not an lmmrt.Model: a CLIP checkpoint has no language model, so it cannot
generate). Texts are tokenized with the checkpoint's tokenizer.json, its own post-processor adding
the start and end tokens; a text longer than the model's positions is cut as CLIP's tokenizer
does with truncation=True (the end-of-text token kept last). Images go through the same
preprocessing as generate's (CLIP: shortest side resized, centre crop, the checkpoint's mean/std).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from lmmrt.errors import CheckpointError
from lmmrt.models.clip import ClipModel
from lmmrt.models.clip_config import CLIP_FAMILY, ClipConfig
from lmmrt.runtime.json_file import read_json
from lmmrt.runtime.processor import preprocess_images
from lmmrt.runtime.safetensors_file import SafetensorsFile
from lmmrt.runtime.tokenizer import Tokenizer
from lmmrt.runtime.weights import CONFIG, TOKENIZER, WEIGHTS, FiniteCheck, check_state

DEFAULT_TEMPLATE = "a photo of a {}."


class ClipRuntime:
    """A loaded CLIP checkpoint: the torch module, its config, tokenizer (None: images only), device, dtype."""

    def __init__(self, module: ClipModel, config: ClipConfig, tokenizer: Tokenizer | None, path: str | None = None):
        self.module = module.eval().requires_grad_(False)
        self.config = config
        self.tokenizer = tokenizer
        self.path = path

    @property
    def device(self) -> torch.device:
        return self.module.device

    @property
    def dtype(self) -> torch.dtype:
        return self.module.dtype

    def generate(self, *args, **kw):
        raise_not_generative(self)

    def logits(self, *args, **kw):
        raise_not_generative(self)

    def __repr__(self):
        v, t = self.config.vision, self.config.text
        return (f"lmmrt.ClipRuntime(vision {v.layers}x{v.width}, text {t.layers}x{t.width}, "
                f"embedding {self.config.projection_dim}, device={self.device}, dtype={self.dtype})")


def raise_not_generative(model) -> None:
    raise TypeError(not_generative(getattr(model, "path", None)))


def not_generative(path) -> str:
    """What generating from the CLIP checkpoint at `path` (None: unknown) is refused with."""
    return (f"{path or 'this model'} is a CLIP checkpoint (image and text embeddings, no language model): it "
            "cannot generate text; use lmmrt.embed, lmmrt.zero_shot or `lmmrt classify`")


def is_clip_checkpoint(path) -> bool:
    """Whether `path` holds an lmmrt config.json with "family": "clip". Anything unreadable is False:
    the regular loader then reports what is wrong with it."""
    try:
        d = json.loads((Path(path) / CONFIG).read_text())
    except (OSError, ValueError):
        return False
    return isinstance(d, dict) and d.get("family") == CLIP_FAMILY


def load_clip(path, *, device: torch.device, dtype: torch.dtype | None = None, progress: bool = False) -> ClipRuntime:
    """An lmmrt CLIP checkpoint directory (from `lmmrt convert clip`), every tensor checked against
    the model that config.json describes."""
    path = Path(path)
    tok_path = path / TOKENIZER
    tok = Tokenizer.from_file(tok_path) if tok_path.exists() or tok_path.is_symlink() else None
    try:
        cfg_json = read_json(path / CONFIG)
    except OSError as e:
        raise CheckpointError(f"cannot read {path / CONFIG}: {e.strerror or e}") from None
    cfg = ClipConfig.from_dict(cfg_json, where=str(path / CONFIG))
    weights = SafetensorsFile(path / WEIGHTS)
    weights.check_float()
    with torch.device("meta"):
        module = ClipModel(cfg)
    check_state(weights.shapes(), module, str(path / WEIGHTS))
    dtype = dtype or weights.load_dtype()
    keys = weights.keys()
    if progress:
        from lmmrt.runtime.progress import progress_bar

        keys = progress_bar(keys, desc=f"loading {path.name}", unit="tensor")
    finite = FiniteCheck()
    with open(path / WEIGHTS, "rb", buffering=0) as fh:
        state = {k: weights.read(fh, k, device=device, dtype=dtype) for k in keys}
    for k, t in state.items():
        finite.add(k, t)
    finite.check(path / WEIGHTS, dtype)
    module.load_state_dict(state, assign=True)
    return ClipRuntime(module, cfg, tok, path=str(path))


@dataclass
class Embeddings:
    """L2-normalized embeddings, float32 on the CPU: `image` (n_images, dim) and `text` (n_texts,
    dim), each None when not asked for. Dot products between them are cosine similarities."""

    image: torch.Tensor | None
    text: torch.Tensor | None


def _check_clip(model) -> ClipRuntime:
    if not isinstance(model, ClipRuntime):
        raise TypeError(f"expected a CLIP model loaded with lmmrt.load (got {type(model).__name__}); "
                        "embeddings and zero-shot classification need a checkpoint made by `lmmrt convert clip`")
    return model


def _check_batch_size(batch_size) -> int:
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be an integer >= 1, got {batch_size!r}")
    return batch_size


def tokenize(model: ClipRuntime, texts: list[str]) -> torch.Tensor:
    """(N, L) token ids, each row right-padded with its own last token, the end-of-text token the
    post-processor put there, as CLIP's tokenizer pads (not the config's eos_token_id: a config from
    before transformers PR #24773 says 2); texts longer than max_positions are cut, keeping that token."""
    if model.tokenizer is None:
        raise ValueError(f"{model.path or 'this CLIP checkpoint'} has no tokenizer.json, so it embeds images only; "
                         "copy the model's tokenizer.json into the checkpoint directory")
    t = model.config.text
    rows = []
    for i, s in enumerate(texts):
        if not isinstance(s, str):
            raise TypeError(f"texts[{i}] is a {type(s).__name__}, expected a string")
        ids = model.tokenizer.encode(s)
        if not ids:
            raise ValueError(f"texts[{i}] = {s!r} gives no tokens")
        if len(ids) > t.max_positions:
            ids = ids[:t.max_positions - 1] + ids[-1:]
        rows.append(ids)
    width = max(len(r) for r in rows)
    out = torch.tensor([r + r[-1:] * (width - len(r)) for r in rows], dtype=torch.long)
    bad = out[(out < 0) | (out >= t.vocab_size)]
    if bad.numel():
        raise CheckpointError(f"the tokenizer gives token id {int(bad[0])}, outside the model's vocabulary of "
                              f"{t.vocab_size}: tokenizer.json does not belong to this checkpoint")
    return out


def _as_list(items, name: str) -> list:
    if not isinstance(items, (list, tuple)):
        raise TypeError(f"{name} must be a list (got {type(items).__name__}); pass one item as [item]")
    if not items:
        raise ValueError(f"{name} is empty")
    return list(items)


@torch.inference_mode()
def _image_embeddings(model: ClipRuntime, images: list, batch_size: int) -> torch.Tensor:
    m = model.module
    out = []
    for start in range(0, len(images), batch_size):
        chunk = images[start:start + batch_size]
        pixels = preprocess_images(chunk, model.config.vision, device=m.device, where="images")
        out.append(m.image_features(pixels.to(m.dtype)).float())
    return torch.nn.functional.normalize(torch.cat(out), dim=-1).cpu()


@torch.inference_mode()
def _text_embeddings(model: ClipRuntime, texts: list[str], batch_size: int) -> torch.Tensor:
    m = model.module
    out = []
    for start in range(0, len(texts), batch_size):
        ids = tokenize(model, texts[start:start + batch_size]).to(m.device)
        out.append(m.text_features(ids).float())
    return torch.nn.functional.normalize(torch.cat(out), dim=-1).cpu()


def embed(model: ClipRuntime, images=None, texts=None, *, batch_size: int = 64) -> Embeddings:
    """L2-normalized CLIP embeddings of a list of images and/or a list of texts (at least one).

    images: as for generate (PIL images, uint8 (H, W, 3) arrays or tensors, normalized float
    (3, H, W) tensors); texts: strings. They run `batch_size` at a time. Returns an Embeddings with
    .image and .text (float32, CPU; None for what was not given)."""
    model = _check_clip(model)
    batch_size = _check_batch_size(batch_size)
    if images is None and texts is None:
        raise ValueError("embed needs images=, texts= or both")
    if isinstance(texts, str):
        raise TypeError("texts must be a list of strings; pass one text as [text]")
    image_emb = None if images is None else _image_embeddings(model, _as_list(images, "images"), batch_size)
    text_emb = None if texts is None else _text_embeddings(model, _as_list(texts, "texts"), batch_size)
    return Embeddings(image=image_emb, text=text_emb)


def label_prompts(labels, template: str) -> list[str]:
    """The texts zero_shot compares images with: `template` with "{}" replaced by each label."""
    if isinstance(labels, str):
        raise TypeError(f"labels must be a list of strings, not one string ({labels!r}); e.g. ['cat', 'dog']")
    labels = _as_list(labels, "labels")
    for i, lab in enumerate(labels):
        if not isinstance(lab, str):
            raise TypeError(f"labels[{i}] is a {type(lab).__name__}, expected a string")
        if not lab.strip():
            raise ValueError(f"labels[{i}] is empty")
    dup = sorted({lab for lab in labels if labels.count(lab) > 1})
    if dup:
        raise ValueError(f"labels repeat {dup}: each label must be given once")
    if not isinstance(template, str) or template.count("{}") != 1:
        raise ValueError(f"template {template!r} must contain {{}} exactly once, where the label goes "
                         f"(e.g. {DEFAULT_TEMPLATE!r})")
    return [template.replace("{}", lab) for lab in labels]


def zero_shot(model: ClipRuntime, images, labels, template: str = DEFAULT_TEMPLATE, *,
              batch_size: int = 64) -> torch.Tensor:
    """Zero-shot classification: an (n_images, n_labels) float32 tensor of probabilities (each row
    sums to 1), softmax over labels of exp(logit_scale) * cosine(image, template.format(label)),
    with the checkpoint's logit scale, as CLIPModel's logits_per_image."""
    model = _check_clip(model)
    prompts = label_prompts(labels, template)
    e = embed(model, images=images, texts=prompts, batch_size=batch_size)
    scale = model.module.logit_scale.detach().float().exp().cpu()
    return torch.softmax(scale * e.image @ e.text.T, dim=-1)
