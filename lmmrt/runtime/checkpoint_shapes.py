"""config.json against the tensors in model.safetensors, before any module is built.

Layer counts come from the key names and the main dimensions from a few tensor shapes, so a
config.json that asks for a model the file does not hold (say 10^6 decoder layers) is refused at
once, naming the field, instead of after building that model. The full key-by-key check runs on
the (meta) model afterwards.
"""

from __future__ import annotations

import re

from lmmrt.errors import CheckpointError
from lmmrt.models.config import MLLAMA_EXTRA_EMBEDDINGS, ModelConfig


def _count(shapes: dict, pattern: str) -> int:
    """1 + the largest index in the keys matching `pattern` (0 when none does)."""
    rx = re.compile(pattern)
    return 1 + max((int(m.group(1)) for k in shapes if (m := rx.match(k))), default=-1)


def check_config_matches_weights(cfg: ModelConfig, shapes: dict[str, tuple[int, ...]], *,
                                 config_path: str, weights_path: str) -> None:
    counts = [
        ("decoder.layers", cfg.decoder.layers, r"decoder\.layers\.(\d+)\.", "decoder.layers.{i}"),
        ("vision.layers", cfg.vision.layers, r"vision\.blocks\.(\d+)\.", "vision.blocks.{i}"),
        ("perceiver.depth", cfg.perceiver.depth if cfg.perceiver is not None else 0,
         r"perceiver\.layers\.(\d+)\.", "perceiver.layers.{i}"),
        ("xattn.layers (its length)", len(cfg.xattn.layers), r"xattn\.(\d+)\.", "xattn.{j}"),
    ]
    problems = []
    for field, want, pattern, keys in counts:
        got = _count(shapes, pattern)
        if got != want:
            problems.append(f"{field} = {want}, but the weights hold {got} ({keys}.* keys)")
    if cfg.perceiver is None and any(k.startswith("perceiver.") for k in shapes):
        problems.append("no perceiver section, but the weights hold perceiver.* tensors")
    v, d = cfg.vision, cfg.decoder
    # the embedding and the head are embed_dim wide: OPT's word_embed_proj_dim, else dim (named so then)
    width = "decoder.embed_dim" if d.embed_dim != d.dim else "decoder.dim"
    rows = f"decoder.vocab_size - {MLLAMA_EXTRA_EMBEDDINGS}" if cfg.family == "mllama" else "decoder.vocab_size"
    head_rows = d.vocab_size - MLLAMA_EXTRA_EMBEDDINGS if cfg.family == "mllama" else d.vocab_size
    dims = [
        ("decoder.embed.weight", (d.vocab_size, d.embed_dim), f"(decoder.vocab_size, {width})"),
        ("decoder.lm_head.weight", (head_rows, d.embed_dim), f"({rows}, {width})"),
        ("decoder.edges.project_in.weight", (d.dim, d.embed_dim), "(decoder.dim, decoder.embed_dim)"),
        ("decoder.edges.project_out.weight", (d.embed_dim, d.dim), "(decoder.embed_dim, decoder.dim)"),
        ("vision.patch_embed.weight", (v.width, 3, v.patch_size, v.patch_size),
         "(vision.width, 3, vision.patch_size, vision.patch_size)"),
        ("vision.pos_embed", (v.grid * v.grid + 1, v.width),
         "((vision.image_size / vision.patch_size)^2 + 1, vision.width)"),
    ]
    if cfg.perceiver is not None:
        dims.append(("perceiver.latents", (cfg.perceiver.n_latents, cfg.perceiver.dim),
                     "(perceiver.n_latents, perceiver.dim)"))
    for key, want, fields in dims:
        if key in shapes and tuple(shapes[key]) != want:
            problems.append(f"{fields} = {want}, but {key} has shape {tuple(shapes[key])}")
    if problems:
        raise CheckpointError(f"{config_path} does not describe the model in {weights_path}:\n  "
                              + "\n  ".join(problems))
