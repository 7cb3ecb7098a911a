"""`lmmrt info CHECKPOINT`: what a checkpoint directory holds, from its config.json and its file names
alone (no weights are read): the family, the image marker its prompts use, the language model's size,
whether a tokenizer and a chat template come with it."""

from __future__ import annotations

from pathlib import Path

from lmmrt.errors import CheckpointError
from lmmrt.models.clip_config import CLIP_FAMILY, ClipConfig
from lmmrt.models.config import MLLAMA_EXTRA_EMBEDDINGS, ModelConfig
from lmmrt.runtime.weights import CHECKPOINT_DIR_HINT, CONFIG, TOKENIZER, convert_first, read_config_json

FAMILY_NAMES = {"idefics": "IDEFICS", "openflamingo": "OpenFlamingo", "llava": "LLaVA-1.5", "blip2": "BLIP-2 (OPT)",
                "minigpt4": "MiniGPT-4", "mllama": "Llama 3.2 Vision (Mllama)", CLIP_FAMILY: "CLIP"}
# lmmrt.serve.chat_template.TEMPLATE_FILES, the files `lmmrt serve` reads a chat template from, in order
# (not imported: lmmrt.serve needs the serve extra; tests/test_checkpoint_info.py checks that they agree)
CHAT_TEMPLATE_FILES = ("chat_template.jinja", "chat_template.json")
# what info describes, where a missing directory is reported (the loader's hint names lmmrt's format only)
INFO_DIR_HINT = f"{CHECKPOINT_DIR_HINT}, or a transformers IDEFICS directory"


def _files(path: Path) -> dict:
    template = next((name for name in CHAT_TEMPLATE_FILES if (path / name).is_file()), None)
    return {"tokenizer": (path / TOKENIZER).is_file(), "chat_template": template}


def checkpoint_info(path) -> dict:
    """The description of the checkpoint directory `path` (an lmmrt checkpoint, or a transformers IDEFICS
    directory, which lmmrt.load converts in memory); a config that is not one of these is an error saying
    what it is (a transformers directory: the `lmmrt convert` command for it)."""
    path = Path(path)
    try:
        cfg_json = read_config_json(path)
    except FileNotFoundError as e:
        raise FileNotFoundError(str(e).replace(CHECKPOINT_DIR_HINT, INFO_DIR_HINT)) from None
    where = str(path / CONFIG)
    if "decoder" not in cfg_json and cfg_json.get("model_type") == "idefics":
        return {"path": str(path), "format": "transformers (converted in memory at every load)", "family": "idefics",
                "name": FAMILY_NAMES["idefics"], "media_feed": "cross_attention", "image_marker": "<image>",
                "language_model": None, **_files(path)}
    if "decoder" not in cfg_json and "model_type" in cfg_json:
        raise CheckpointError(convert_first(path, cfg_json["model_type"]))
    if cfg_json.get("family") == CLIP_FAMILY:
        ClipConfig.from_dict(cfg_json, where=where)  # checked, as a load would check it
        return {"path": str(path), "format": "lmmrt", "family": CLIP_FAMILY, "name": FAMILY_NAMES[CLIP_FAMILY],
                "media_feed": None, "image_marker": None, "language_model": None, **_files(path)}
    cfg = ModelConfig.from_dict(cfg_json, where=where)
    d = cfg.decoder
    # the tokens the LM head scores: Mllama's embedding has rows the head lacks (<|image|> among them)
    vocab = d.vocab_size - (MLLAMA_EXTRA_EMBEDDINGS if cfg.family == "mllama" else 0)
    lm = {"family": d.family, "layers": d.layers, "dim": d.dim, "heads": d.heads, "kv_heads": d.kv_heads or d.heads,
          "vocab_size": vocab,
          "cross_attention_layers": len(cfg.xattn.layers) if cfg.media_feed == "cross_attention" else 0}
    return {"path": str(path), "format": "lmmrt", "family": cfg.family, "name": FAMILY_NAMES[cfg.family],
            "media_feed": cfg.media_feed, "image_marker": cfg.image_token, "language_model": lm, **_files(path)}


def checkpoint_info_text(path) -> str:
    d = checkpoint_info(path)
    feed = {"cross_attention": "cross-attention", "splice": "embedding splice", None: "embeddings only"}[d["media_feed"]]
    lines = [f"checkpoint {d['path']} ({d['format']})", f"family: {d['name']} ({feed})"]
    if d["image_marker"] is None:
        lines.append("image marker: none (CLIP embeds images and texts: lmmrt classify, lmmrt.embed)")
    else:
        lines.append(f"image marker: {d['image_marker']} (write it in the prompt where each image goes, one "
                     "image per marker)")
    lm = d["language_model"]
    if lm is not None:
        kv = f" ({lm['kv_heads']} K/V)" if lm["kv_heads"] != lm["heads"] else ""
        xattn = f" and {lm['cross_attention_layers']} cross-attention" if lm["cross_attention_layers"] else ""
        lines.append(f"language model: {lm['family']}, {lm['layers']} self-attention layers{xattn}, {lm['dim']} wide, "
                     f"{lm['heads']} heads{kv}, vocabulary {lm['vocab_size']}")
    lines.append(f"tokenizer: {TOKENIZER} (prompts as text)" if d["tokenizer"]
                 else "tokenizer: none (prompts as token ids only, through the Python API)")
    if d["family"] != CLIP_FAMILY:
        lines.append(f"chat template: {d['chat_template']} (for lmmrt serve's chat API)" if d["chat_template"]
                     else "chat template: none (lmmrt serve uses its family's format)")
    return "\n".join(lines)
