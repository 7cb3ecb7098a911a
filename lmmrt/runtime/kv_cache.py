"""Static, preallocated KV cache: fixed shapes, so decode steps can be replayed as a CUDA graph.

Allocated uninitialised (torch.empty): every slot a forward call attends to was written earlier in
the same generation (the prompt's slots by prefill, then one slot per decode step), and slots past
the current one, or left of a row's first token in the fixed-shape step, are never read (the
eager step slices the cache prefix; decode_attention reads only [key_start, key_end)).
"""

from __future__ import annotations

import torch

from lmmrt.models.config import DecoderConfig


class KVCache:
    """k, v: (layers, batch, kv_heads, max_len, head_dim); a fresh buffer, or a view of a pool's."""

    def __init__(self, k: torch.Tensor, v: torch.Tensor):
        self.k, self.v = k, v
        self.max_len = k.shape[3]

    @classmethod
    def allocate(cls, cfg: DecoderConfig, batch: int, max_len: int, dtype: torch.dtype, device) -> KVCache:
        shape = (cfg.layers, batch, cfg.kv_heads, max_len, cfg.head_dim)
        return cls(torch.empty(shape, dtype=dtype, device=device), torch.empty(shape, dtype=dtype, device=device))

    @property
    def nbytes(self) -> int:
        return self.k.numel() * self.k.element_size() * 2


class KVCachePool:
    """One KV buffer per model, lent to one generation at a time: reused across calls (no
    allocation, no fill) and grown when a call needs a bigger batch or a longer cache. A call gets a
    view of the first `batch` rows and `max_len` slots; views of one (batch, max_len) bucket keep
    their addresses from call to call, so a CUDA graph captured over them replays. `generation`
    changes whenever the buffer is reallocated (graphs over the old one are then stale)."""

    def __init__(self):
        self.buffer: KVCache | None = None
        self.generation = 0
        self.in_use = False

    def view(self, cfg: DecoderConfig, batch: int, max_len: int, dtype: torch.dtype, device) -> KVCache:
        buf = self.buffer
        if (buf is None or buf.k.dtype != dtype or buf.k.device != torch.device(device)
                or buf.k.shape[1] < batch or buf.max_len < max_len):
            grown_batch = batch if buf is None or buf.k.dtype != dtype else max(batch, buf.k.shape[1])
            grown_len = max_len if buf is None or buf.k.dtype != dtype else max(max_len, buf.max_len)
            self.buffer = None  # free the old buffer before allocating the new one
            self.buffer = buf = KVCache.allocate(cfg, grown_batch, grown_len, dtype, device)
            self.generation += 1
        return KVCache(buf.k[:, :batch, :, :max_len], buf.v[:, :batch, :, :max_len])
