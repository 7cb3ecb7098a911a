"""What each rank holds (the sharding plan): the per-rank config, the slice of every checkpoint tensor,
and the per-rank model built from them.

Sharded, Megatron style: the decoder's attention (q/k/v output rows per head, wo input columns) and
MLP (gate/up or fc1 output rows, down / fc2 input columns), the same in the gated cross-attention
blocks (their media K/V projection too, so each rank caches only its heads' media K/V), and the
vocabulary rows of the embedding and LM head. Replicated: norms, gates, biases added after a sum
(wo / fc2), the vision encoder, perceiver, splice connectors and Mllama's projector (small beside the
LM, and run once per image: replicas need no collective), OPT's positions and projections.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
import torch.nn as nn

from lmmrt.models.config import MLLAMA_EXTRA_EMBEDDINGS, ModelConfig
from lmmrt.models.splice import build_model
from lmmrt.parallel.group import TensorParallel, TensorParallelError
from lmmrt.parallel.layers import make_tensor_parallel, row_parallel, vocab_range

# Per-layer parameter -> (what its parts are, the dimension split). dim 0: output rows
# (column-parallel); dim 1: input columns (row-parallel, followed by an all-reduce).
DECODER_SPLITS = {"wqkv.weight": ("qkv", 0), "wqkv.bias": ("qkv", 0), "wo.weight": ("heads", 1),
                  "w13.weight": ("ffn2", 0), "w2.weight": ("ffn", 1),
                  "fc1.weight": ("ffn", 0), "fc1.bias": ("ffn", 0), "fc2.weight": ("ffn", 1)}
XATTN_SPLITS = {"wq.weight": ("heads", 0), "wkv.weight": ("kv", 0), "wo.weight": ("heads", 1),
                "ff_w13.weight": ("ffn2", 0), "ff_w1.weight": ("ffn", 0), "ff_w2.weight": ("ffn", 1)}
ROW_PARALLEL = {"decoder": ("wo", "w2", "fc2"), "xattn": ("wo", "ff_w2")}


@dataclass(frozen=True)
class Shard:
    """This rank's slice of one checkpoint tensor: along `dim`, the rows [start, end) of each part of a
    fused tensor (q|k|v, gate|up, k|v), concatenated; one part for an unfused one."""

    dim: int
    ranges: tuple[tuple[int, int], ...]

    def size(self) -> int:
        return sum(b - a for a, b in self.ranges)


def head_rows(cfg: ModelConfig) -> int:
    """Rows of the LM head: the vocabulary, but for Mllama, whose embedding has 8 rows more."""
    return cfg.decoder.vocab_size - (MLLAMA_EXTRA_EMBEDDINGS if cfg.family == "mllama" else 0)


def rank_config(cfg: ModelConfig, size: int) -> ModelConfig:
    """The config of one rank's model: head counts and feed-forward widths divided by `size`; the
    vocabulary stays global (its split is VocabParallelEmbedding's). Every count `size` does not
    divide is named in one TensorParallelError."""
    d, x = cfg.decoder, cfg.xattn
    counts = {"decoder.heads": d.heads, "decoder.kv_heads": d.kv_heads, "decoder.ffn_dim": d.ffn_dim}
    if x.layers:
        counts.update({"xattn.heads": x.heads, "xattn.kv_heads": x.kv_heads, "xattn.ffn_dim": x.ffn_dim})
    bad = [f"{name} = {n}" for name, n in counts.items() if n % size]
    if bad:
        raise TensorParallelError(f"tp={size} does not divide {', '.join(bad)}: tensor parallelism gives every "
                                  f"rank the same number of heads and feed-forward rows; use a tp that divides "
                                  f"them")
    decoder = dataclasses.replace(d, heads=d.heads // size, kv_heads=d.kv_heads // size, ffn_dim=d.ffn_dim // size)
    xattn = dataclasses.replace(x, heads=x.heads // size, kv_heads=x.kv_heads // size,
                                ffn_dim=x.ffn_dim // size) if x.layers else x
    return dataclasses.replace(cfg, decoder=decoder, xattn=xattn)


def _parts(kind: str, cfg: ModelConfig, section: str) -> list[int]:
    if section == "xattn":
        x = cfg.xattn
        inner, kv = x.heads * x.head_dim, x.kv_heads * x.head_dim
        return {"heads": [inner], "kv": [kv, kv], "ffn": [x.ffn_dim], "ffn2": [x.ffn_dim] * 2}[kind]
    d = cfg.decoder
    q, kv = d.heads * d.head_dim, d.kv_heads * d.head_dim
    return {"qkv": [q, kv, kv], "heads": [q], "ffn": [d.ffn_dim], "ffn2": [d.ffn_dim] * 2}[kind]


def shard_of(key: str, cfg: ModelConfig, tp: TensorParallel) -> Shard | None:
    """This rank's slice of checkpoint tensor `key` of a model with (global) config `cfg`; None when
    every rank holds it whole."""
    if key == "decoder.embed.weight":
        return Shard(0, (vocab_range(cfg.decoder.vocab_size, tp.rank, tp.size),))
    if key == "decoder.lm_head.weight":
        return Shard(0, (vocab_range(head_rows(cfg), tp.rank, tp.size),))
    section, _, rest = key.partition(".")
    splits = {"decoder": DECODER_SPLITS, "xattn": XATTN_SPLITS}.get(section)
    if splits is None or (section == "decoder" and not rest.startswith("layers.")):
        return None
    name = rest.split(".", 2)[-1] if section == "decoder" else rest.split(".", 1)[-1]
    if name not in splits:
        return None
    kind, dim = splits[name]
    ranges, offset = [], 0
    for part in _parts(kind, cfg, section):
        per_rank = part // tp.size
        ranges.append((offset + tp.rank * per_rank, offset + (tp.rank + 1) * per_rank))
        offset += part
    return Shard(dim, tuple(ranges))


def build_rank_model(cfg: ModelConfig, rank_cfg: ModelConfig, tp: TensorParallel) -> nn.Module:
    """One rank's model on the meta device: built from its per-rank config, with the row-parallel
    linears, the vocabulary-parallel embedding and head swapped in."""
    with torch.device("meta"):
        model = build_model(rank_cfg)
    for section, blocks in (("decoder", model.decoder.layers), ("xattn", model.xattn)):
        for block in blocks:
            for name in ROW_PARALLEL[section]:
                if isinstance(getattr(block, name, None), nn.Linear):
                    setattr(block, name, row_parallel(getattr(block, name), tp.group))
    make_tensor_parallel(model.decoder, rank=tp.rank, size=tp.size, global_heads=cfg.decoder.heads,
                         head_rows=head_rows(cfg), group=tp.group)
    return model
