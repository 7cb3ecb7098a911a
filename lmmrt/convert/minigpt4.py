"""MiniGPT-4 (v1: BLIP-2's ViT and Q-Former, a linear layer, Vicuna/LLaMA) -> lmmrt checkpoint.

Three inputs, as MiniGPT-4 itself assembles them:
- a transformers BLIP-2 directory for the ViT (with its post-LayerNorm, MiniGPT-4's ln_vision) and
  the Q-Former with its query tokens; its language model and language_projection are not used
  (MiniGPT-4 took its Q-Former from a Flan-T5 BLIP-2, so any BLIP-2 LM is accepted here);
- MiniGPT-4's own checkpoint (.pth, read with weights_only=True): `llama_proj.{weight,bias}`, under
  the `model` key as MiniGPT-4 saves it; a full state dict is accepted and only llama_proj is read;
- the LLaMA/Vicuna directory (transformers LlamaForCausalLM) with its tokenizer.json.
Prompts write each image as "<ImageHere>" and are tokenized in pieces around it, BOS on the first
piece only (lmmrt.runtime.splice_prompts). The marker needs no embedding row of its own (its
positions take the image features): it is the tokenizer's unknown token, which LLaMA's byte-fallback
tokenizer never produces from text, and token-id prompts carry that id once per image.
"""

from __future__ import annotations

from pathlib import Path

import torch

from lmmrt.convert.blip2 import (
    blip2_vision_config,
    preprocessing,
    qformer_config,
    qformer_map,
    qformer_text_branch,
    read_blip2_config,
    vision_map,
    vision_qformer_reshapes,
)
from lmmrt.convert.common import (
    SourceWeights,
    convert_state,
    find_tokenizer_json,
    torch_load_weights_only,
    warn_no_tokenizer,
)
from lmmrt.convert.hf_lm import lm_spec, read_hf_config
from lmmrt.convert.llava import CHAT_TEMPLATE
from lmmrt.convert.llava import _chat_template as chat_template
from lmmrt.models.config import ModelConfig, XAttnConfig
from lmmrt.runtime.checkpoint_writer import check_output_path, save_checkpoint
from lmmrt.runtime.weights import CheckpointError

IMAGE_TOKEN = "<ImageHere>"
PROJ_KEYS = ("llama_proj.weight", "llama_proj.bias")


class _Sources:
    """One namespace over the inputs for convert_state: `<part>:<source name>`."""

    def __init__(self, parts: dict[str, SourceWeights]):
        self.parts = parts

    def keys(self):
        return [f"{ns}:{k}" for ns, src in self.parts.items() for k in src.keys()]

    def _part(self, k):
        ns, _, name = k.partition(":")
        return self.parts.get(ns), name

    def __contains__(self, k):
        src, name = self._part(k)
        return src is not None and name in src

    def get(self, k) -> torch.Tensor:
        src, name = self._part(k)
        return src.get(name)

    def shape(self, k) -> tuple:
        src, name = self._part(k)
        return src.shape(name)


def read_llama_proj(path) -> dict[str, torch.Tensor]:
    """llama_proj.{weight,bias} from MiniGPT-4's checkpoint: {"model": state dict} (or the state
    dict itself), keys maybe prefixed `module.`; every other tensor is left unread."""
    path = Path(path)
    ckpt = torch_load_weights_only(path)
    sd = ckpt.get("model", ckpt) if isinstance(ckpt, dict) else ckpt
    if not isinstance(sd, dict):
        raise CheckpointError(f"{path} holds {type(sd).__name__}, not a MiniGPT-4 state dict")
    sd = {(k[len("module."):] if isinstance(k, str) and k.startswith("module.") else k): v for k, v in sd.items()}
    missing = [k for k in PROJ_KEYS if not isinstance(sd.get(k), torch.Tensor)]
    if missing:
        keys = sorted(str(k) for k in sd)[:8]
        raise CheckpointError(f"{path}: no {', '.join(missing)} (MiniGPT-4's linear layer into the LM); "
                              f"first keys: {keys}")
    return {k: sd[k] for k in PROJ_KEYS}


def _marker_id(tok_path: Path | None, unk_id: int | None, vocab: int) -> int:
    if tok_path is not None:
        from lmmrt.runtime.tokenizer import Tokenizer

        tok = Tokenizer.from_file(tok_path)
        own = tok.token_to_id(IMAGE_TOKEN)
        unk = tok.token_to_id("<unk>")
        tid = own if own is not None else unk
    else:
        tid = unk_id
    if tid is None or not 0 <= tid < vocab:
        raise CheckpointError(f"no id for the image marker {IMAGE_TOKEN}: the LM's tokenizer has neither it nor "
                              f"<unk> inside the vocabulary of {vocab}")
    return tid


def minigpt4_state(blip2_dir, checkpoint, lm_dir, *, dtype: torch.dtype | None = None, progress: bool = True
                   ) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    """(lmmrt config, lmmrt state dict) of MiniGPT-4 from its three inputs."""
    blip2_dir, lm_dir = Path(blip2_dir), Path(lm_dir)
    hf = read_blip2_config(blip2_dir, any_lm=True)
    lm_hf = read_hf_config(lm_dir)
    if lm_hf.get("model_type") != "llama":
        raise ValueError(f"{lm_dir}: model_type {lm_hf.get('model_type')!r}; MiniGPT-4's LM is LLaMA/Vicuna "
                         f"(model_type 'llama')")
    lm = SourceWeights.open(lm_dir)
    spec = lm_spec(lm_hf, str(lm_dir / "config.json"), shape=lm.shape_or_none)
    _, mean, std = preprocessing(blip2_dir)
    vision = blip2_vision_config(hf.get("vision_config") or {}, mean, std)
    connector = qformer_config(hf.get("qformer_config") or {}, queries=hf.get("num_query_tokens", 32),
                               vision_width=vision.width, out_dim=spec.cfg.dim)
    proj = read_llama_proj(checkpoint)
    tok_json = find_tokenizer_json(lm_dir)
    image_id = _marker_id(tok_json, lm_hf.get("unk_token_id", 0), spec.cfg.vocab_size)
    if tok_json is None:
        warn_no_tokenizer(lm_dir, IMAGE_TOKEN, image_id)
    # left padding must not read as image positions: LLaMA configs often pad with <unk> (0)
    pad_id = spec.pad_token_id if spec.pad_token_id not in (None, image_id) else spec.eos_token_id
    cfg = ModelConfig(
        vision=vision, perceiver=None, decoder=spec.cfg, xattn=XAttnConfig(layers=[]), family="minigpt4",
        media_feed="splice", connector=connector, image_token_id=image_id, bos_token_id=spec.bos_token_id,
        eos_token_id=spec.eos_token_id, pad_token_id=pad_id,
        reset_media_after_eos=False, image_token=IMAGE_TOKEN)

    blip2 = SourceWeights.open(blip2_dir)
    vmap, tf, zeros = vision_map("vision_model.", vision, blip2)
    qmap = qformer_map("qformer.", "query_tokens", connector)
    wmap = {k: [f"blip2:{s}" for s in v] for k, v in {**vmap, **qmap}.items()}
    wmap.update({k: [f"zeros:{k}"] for k in zeros})
    wmap["connector.proj.weight"] = ["checkpoint:llama_proj.weight"]
    wmap["connector.proj.bias"] = ["checkpoint:llama_proj.bias"]
    wmap.update({k: [f"lm:{s}" for s in v] for k, v in spec.wmap.items()})
    if not spec.cfg.tie_embeddings:
        wmap["decoder.lm_head.weight"] = [f"lm:{spec.head_key}"]
    sources = _Sources({
        "blip2": blip2, "lm": lm, "checkpoint": SourceWeights.from_state_dict(proj, str(checkpoint)),
        "zeros": SourceWeights.from_state_dict({k: torch.zeros(s) for k, s in zeros.items()}, "<zeros>")})
    ignored = [f"blip2:{p}" for p in qformer_text_branch("qformer.", connector)]
    ignored += ["blip2:language_model.", "blip2:language_projection."]
    ignored += ["lm:lm_head.weight"] if spec.cfg.tie_embeddings else []
    state = convert_state(sources, wmap, cfg, ignored_prefixes=ignored, dtype=dtype, progress=progress,
                          transforms=tf, reshape=vision_qformer_reshapes(vision, connector))
    return cfg, state


def convert_minigpt4(blip2_dir, checkpoint, lm_dir, out_dir, *, dtype: torch.dtype | None = None,
                     progress: bool = True, force: bool = False) -> Path:
    """Convert MiniGPT-4 into an lmmrt checkpoint at `out_dir` (refused if it exists, unless force;
    never inside a source). The LM's tokenizer.json and chat template, when present, are kept."""
    check_output_path(out_dir, sources=[blip2_dir, checkpoint, lm_dir], force=force)
    cfg, state = minigpt4_state(blip2_dir, checkpoint, lm_dir, dtype=dtype, progress=progress)
    template = chat_template(Path(lm_dir))
    extra = {CHAT_TEMPLATE: template} if template is not None else {}
    return save_checkpoint(out_dir, cfg, state, tokenizer=find_tokenizer_json(lm_dir),
                           sources=[blip2_dir, checkpoint, lm_dir], force=force, extra_files=extra,
                           metadata={"source": "minigpt4", "checkpoint": Path(checkpoint).name})
