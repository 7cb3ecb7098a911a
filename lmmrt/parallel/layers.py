"""The modules a tensor-parallel rank swaps into its model (Megatron-LM's split, as in vLLM and
gpt-fast): column-parallel layers need none (a plain nn.Linear holding this rank's output rows), a
row-parallel one sums the ranks' partial products (RowParallelLinear), and the vocabulary is split
by rows for the embedding (VocabParallelEmbedding) and the LM head (TensorParallelDecoder.head).

Every collective here is a plain torch.distributed call on a fixed-shape tensor: NCCL captures them in
a CUDA graph, so the fixed-shape decode step is unchanged.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from lmmrt.kernels.cpu_linear import linear
from lmmrt.models.decoder import Decoder, alibi_slopes
from lmmrt.parallel.group import TensorParallelError

# torch renamed all_gather_into_tensor (deprecated from 2.10 on); the tested range has one or the other
_all_gather_into = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


def vocab_range(vocab_size: int, rank: int, size: int) -> tuple[int, int]:
    """Rows [start, end) of the vocabulary held by `rank`: ceil(V / N) per rank, the last ones fewer
    when N does not divide V (so every vocabulary is split, whatever its size)."""
    chunk = -(-vocab_size // size)
    return min(rank * chunk, vocab_size), min((rank + 1) * chunk, vocab_size)


def check_group_exists() -> None:
    """Raise TensorParallelError when the process group has been destroyed: a call still running (a
    generate stream) when its group ended (leave_group) would otherwise get torch's raw "Default
    process group has not been initialized". A Python-level check: not part of a captured CUDA graph."""
    if not dist.is_initialized():
        raise TensorParallelError("the process group of this tensor-parallel model has ended (leave_group, or "
                                  "torch.distributed.destroy_process_group) while a call was still using it: "
                                  "load the model again to use it")


class RowParallelLinear(nn.Linear):
    """y = sum over ranks of x_r @ W_r^T, then + bias: this rank holds the input columns of its heads
    (or of its slice of the feed-forward width); the bias, replicated, is added once, after the sum."""

    def __init__(self, in_features: int, out_features: int, bias: bool, group=None):
        super().__init__(in_features, out_features, bias=bias)
        self.group = group

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = linear(x, self.weight)
        check_group_exists()
        dist.all_reduce(y, group=self.group)
        return y if self.bias is None else y + self.bias


def row_parallel(linear_layer: nn.Linear, group=None) -> RowParallelLinear:
    """A RowParallelLinear of the same (per-rank) shape, built on the device of `linear_layer` (meta at load)."""
    with torch.device(linear_layer.weight.device):
        return RowParallelLinear(linear_layer.in_features, linear_layer.out_features,
                                 linear_layer.bias is not None, group)


class VocabParallelEmbedding(nn.Embedding):
    """Rows [vocab_start, vocab_start + num_embeddings) of the embedding: each rank looks up the ids it
    holds, zeros for the others, and the sum over ranks is every id's row (exactly: one rank adds its
    row to zeros)."""

    def __init__(self, num_embeddings: int, embedding_dim: int, vocab_start: int, group=None):
        super().__init__(num_embeddings, embedding_dim)
        self.vocab_start = vocab_start
        self.group = group

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        local = ids - self.vocab_start
        outside = (local < 0) | (local >= self.num_embeddings)
        x = F.embedding(local.masked_fill(outside, 0), self.weight).masked_fill(outside[..., None], 0)
        check_group_exists()
        dist.all_reduce(x, group=self.group)
        return x


def gather_vocab(local: torch.Tensor, vocab_size: int, size: int, group=None) -> torch.Tensor:
    """(..., rows of this rank) logits -> (..., vocab_size) on every rank: each rank's block padded to
    ceil(V / N) columns, gathered, the padding cut off."""
    chunk = -(-vocab_size // size)
    if local.shape[-1] != chunk:
        local = F.pad(local, (0, chunk - local.shape[-1]))
    lead = local.shape[:-1]
    flat = local.reshape(-1, chunk).contiguous()
    out = flat.new_empty((size * flat.shape[0], chunk))
    # the concatenating form: gloo does not take the stacked (size, rows, chunk) one
    check_group_exists()
    _all_gather_into(out, flat, group=group)
    full = out.view(size, flat.shape[0], chunk).transpose(0, 1).reshape(*lead, size * chunk)
    return full if size * chunk == vocab_size else full[..., :vocab_size]


class TensorParallelDecoder(Decoder):
    """A Decoder whose LM head holds this rank's vocabulary rows (its logits gathered from every rank)
    and whose ALiBi slopes are those of this rank's heads. Set on a rank's decoder by class swap
    (`make_tensor_parallel`): its parameters and state_dict keys are Decoder's."""

    def head(self, x: torch.Tensor) -> torch.Tensor:
        return gather_vocab(super().head(x), self.head_rows, self.tp_size, self.tp_group)

    def alibi_slopes(self, device) -> torch.Tensor | None:
        if not self.cfg.alibi:
            return None
        # MPT's slopes depend on the global head count (their order interleaves for non-powers of two)
        start = self.tp_rank * self.cfg.heads
        return self._cached("alibi", device, lambda: alibi_slopes(
            self.global_heads, self.cfg.alibi_bias_max, device)[start:start + self.cfg.heads])


def make_tensor_parallel(decoder: Decoder, *, rank: int, size: int, global_heads: int, head_rows: int,
                         group=None) -> None:
    """Turn a rank's decoder (built from the per-rank config) into a TensorParallelDecoder: a
    vocabulary-parallel embedding and LM head (of `head_rows` rows in all: Mllama's is shorter than
    its embedding), the rank's ALiBi slopes."""
    cfg = decoder.cfg
    start, end = vocab_range(cfg.vocab_size, rank, size)
    head_start, head_end = vocab_range(head_rows, rank, size)
    with torch.device(decoder.embed.weight.device):
        decoder.embed = VocabParallelEmbedding(end - start, cfg.embed_dim, start, group)
        if not cfg.tie_embeddings:
            decoder.lm_head = nn.Linear(cfg.embed_dim, head_end - head_start, bias=False)
    decoder.__class__ = TensorParallelDecoder
    decoder.tp_rank, decoder.tp_size, decoder.tp_group, decoder.global_heads = rank, size, group, global_heads
    decoder.head_rows = head_rows
