"""transformers MllamaForConditionalGeneration directory (Llama 3.2 Vision) -> lmmrt checkpoint
(`lmmrt convert mllama`): the files. The config and weight mapping themselves are
lmmrt.convert.mllama's.

Read: config.json (model_type "mllama"), the safetensors weights (one file, or sharded through
model.safetensors.index.json; the hub's own spelling "language_model.model.*" and transformers >=
4.52's "model.language_model.*" both work), tokenizer.json, whose <|image|> token must be the
config's image_token_index, the chat template (chat_template.jinja, chat_template.json, or
tokenizer_config.json's), which is kept, and preprocessor_config.json's image mean and std. Each
source tensor is read once, when the mapping asks for it; before any is read, one CheckpointError
names every missing, misshapen or unused source tensor (a layout this converter does not know would
otherwise lose weights silently).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Mapping
from pathlib import Path

import torch

from lmmrt.convert.common import (
    SourceWeights,
    find_tokenizer_json,
    read_hf_source_config,
    read_source_json,
    warn_no_tokenizer,
)
from lmmrt.convert.llava import _chat_template as chat_template
from lmmrt.convert.mllama import check_mllama_source, mllama_config_from_hf, mllama_state_from_hf
from lmmrt.errors import CheckpointError
from lmmrt.models.config import ModelConfig
from lmmrt.models.splice import build_model
from lmmrt.runtime.checkpoint_writer import check_output_path, save_checkpoint
from lmmrt.runtime.safetensors_file import check_readable
from lmmrt.runtime.weights import CHAT_TEMPLATE, FiniteCheck, check_state

IMAGE_TOKEN = "<|image|>"


class SourceTensors(Mapping):
    """The source checkpoint's tensors by name, each read from its file when asked for. A name that is
    not there is a CheckpointError naming it and the directory."""

    def __init__(self, weights: SourceWeights, src: Path, progress: bool):
        self._weights, self._src = weights, src
        self._read: set[str] = set()
        self._bar = None
        if progress:
            from lmmrt.runtime.progress import progress_bar

            self._bar = progress_bar(total=len(weights.keys()), desc="converting", unit="tensor", say_when_hidden=True)

    def __getitem__(self, name: str) -> torch.Tensor:
        if name not in self._weights:
            raise CheckpointError(f"{self._src}: the source checkpoint has no tensor {name!r}, which the "
                                  f"Llama 3.2 Vision layout needs (is the checkpoint complete?)")
        if name not in self._read and self._bar is not None:
            self._bar.update()
        self._read.add(name)
        return self._weights.get(name)

    def get(self, name, default=None):
        return self[name] if name in self._weights else default

    def __contains__(self, name) -> bool:
        return name in self._weights

    def __iter__(self) -> Iterator[str]:
        return iter(self._weights.keys())

    def __len__(self) -> int:
        return len(self._weights.keys())

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()


def _tokenizer(src: Path, cfg: ModelConfig):
    """The source's tokenizers.Tokenizer (None without tokenizer.json, with a warning): its <|image|>
    must be the config's image_token_index, or text prompts would hold no image."""
    path = find_tokenizer_json(src)
    if path is None:
        warn_no_tokenizer(src, IMAGE_TOKEN, cfg.image_token_id)
        return None
    from tokenizers import Tokenizer as HFTokenizer

    check_readable(path)
    try:
        tok = HFTokenizer.from_file(str(path))
    except Exception as e:  # tokenizers raises a bare Exception naming no file
        raise CheckpointError(f"{path} is not a valid tokenizer.json: {e}") from None
    tid = tok.token_to_id(IMAGE_TOKEN)
    if tid is None:
        raise CheckpointError(f"{path} has no {IMAGE_TOKEN} token: not a Llama 3.2 Vision tokenizer")
    if tid != cfg.image_token_id:
        raise CheckpointError(f"{path} maps {IMAGE_TOKEN} to {tid}, but {src / 'config.json'} has "
                              f"image_token_index {cfg.image_token_id}")
    return tok


def _with_preprocessor(cfg: ModelConfig, src: Path) -> ModelConfig:
    """The image processor's normalization from preprocessor_config.json (when the source has one); its
    tile size and count must be the vision tower's, or images would be cut for another model."""
    path = src / "preprocessor_config.json"
    if not path.exists():
        return cfg
    pre, v = read_source_json(path), cfg.vision
    size = pre.get("size") or {}
    wrong = [f"{key} {got!r}, but config.json's vision_config has {want!r}" for key, got, want in (
        ("size", [size.get("height", v.image_size), size.get("width", v.image_size)], [v.image_size] * 2),
        ("max_image_tiles", pre.get("max_image_tiles", v.max_num_tiles), v.max_num_tiles)) if got != want]
    if wrong:
        raise CheckpointError(f"{path}: {'; '.join(wrong)}")
    vision = dataclasses.replace(v, image_mean=tuple(pre.get("image_mean", v.image_mean)),
                                 image_std=tuple(pre.get("image_std", v.image_std)))
    return dataclasses.replace(cfg, vision=vision)


def mllama_source(src_dir: str | Path, *, dtype: torch.dtype | None = None, progress: bool = True):
    """Read a Llama 3.2 Vision directory: (lmmrt config, lmmrt state dict, tokenizer or None, chat
    template or None). Tensors keep the source dtype unless `dtype`."""
    src = Path(src_dir)
    hf = read_hf_source_config(src, architecture="MllamaForConditionalGeneration", model="Llama 3.2 Vision",
                               model_type="mllama", expected_note=" (MllamaForConditionalGeneration)")
    cfg = _with_preprocessor(mllama_config_from_hf(hf), src)
    tok = _tokenizer(src, cfg)
    weights = SourceWeights.open(src)
    check_mllama_source(weights, cfg)  # every missing, unused or misshapen tensor, before any is read
    tensors = SourceTensors(weights, src, progress)
    try:
        state = mllama_state_from_hf(tensors)
    finally:
        tensors.close()
    with torch.device("meta"):
        check_state({k: tuple(v.shape) for k, v in state.items()}, build_model(cfg), "the converted state")
    finite = FiniteCheck()  # the loader's check: a NaN source is refused now, not at load
    for name, t in state.items():
        state[name] = t.to(dtype) if dtype is not None and t.is_floating_point() else t.contiguous()
        finite.add(name, state[name])
    finite.check("the source checkpoint", dtype or next(iter(state.values())).dtype)
    return cfg, state, tok, chat_template(src)


def convert_mllama(src_dir: str | Path, out_dir: str | Path, *, dtype: torch.dtype | None = None,
                   progress: bool = True, force: bool = False) -> Path:
    """Convert a transformers Llama 3.2 Vision directory into an lmmrt checkpoint at `out_dir`
    (refused if it exists, unless force; never inside the source)."""
    check_output_path(out_dir, sources=[src_dir], force=force)
    cfg, state, tok, template = mllama_source(src_dir, dtype=dtype, progress=progress)
    extra = {CHAT_TEMPLATE: template} if template is not None else {}
    return save_checkpoint(out_dir, cfg, state, tokenizer=tok, sources=[src_dir], force=force, extra_files=extra,
                           metadata={"source": "mllama", "source_dir": Path(src_dir).name})
