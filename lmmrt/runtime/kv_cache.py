"""Static, preallocated KV cache: fixed shapes, so decode steps can be replayed as a CUDA graph."""

from __future__ import annotations

import torch

from lmmrt.models.config import DecoderConfig


class KVCache:
    """k, v: (layers, batch, kv_heads, max_len, head_dim), allocated once per generate call."""

    def __init__(self, cfg: DecoderConfig, batch: int, max_len: int, dtype: torch.dtype, device):
        shape = (cfg.layers, batch, cfg.kv_heads, max_len, cfg.head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.max_len = max_len

    @property
    def nbytes(self) -> int:
        return self.k.numel() * self.k.element_size() * 2
