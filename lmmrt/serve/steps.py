"""The decode step of the serving engine over the slotted KV cache: one token for every decoding
request, each row at its own position (the prefill steps are in lmmrt.serve.prefill).

It calls the model's own forward (lmmrt.models: decoder layers, gated blocks), with a StepContext
that writes each row's token at that row's length (StepContext.row_slots); row r sees keys
[0, length_r]. RoPE and learned positions take each row's own position; ALiBi needs only key -
query distances, which the slot gives. Rows of the batch that are not decoding write to the
scratch position and are ignored.

The decode step has two forms. Eager (the CPU): rows [0, highest decoding row], keys up to the
longest row, a boolean mask. Fixed-shape (CUDA): rows [0, bucket) for a power-of-two bucket,
the whole cache with each row's key range [0, length] (decode_attention), every input in a
buffer of the step and the media in a pool: so its shapes and addresses never change and it is
captured once per bucket as a CUDA graph (static_decode.StaticDecodeStep's capture) and replayed.
"""

from __future__ import annotations

import contextlib

import torch

from lmmrt.models.decoder import StepContext
from lmmrt.models.xattn import MediaContext
from lmmrt.runtime.decode_plan import gather_media
from lmmrt.runtime.static_decode import StaticDecodeStep, graph_capturable


class PackedMedia:
    """The decoding rows' media K/V packed per block in row order, and per row of the batch its
    start, count and decode media ordinals (0 for a row without media or not decoding); Mllama's
    media_len packed alike (None for other families)."""

    def __init__(self, seqs: list, n_rows: int):
        self.start, self.count, self.text_time = [0] * n_rows, [0] * n_rows, [0] * n_rows
        self.text_time_first = [0] * n_rows
        with_media = [s for s in sorted(seqs, key=lambda s: s.slot) if s.media_kv]
        n = 0
        for s in with_media:
            self.start[s.slot], self.count[s.slot], self.text_time[s.slot] = n, s.media_count_int, s.decode_text_time
            self.text_time_first[s.slot] = s.decode_text_time_first or 0
            n += s.media_count_int
        self.kv = [(torch.cat([s.media_kv[j][0] for s in with_media]), torch.cat([s.media_kv[j][1] for s in with_media]))
                   for j in range(len(with_media[0].media_kv))] if with_media else []
        self.mllama = bool(with_media) and with_media[0].media_len is not None
        self.media_len = torch.cat([s.media_len for s in with_media]) if self.mllama else None

    def context(self, dev) -> MediaContext:
        def rows(values):
            return torch.tensor(values, dtype=torch.int32, device=dev)

        return MediaContext(kv=self.kv, text_time=rows(self.text_time)[:, None], media_start=rows(self.start),
                            media_count=rows(self.count), any_media=bool(self.kv), media_len=self.media_len,
                            text_time_first=rows(self.text_time_first)[:, None] if self.mllama else None)


class SlotDecoder:
    """One decode step of the decoding requests: __call__(seqs, version) -> logits (n_rows, V),
    row r of the logits belonging to the request in slot row r. `version` changes whenever the
    set of decoding requests does; their media are gathered again only then."""

    def __init__(self, model, cache, *, fixed: bool, capture_lock=None):
        self.model, self.cache = model, cache
        # held while a graph is captured: another thread's CUDA work then (a submit's image
        # preprocessing on the GPU) would make the capture fail
        self.capture_lock = capture_lock if capture_lock is not None else contextlib.nullcontext()
        self.fixed = fixed
        self.use_graph = fixed and graph_capturable(model)
        self._version = None
        self._media: MediaContext | None = None
        self._steps: dict[int, SlotDecodeStep] = {}
        self._pool: list[tuple[torch.Tensor, torch.Tensor]] = []
        self._pool_len: torch.Tensor | None = None  # Mllama: media_len of the pooled items
        self._pool_generation = 0

    def rows_for(self, seqs) -> int:
        """Batch rows of the step: [0, highest decoding row] eagerly, its power-of-two bucket when fixed."""
        top = max(s.slot for s in seqs) + 1
        return min(1 << (top - 1).bit_length(), self.cache.slots) if self.fixed else top

    def __call__(self, seqs: list, version: int) -> torch.Tensor:
        n = self.rows_for(seqs)
        return self._fixed(seqs, n, version) if self.fixed else self._eager(seqs, n, version)

    def _eager(self, seqs, n: int, version: int) -> torch.Tensor:
        model, module = self.model, self.model.module
        dev = model.device
        tokens, positions, writes = [0] * n, [0] * n, [self.cache.scratch] * n
        for s in seqs:
            tokens[s.slot], positions[s.slot], writes[s.slot] = s.last_token, s.length, s.length
        kv_len = max(s.length for s in seqs) + 1
        pos = torch.tensor(positions, device=dev)
        write = torch.tensor(writes, device=dev)
        # a row not decoding sees every key (finite garbage at worst): its logits are ignored
        mask = torch.arange(kv_len, device=dev)[None, :] <= write[:, None]
        ctx = module.decoder.context(pos[:, None], kv_len - 1, kv_len, mask[:, None, None, :])
        ctx.row_slots = write
        if self._version != (version, n):
            self._version = (version, n)
            media = PackedMedia(seqs, n).context(dev)
            media.gathered = gather_media(module, media, model.backend)
            self._media = media
        return module(torch.tensor(tokens, device=dev)[:, None], ctx, self.cache.rows(n), self._media,
                      logits_for="last")

    def _fixed(self, seqs, n: int, version: int) -> torch.Tensor:
        step = self._steps.get(n)
        if self._version != (version, n) or step is None:
            self._version = (version, n)
            packed = PackedMedia(seqs, n)
            pool = self._fill_pool(packed)
            key_gen = self._pool_generation
            if step is None or step.pool_generation != key_gen:
                step = SlotDecodeStep(self.model, self.cache, n, pool, self._pool_len, key_gen,
                                      use_graph=self.use_graph, capture_lock=self.capture_lock)
                self._steps[n] = step
            step.set_media(packed)
        tokens, positions, writes, ends = [0] * n, [0] * n, [self.cache.scratch] * n, [0] * n
        for s in seqs:
            tokens[s.slot], positions[s.slot], writes[s.slot], ends[s.slot] = (s.last_token, s.length, s.length,
                                                                               s.length + 1)
        return step(tokens, positions, writes, ends)

    def _fill_pool(self, packed: PackedMedia) -> list:
        """The decode media copied into the pool (grown when too small: graphs over the old pool
        are dropped); full-capacity views, so a step's addresses stay the same."""
        kv = packed.kv
        if not kv:
            return []
        n = kv[0][0].shape[0]
        pool = self._pool
        if not pool or pool[0][0].shape[0] < n:
            cap = max(n, 2 * pool[0][0].shape[0]) if pool else max(n, 2 * self.cache.slots)
            self._pool = pool = [(k.new_zeros((cap,) + tuple(k.shape[1:])), v.new_zeros((cap,) + tuple(v.shape[1:])))
                                 for k, v in kv]
            self._pool_len = packed.media_len.new_zeros(cap) if packed.mllama else None
            self._pool_generation += 1
            self._steps.clear()
        for (pk, pv), (k, v) in zip(pool, kv):
            pk[:n].copy_(k)
            pv[:n].copy_(v)
        if packed.mllama:
            self._pool_len[:n].copy_(packed.media_len)
        return pool


class SlotDecodeStep(StaticDecodeStep):
    """The fixed-shape decode step of one bucket of n rows: every input lives in a buffer of the
    step, so on CUDA it is captured once as a graph (StaticDecodeStep's capture) and replayed."""

    def __init__(self, model, cache, n: int, pool: list, pool_len: torch.Tensor | None, pool_generation: int, *,
                 use_graph: bool, capture_lock):
        dev = model.device
        self.capture_lock = capture_lock
        media = MediaContext(kv=pool, text_time=torch.zeros(n, 1, dtype=torch.int32, device=dev),
                             media_start=torch.zeros(n, dtype=torch.int32, device=dev),
                             media_count=torch.zeros(n, dtype=torch.int32, device=dev), any_media=bool(pool),
                             media_len=pool_len if pool else None,
                             text_time_first=torch.zeros(n, 1, dtype=torch.int32, device=dev)
                             if pool and pool_len is not None else None)
        super().__init__(model, cache.rows(n), media, torch.zeros(n, dtype=torch.long, device=dev),
                         use_graph=use_graph)
        self.pool_generation = pool_generation
        self.positions = torch.zeros(n, dtype=torch.long, device=dev)
        self.writes = torch.zeros(n, dtype=torch.long, device=dev)
        self.key_start = torch.zeros(n, dtype=torch.long, device=dev)
        self.key_end = torch.zeros(n, dtype=torch.long, device=dev)

    def set_media(self, packed: PackedMedia) -> None:
        """Point each row at its media in the pool (filled by SlotDecoder._fill_pool)."""
        media = packed.context(self.media.media_start.device)
        self.media.media_start.copy_(media.media_start)
        self.media.media_count.copy_(media.media_count)
        self.media.text_time.copy_(media.text_time)
        if self.media.text_time_first is not None and media.text_time_first is not None:
            self.media.text_time_first.copy_(media.text_time_first)

    def _forward(self) -> torch.Tensor:
        module = self.model.module
        decoder = module.decoder
        positions = self.positions[:, None]
        ctx = StepContext(positions=positions, slot=self.writes, kv_len=self.cache.max_len,
                          rope=decoder.rope(positions), key_start=self.key_start, key_end=self.key_end,
                          alibi_slopes=decoder.alibi_slopes(positions.device), backend=self.model.backend,
                          row_slots=self.writes)
        return module(self.tokens, ctx, self.cache, self.media, logits_for="last")

    def __call__(self, tokens: list[int], positions: list[int], writes: list[int], ends: list[int]) -> torch.Tensor:
        """Per row: its token, position, write slot and key end (0 for a row not decoding: no keys)."""
        dev = self.tokens.device
        # one host-to-device copy for the four inputs
        packed = torch.tensor([tokens, positions, writes, ends], dtype=torch.long).to(dev, non_blocking=True)
        self.tokens.copy_(packed[0, :, None])
        self.positions.copy_(packed[1])
        self.writes.copy_(packed[2])
        self.key_end.copy_(packed[3])
        return self._run(self.capture_lock)
