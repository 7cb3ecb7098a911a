"""Encoded media shared across requests, keyed by content (LRU under a byte budget).

An image sent by many clients (a shared screenshot, a video's frames across the turns of a
conversation) is encoded once: the vision encoder + perceiver's latents and each gated block's
media K/V (a splice model: the connector's features) are kept under the sha256 of the decoded,
normalized pixels and the model, and handed read-only to every request that sends it. A request
keeps the tensors it uses alive, so evicting an entry never pulls media from under a running one;
the budget bounds what the cache itself holds.
"""

from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict
from dataclasses import dataclass

import torch


@dataclass
class MediaEntry:
    """One media item encoded: latents (1, L, D) (a splice model: its features) and per block the
    media (k, v), each (1, L, H, dh) (a splice model: [(features, features)])."""

    latents: torch.Tensor
    kv: list[tuple[torch.Tensor, torch.Tensor]]

    @property
    def nbytes(self) -> int:
        # a splice model's K and V are its latents: count each storage once
        seen, total = set(), 0
        for t in [self.latents] + [x for pair in self.kv for x in pair]:
            ptr = t.untyped_storage().data_ptr()
            if ptr not in seen:
                seen.add(ptr)
                total += t.untyped_storage().nbytes()
        return total


def media_key(pixels: torch.Tensor, model_tag: str, context: str = "") -> str:
    """Content key of a media item: its normalized pixels (F, 3, S, S) (shape, dtype, bytes), the
    model and what else its encoding depends on (`context`: for a perceiver with media-time
    embeddings the item's place in its prompt, for Mllama the tiles' aspect ratio)."""
    h = hashlib.sha256()
    h.update(f"{model_tag}|{tuple(pixels.shape)}|{pixels.dtype}|{context}|".encode())
    h.update(pixels.detach().contiguous().cpu().numpy().tobytes())
    return h.hexdigest()


def model_tag(model) -> str:
    """Names the model inside media keys: its config and where it was loaded from."""
    return hashlib.sha256(f"{model.path}|{model.config!r}|{model.dtype}".encode()).hexdigest()[:16]


class MediaCache:
    """LRU map media key -> MediaEntry holding at most `capacity` bytes (0: caches nothing).
    Thread-safe (lookups happen on the scheduler thread, metrics are read from any)."""

    def __init__(self, capacity: int):
        if isinstance(capacity, bool) or not isinstance(capacity, int) or capacity < 0:
            raise ValueError(f"media_cache_bytes must be an int >= 0, got {capacity!r}")
        self.capacity = capacity
        self._entries: OrderedDict[str, MediaEntry] = OrderedDict()
        self._sizes: dict[str, int] = {}
        self._lock = threading.Lock()
        self.bytes = 0
        self.hits = 0
        self.misses = 0
        self.evictions = 0

    def get(self, key: str) -> MediaEntry | None:
        """The entry (now the most recently used), counting a hit or a miss."""
        with self._lock:
            entry = self._entries.get(key)
            if entry is None:
                self.misses += 1
                return None
            self._entries.move_to_end(key)
            self.hits += 1
            return entry

    def put(self, key: str, entry: MediaEntry) -> None:
        """Keep `entry`, evicting the least recently used until it fits; one bigger than the whole
        budget is not kept."""
        size = entry.nbytes
        with self._lock:
            if key in self._entries or size > self.capacity:
                return
            while self.bytes + size > self.capacity:
                old, _ = self._entries.popitem(last=False)
                self.bytes -= self._sizes.pop(old)
                self.evictions += 1
            self._entries[key] = entry
            self._sizes[key] = size
            self.bytes += size

    def __len__(self) -> int:
        return len(self._entries)

    def stats(self) -> dict:
        with self._lock:
            return {"media_cache_hits": self.hits, "media_cache_misses": self.misses,
                    "media_cache_bytes": self.bytes, "media_cache_entries": len(self._entries),
                    "media_cache_evictions": self.evictions, "media_cache_capacity": self.capacity}
