"""The serving engine's KV cache: a fixed number of slot rows, each one request's whole context.

One buffer (layers, slots, kv_heads, max_context + 1, head_dim) allocated once, sized by a memory
budget. A request owns one row from admission to its end and writes its tokens from position 0
(no left padding): row r's key range is [0, its length). The extra last position of every row is
scratch: a row in the decode batch that is not decoding (free, or still prefilling) writes its
dummy token there, where nothing ever reads. Rows are handed out lowest first, so the occupied
rows stay packed at the front and a decode step over rows [0, n) wastes little.

The buffer starts zeroed and every position holds a finite value from then on: the eager decode
step masks keys past a row's length with SDPA's boolean mask, which keeps a NaN there from
reaching the row's result only if no NaN is there (a masked score still takes part in the sum as
-inf + NaN). Whatever a request writes is finite unless its own logits turn NaN: such a row is
zeroed when it is released (clear).
"""

from __future__ import annotations

import heapq

import torch

from lmmrt.models.config import DecoderConfig
from lmmrt.runtime.kv_cache import KVCache

# The KV budget on the CPU when no max_memory is given (there is no free-memory query worth trusting).
DEFAULT_CPU_BUDGET = 4 << 30


def slot_bytes(cfg: DecoderConfig, max_context: int, dtype: torch.dtype) -> int:
    """Bytes of one slot row: K and V of every layer for max_context + 1 positions."""
    elem = torch.empty((), dtype=dtype).element_size()
    return 2 * cfg.layers * cfg.kv_heads * (max_context + 1) * cfg.head_dim * elem


def kv_budget(device: torch.device, *, max_memory: int | None, memory_fraction: float, reserved: int = 0) -> int:
    """Bytes the KV cache may take: max_memory, else memory_fraction of the device's free memory
    (CUDA; the weights are loaded already) less `reserved` (the media cache's budget), else
    DEFAULT_CPU_BUDGET."""
    if max_memory is not None:
        return max_memory
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return max(0, int(free * memory_fraction) - reserved)
    return DEFAULT_CPU_BUDGET


class SlotKVCache:
    """`slots` rows of `max_context` positions (+ the scratch position) for one model."""

    def __init__(self, cfg: DecoderConfig, *, slots: int, max_context: int, dtype: torch.dtype, device):
        self.cache = KVCache.allocate(cfg, slots, max_context + 1, dtype, device)
        self.cache.k.zero_()
        self.cache.v.zero_()
        self.slots = slots
        self.max_context = max_context
        self.scratch = max_context
        self._free = list(range(slots))  # a heap: the lowest free row first

    @classmethod
    def for_budget(cls, cfg: DecoderConfig, *, max_batch: int, max_context: int, budget: int,
                   dtype: torch.dtype, device) -> SlotKVCache:
        """As many rows as the budget holds, at most max_batch; a budget short of one row is an error."""
        per_row = slot_bytes(cfg, max_context, dtype)
        slots = min(max_batch, budget // per_row)
        if slots < 1:
            raise ValueError(f"the KV cache budget of {budget} bytes holds no request: one slot of "
                             f"{max_context} tokens takes {per_row} bytes ({cfg.layers} layers, {cfg.kv_heads} KV "
                             f"heads of {cfg.head_dim}, {dtype}); raise max_memory / memory_fraction or lower "
                             "max_context")
        return cls(cfg, slots=slots, max_context=max_context, dtype=dtype, device=device)

    @property
    def nbytes(self) -> int:
        return self.cache.nbytes

    @property
    def free(self) -> int:
        return len(self._free)

    def acquire(self) -> int | None:
        """The lowest free row, or None when every row is taken."""
        return heapq.heappop(self._free) if self._free else None

    def release(self, row: int) -> None:
        heapq.heappush(self._free, row)

    def clear(self, row: int) -> None:
        """Zero row `row` (after a request whose values may not be finite)."""
        self.cache.k[:, row].zero_()
        self.cache.v[:, row].zero_()

    def row(self, row: int) -> KVCache:
        """Row `row` as a batch of one (a view: writes land in the shared buffer)."""
        return KVCache(self.cache.k[:, row:row + 1], self.cache.v[:, row:row + 1])

    def rows(self, n: int) -> KVCache:
        """Rows [0, n) as a batch of n (a view)."""
        return KVCache(self.cache.k[:, :n], self.cache.v[:, :n])
