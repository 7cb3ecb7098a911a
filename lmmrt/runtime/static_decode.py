"""A decode step with fixed shapes, captured once per model and shape bucket as a CUDA graph.

The eager decode step attends over a cache prefix that grows by one each step and writes K/V at a
Python-int slot: shapes change, so it cannot be captured. This step instead holds the slot in a
device tensor, writes K/V with index_copy_ at it, and attends with decode_attention over each row's
filled slots [left padding, slot + 1): every step has the same shapes and addresses, so on CUDA it is
captured into a CUDA graph and replayed (one launch per step instead of hundreds). Elsewhere, or
when capture is not possible, the same step runs eagerly, which is how the CPU tests prove it
computes exactly what the eager decode does.

Graphs live on the model (DecodeState), keyed by bucket: batch size and cache length rounded up to
a power of two. All a graph reads lives in buffers of its own (tokens, slot, padding, the decode
token's media indices) or of the model's pools (KV cache, media K/V cache), which later calls of
the bucket refill before replaying; the pools only grow, and a graph over a reallocated pool is
dropped. Capture needs every op of the step to be free of host syncs: the torch reference of the
masked cross-attention reads `media_count.max()` on the host, so graphs are used only when that
op resolves to a kernel (triton or cuda).

FixedDecode runs one generation on this step and drops finished rows (`select`): their KV rows are
copied to the front of the cache and a step of the smaller batch takes over, on CUDA the graph of
that batch's bucket (captured on its first use, replayed afterwards).
"""

from __future__ import annotations

import contextlib
import warnings

import torch

from lmmrt.kernels import backend as _backend
from lmmrt.models.xattn import MediaContext
from lmmrt.runtime.kv_cache import KVCache, KVCachePool

MIN_LENGTH_BUCKET = 128

# Dropping finished rows on the graph path may capture the smaller batch's graph: two warm-up steps
# and the capture, a few steps' worth of work, which fewer remaining steps would not pay back.
GRAPH_COMPACT_MIN_STEPS = 8


def length_bucket(n: int) -> int:
    """Cache length of the bucket holding a generation of n slots: the next power of two."""
    return max(MIN_LENGTH_BUCKET, 1 << (n - 1).bit_length())


def graph_capturable(model) -> bool:
    dev = model.device
    if dev.type != "cuda":
        return False
    # The cuda entry hands shapes it does not support (fp32, other head dims) to Triton when it is
    # installed, else to the torch reference, which is not capturable.
    return (_backend.resolve_name("masked_cross_attention", model.backend, dev) != "torch"
            and _backend.triton_available())


def check_cuda_graph(cuda_graph) -> bool | str:
    """lmmrt.load's cuda_graph option: True, False or "auto"."""
    if isinstance(cuda_graph, bool) or cuda_graph == "auto":
        return cuda_graph
    raise ValueError(f"cuda_graph must be True, False or 'auto', got {cuda_graph!r}")


def uses_fixed_step(model) -> bool:
    """cuda_graph "auto": the fixed-shape step where it can be captured; True: always (eager where
    it cannot be captured); False: the eager decode step."""
    mode = getattr(model, "cuda_graph", False)
    return graph_capturable(model) if mode == "auto" else bool(mode)


class StaticDecodeStep:
    """The fixed-shape decode step over `cache` and `media` (whose index tensors it reads as they
    are: fill them before a call). pad: (B,) each row's left padding (its first key slot)."""

    def __init__(self, model, cache: KVCache, media: MediaContext, pad: torch.Tensor, *, use_graph: bool):
        self.model, self.cache, self.media, self.pad = model, cache, media, pad
        dev = model.device
        B = pad.shape[0]
        self.tokens = torch.zeros(B, 1, dtype=torch.long, device=dev)
        self.slot = torch.zeros(1, dtype=torch.long, device=dev)
        self.use_graph = use_graph and graph_capturable(model)
        self.graph = None
        self.logits = None

    def _forward(self) -> torch.Tensor:
        module = self.model.module
        positions = (self.slot - self.pad)[:, None]  # (B, 1)
        ctx = module.decoder.fixed_decode_context(positions, self.slot, self.pad, self.cache.max_len,
                                                  self.model.backend)
        return module(self.tokens, ctx, self.cache, self.media, logits_for="last")

    def _capture(self) -> None:
        # Warm up on a side stream (allocator and lazy initialisation), then capture. The warm-up
        # steps compute the real step for the current slot, so the cache holds correct values.
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):
                self._forward()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            self.logits = self._forward()
        self.graph = graph

    def __call__(self, tokens: torch.Tensor, slot: int) -> torch.Tensor:
        """tokens (B,) of this step (a NaN row's -1 reads as token 0), written at cache `slot`
        -> next-token logits (B, V). With a graph the logits buffer is overwritten by the next call."""
        self.tokens.copy_(tokens.clamp(min=0)[:, None])
        self.slot.fill_(slot)
        return self._run()

    def _run(self, capture_lock=None) -> torch.Tensor:
        """The step on the inputs already copied in: eager, or the graph (captured on first use, under
        `capture_lock` when given; a failed capture means eager from then on, with one warning)."""
        if not self.use_graph:
            return self._forward()
        if self.graph is None:
            try:
                with capture_lock if capture_lock is not None else contextlib.nullcontext():
                    self._capture()
            except Exception as e:  # noqa: BLE001 - any capture failure means: decode eagerly
                self.use_graph = False
                self.model.decode_state.graph_failed(e)
                return self._forward()
        self.graph.replay()
        return self.logits


class DecodeState:
    """Per model: the KV cache pool, the media K/V pool and the captured decode graphs by bucket."""

    def __init__(self):
        self.kv = KVCachePool()
        self.media_kv: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.media_len: torch.Tensor | None = None  # Mllama: valid keys per pooled media item
        self.media_generation = 0
        self.graphs: dict[tuple, StaticDecodeStep] = {}
        self.graph_error: str | None = None

    def graph_failed(self, error: Exception) -> None:
        """Capture failed: one warning naming the reason, then eager decode for this model."""
        self.graph_error = f"{type(error).__name__}: {error}"
        self.graphs.clear()
        warnings.warn(f"lmmrt: CUDA-graph capture of the decode step failed ({self.graph_error}); "
                      "decoding eagerly from now on", RuntimeWarning, stacklevel=3)

    def _media_pool(self, kv: list[tuple[torch.Tensor, torch.Tensor]]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """The call's media K/V copied into the pool (grown to hold them); full-capacity views."""
        n = kv[0][0].shape[0]
        pool = self.media_kv
        if (not pool or len(pool) != len(kv) or pool[0][0].shape[0] < n
                or pool[0][0].shape[1:] != kv[0][0].shape[1:] or pool[0][0].dtype != kv[0][0].dtype):
            cap = max(n, pool[0][0].shape[0]) if pool and pool[0][0].shape[1:] == kv[0][0].shape[1:] else n
            self.media_kv = pool = []
            pool.extend((k.new_empty((cap,) + tuple(k.shape[1:])), v.new_empty((cap,) + tuple(v.shape[1:])))
                        for k, v in kv)
            self.media_generation += 1
        for (pk, pv), (k, v) in zip(pool, kv):
            pk[:n].copy_(k)
            pv[:n].copy_(v)
        return pool

    def _media_len_pool(self, media_len: torch.Tensor) -> torch.Tensor:
        """Mllama's media_len copied into a buffer as long as the media pool (filled by _media_pool)."""
        cap, n = self.media_kv[0][0].shape[0], media_len.shape[0]
        if self.media_len is None or self.media_len.shape[0] != cap or self.media_len.device != media_len.device:
            self.media_len = media_len.new_zeros(cap)
            self.media_generation += 1  # a graph reading the old buffer is stale
        self.media_len[:n].copy_(media_len)
        return self.media_len

    def graph_step(self, model, cache: KVCache, media: MediaContext, pad: torch.Tensor) -> StaticDecodeStep:
        """The graph step of this call's bucket (B, cache length, media or not), its inputs filled
        from this call. `cache` must be a view of this state's KV pool."""
        B = pad.shape[0]
        pool_kv = self._media_pool(media.kv) if media.any_media else []
        mllama = media.any_media and media.text_time_first is not None  # "range" mask mode
        pool_len = self._media_len_pool(media.media_len) if mllama else None
        key = (B, cache.max_len, media.any_media, self.kv.generation,
               self.media_generation if media.any_media else 0)
        step = self.graphs.get(key)
        if step is None:
            # A new pool generation makes every graph over the old buffers stale.
            self.graphs = {k: s for k, s in self.graphs.items()
                           if k[3] == self.kv.generation and (not k[2] or k[4] == self.media_generation)}
            dev = model.device
            static_media = MediaContext(
                kv=pool_kv, text_time=torch.zeros(B, 1, dtype=media.text_time.dtype, device=dev),
                media_start=torch.zeros(B, dtype=media.media_start.dtype, device=dev),
                media_count=torch.zeros(B, dtype=media.media_count.dtype, device=dev),
                any_media=media.any_media, media_len=pool_len,
                text_time_first=torch.zeros(B, 1, dtype=media.text_time.dtype, device=dev) if mllama else None)
            step = StaticDecodeStep(model, cache, static_media, torch.zeros(B, dtype=torch.long, device=dev),
                                    use_graph=True)
            self.graphs[key] = step
        step.pad.copy_(pad)
        step.media.text_time.copy_(media.text_time)
        step.media.media_start.copy_(media.media_start)
        step.media.media_count.copy_(media.media_count)
        if mllama:
            step.media.text_time_first.copy_(media.text_time_first)
        return step


class FixedDecode:
    """The fixed-shape decode of one generation: (tokens (B,), int slot) -> logits (B, V), through the
    graph of `state` (then `cache` is a view of its KV pool and `media` the call's own context) or
    eagerly (`state` None; `media` carries its gathered keys). Finished rows can be dropped
    (`select`), so they stop costing work."""

    def __init__(self, model, cache: KVCache, media: MediaContext, pad: torch.Tensor, *,
                 state: DecodeState | None):
        self.model, self.cache, self.media, self.pad, self.state = model, cache, media, pad, state
        self.step = self._new_step()

    def _new_step(self) -> StaticDecodeStep:
        if self.state is not None:
            return self.state.graph_step(self.model, self.cache, self.media, self.pad)
        return StaticDecodeStep(self.model, self.cache, self.media, self.pad, use_graph=False)

    def __call__(self, tokens: torch.Tensor, slot: int) -> torch.Tensor:
        return self.step(tokens, slot)

    def worth_compacting(self, steps_left: int) -> bool:
        """Whether dropping rows pays off with `steps_left` decode steps to go."""
        return steps_left >= (GRAPH_COMPACT_MIN_STEPS if self.state is not None else 1)

    def select(self, rows: torch.Tensor) -> None:
        """Keep the batch rows `rows` (1-D, ascending): their KV cache rows move to the front of the
        cache, in place, so on the graph path the smaller batch is again a view of the pool (stream
        order puts the copy after every step already queued)."""
        n = rows.shape[0]
        k, v = self.cache.k, self.cache.v
        # gathered before the copy: the source and destination rows overlap
        k[:, :n].copy_(k.index_select(1, rows))
        v[:, :n].copy_(v.index_select(1, rows))
        self.cache = KVCache(k[:, :n], v[:, :n])
        self.media = self.media.select(rows)
        self.pad = self.pad[rows]
        self.step = self._new_step()
