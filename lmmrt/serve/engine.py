"""The continuous-batching engine behind `lmmrt serve`.

Requests are checked when they are submitted (prompt, markers against images, image decoding,
context length, sampling options: the errors lmmrt.generate gives) and wait in a bounded queue.
A scheduler thread repeats one step: retire cancelled requests, admit queued ones into free KV
slot rows (their media encoded, or found in the media cache), run prefill chunks for newcomers
within the step's token budget (token_budget minus one token per decoding row), then one decode
step for every decoding row. Requests thus join and leave between decode steps; a finished or
cancelled request frees its row at once. Each row sits at its own position, so a greedy request
gets the tokens it gets alone.
"""

from __future__ import annotations

import logging
import math
import threading
import time
import uuid
from collections import deque

import torch

from lmmrt.runtime.batch import build_batch
from lmmrt.runtime.generation_args import check_generation_args
from lmmrt.runtime.sampling import NAN_TOKEN
from lmmrt.runtime.static_decode import uses_fixed_step
from lmmrt.serve.kv_slots import SlotKVCache, kv_budget
from lmmrt.serve.media import attach_media, media_keys
from lmmrt.serve.media_cache import MediaCache, model_tag
from lmmrt.serve.prefill import prefill_chunk, prefill_prompts
from lmmrt.serve.requests import Delta, EngineClosed, EngineRequest, Finished, QueueFull, RequestHandle
from lmmrt.serve.sequence import NAN_MESSAGE, Sequence, sample_rows
from lmmrt.serve.steps import SlotDecoder

__all__ = ["Delta", "Engine", "EngineClosed", "EngineRequest", "Finished", "QueueFull", "RequestHandle"]

log = logging.getLogger(__name__)
_SAMPLES = 1024  # TTFT / latency samples kept for metrics()


def _positive_int(name: str, value, *, lo: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < lo:
        raise ValueError(f"{name} must be an int >= {lo}, got {value!r}")
    return value


class Engine:
    """Serves one lmmrt.Model (see the module docstring). max_batch: KV slot rows at most (fewer
    when the budget holds fewer); max_queue: requests waiting for a row before submit refuses
    (QueueFull); max_memory: KV cache bytes, else memory_fraction of free CUDA memory less
    media_cache_bytes (CPU: 4 GiB); token_budget: prompt + decode tokens per step;
    media_cache_bytes: the media cache's budget; max_context: tokens per row (default the model's
    context); fixed_step: decode with the fixed-shape step (a CUDA graph per batch bucket),
    default the model's cuda_graph choice."""

    def __init__(self, model, *, max_batch: int = 16, max_queue: int = 64, max_memory: int | None = None,
                 memory_fraction: float = 0.9, token_budget: int = 512, media_cache_bytes: int = 1 << 30,
                 max_context: int | None = None, fixed_step: bool | None = None):
        if not hasattr(model, "module") or not hasattr(model.module, "run_decoder"):
            raise TypeError(f"Engine serves a generative lmmrt.Model (lmmrt.load), got {type(model).__name__}")
        cfg = model.config
        self.model = model
        self.max_queue = _positive_int("max_queue", max_queue)
        self.token_budget = _positive_int("token_budget", token_budget)
        limit = cfg.decoder.max_seq_len
        self.max_context = limit if max_context is None else _positive_int("max_context", max_context, lo=2)
        if self.max_context > limit:
            raise ValueError(f"max_context={max_context} is beyond the model's context of {limit} tokens")
        if max_memory is not None:
            _positive_int("max_memory", max_memory)
        if isinstance(memory_fraction, bool) or not isinstance(memory_fraction, (int, float)) \
                or not 0 < memory_fraction <= 1:
            raise ValueError(f"memory_fraction must be in (0, 1], got {memory_fraction!r}")
        self.media_cache = MediaCache(media_cache_bytes)
        budget = kv_budget(model.device, max_memory=max_memory, memory_fraction=memory_fraction,
                           reserved=media_cache_bytes)
        self.kv = SlotKVCache.for_budget(cfg.decoder, max_batch=_positive_int("max_batch", max_batch),
                                         max_context=self.max_context, budget=budget, dtype=model.dtype,
                                         device=model.device)
        self._tag = model_tag(model)
        # media-time embeddings make an item's encoding depend on its place in the prompt
        perceiver = getattr(cfg, "perceiver", None)
        self._media_time_matters = perceiver is not None and perceiver.max_media_time > 0
        fixed = uses_fixed_step(model) if fixed_step is None else bool(fixed_step)
        # submit's device work (image preprocessing on the GPU, media keys) and graph capture exclude
        # each other (see SlotDecoder)
        self._device_lock = threading.Lock()
        self.decoder = SlotDecoder(model, self.kv, fixed=fixed, capture_lock=self._device_lock)
        self._min_chunk = max(1, self.token_budget // 4)  # a prefill's progress per step at the least
        self._cond = threading.Condition()
        self._queue: deque[Sequence] = deque()
        self._prefilling: list[Sequence] = []
        self._decoding: list[Sequence] = []
        self._version = 0  # changes whenever the set of decoding rows does
        self._closing = False
        self._deadline = math.inf
        self._thread: threading.Thread | None = None
        self._counts = {"tokens_generated": 0, "prompt_tokens": 0, "requests_finished": 0,
                        "requests_cancelled": 0, "requests_failed": 0, "steps": 0, "decode_steps": 0,
                        "prefill_batches": 0, "prefill_chunks": 0}
        self._ttft: deque[float] = deque(maxlen=_SAMPLES)
        self._latency: deque[float] = deque(maxlen=_SAMPLES)

    # --- the client side (any thread) -----------------------------------------------------------
    def submit(self, req: EngineRequest) -> RequestHandle:
        """Check `req` and queue it. ValueError / TypeError name what is wrong; QueueFull when the
        queue is full; EngineClosed once shutdown has begun."""
        if not isinstance(req, EngineRequest):
            raise TypeError(f"submit takes an EngineRequest, got {type(req).__name__}")
        model = self.model
        stop = req.stop if isinstance(req.stop, str) or req.stop is None else list(req.stop)
        args = check_generation_args(model, max_new_tokens=req.max_tokens, temperature=req.temperature,
                                     top_k=req.top_k, top_p=req.top_p, stop=stop or None, ignore_eos=req.ignore_eos,
                                     seed=req.seed)
        if args.max_new_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {args.max_new_tokens}")
        images = [] if req.images is None else req.images
        if not isinstance(images, (list, tuple)):
            raise TypeError(f"images must be a list of media items (one per marker), got {type(images).__name__}")
        with self._device_lock:
            try:
                batch = build_batch(model, [req.prompt], [list(images)], max_new_tokens=args.max_new_tokens)
            except OSError as e:  # PIL: a truncated or corrupt image, found when its pixels are read
                raise ValueError(f"an image cannot be decoded: {e}") from None
            ids = batch.tokens[0].tolist()
            if len(ids) + args.max_new_tokens > self.max_context:
                raise ValueError(f"the prompt has {len(ids)} tokens; with max_tokens={args.max_new_tokens} that "
                                 f"is {len(ids) + args.max_new_tokens}, beyond this server's context of "
                                 f"{self.max_context} tokens")
            keys = media_keys(batch, self._tag, media_time_matters=self._media_time_matters)
            handle = RequestHandle(f"req-{uuid.uuid4().hex[:16]}", len(ids), self._wake)
            seq = Sequence(handle, batch, ids, args, keys, model.tokenizer, model.device)
        with self._cond:
            self._check_room()
            self._queue.append(seq)
            self._cond.notify_all()
        return handle

    def check_room(self) -> None:
        """Raise what submit would for want of room (QueueFull, EngineClosed) now: the server asks before
        it decodes a request's images, so that one it would refuse takes no memory. submit checks again."""
        with self._cond:
            self._check_room()

    def _check_room(self) -> None:
        if self._closing:
            raise EngineClosed("the engine is shutting down and takes no new request")
        # the queue's head takes the free rows at the scheduler's next step: those are room too (else a
        # burst of max_queue + 1 requests onto an idle engine is refused while its rows are free)
        if len(self._queue) >= self.max_queue + self.kv.free:
            raise QueueFull(f"the request queue is full ({self.max_queue} waiting); try again later",
                            retry_after=self._retry_after())

    def metrics(self) -> dict:
        """Gauges and counters: queue_len, running (prefilling + decoding), kv_used / kv_total (slot
        rows), kv_tokens_used / kv_tokens_total, tokens_generated, ttft_s (recent samples),
        requests finished / cancelled / failed, media_cache hits / misses / bytes."""
        with self._cond:
            queue_len = len(self._queue)
            prefilling, decoding = list(self._prefilling), list(self._decoding)
        running = prefilling + decoding
        return {"queue_len": queue_len, "running": len(running), "prefilling": len(prefilling),
                "decoding": len(decoding), "kv_used": len(running), "kv_total": self.kv.slots,
                "kv_tokens_used": sum(max(s.length, s.prefilled) for s in running),
                "kv_tokens_total": self.kv.slots * self.max_context, "kv_bytes": self.kv.nbytes,
                "max_queue": self.max_queue, "ttft_s": list(self._ttft), "latency_s": list(self._latency),
                **self._counts, **self.media_cache.stats()}

    # --- lifecycle --------------------------------------------------------------------------------
    def start(self) -> None:
        """Run the scheduler on a background thread."""
        with self._cond:
            if self._closing:
                raise EngineClosed("the engine was shut down")
            if self._thread is not None:
                return
            self._thread = threading.Thread(target=self._run, name="lmmrt-serve-scheduler", daemon=True)
            self._thread.start()

    def begin_shutdown(self, grace_s: float = 10.0) -> None:
        """Admit nothing new from now on, and cancel what is still running grace_s seconds from now;
        returns at once (the server calls it at SIGTERM, so that the grace period starts there). A
        later call never extends the first one's deadline."""
        with self._cond:
            self._closing = True
            self._deadline = min(self._deadline, time.monotonic() + max(0.0, grace_s))
            self._cond.notify_all()

    def shutdown(self, grace_s: float = 10.0) -> None:
        """Admit nothing new; let queued and running requests finish for up to grace_s seconds (counted
        from begin_shutdown when that came first), then cancel what is left; stop the scheduler thread."""
        self.begin_shutdown(grace_s)
        with self._cond:
            thread = self._thread
        if thread is not None:
            thread.join()
        else:
            self._cancel_all()

    @property
    def alive(self) -> bool:
        """Whether the scheduler thread is running."""
        return self._thread is not None and self._thread.is_alive()

    def __enter__(self) -> Engine:
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.shutdown()

    def _wake(self) -> None:
        with self._cond:
            self._cond.notify_all()

    def _retry_after(self) -> int:
        recent = list(self._latency)[-32:]
        per_request = sum(recent) / len(recent) if recent else 1.0
        return max(1, min(60, math.ceil(len(self._queue) * per_request / self.kv.slots)))

    def _run(self) -> None:
        with torch.inference_mode():
            while True:
                with self._cond:
                    busy = bool(self._queue or self._prefilling or self._decoding)
                    if self._closing and (not busy or time.monotonic() >= self._deadline):
                        break
                    if not busy:
                        self._cond.wait(timeout=0.5)
                        continue
                self.step()
        self._cancel_all()

    def _cancel_all(self) -> None:
        with self._cond:
            queued = list(self._queue)
            self._queue.clear()
        for s in queued:
            self._counts["requests_cancelled"] += 1
            s.finish("cancelled")
        for s in self._prefilling + self._decoding:
            self._retire(s, "cancelled")

    # --- the scheduler (its thread, or a caller driving step() itself) --------------------------
    @torch.inference_mode()
    def step(self) -> None:
        """One scheduler iteration: retire cancelled requests, admit, prefill chunks, one decode step."""
        self._counts["steps"] += 1
        try:
            self._reap_cancelled()
            self._admit()
            self._prefill()
            self._decode()
        except Exception as e:  # noqa: BLE001 - a scheduler bug must not hang every client
            log.exception("lmmrt serve: scheduler step failed")
            for s in self._prefilling + self._decoding:
                self._retire(s, "error", f"internal error in the scheduler: {type(e).__name__}: {e}")

    def _reap_cancelled(self) -> None:
        with self._cond:
            gone = [s for s in self._queue if s.handle.cancel_requested]
            for s in gone:
                self._queue.remove(s)
        for s in gone:
            self._counts["requests_cancelled"] += 1
            s.finish("cancelled")
        for s in self._prefilling + self._decoding:
            if s.handle.cancel_requested:
                self._retire(s, "cancelled")

    def _admit(self) -> None:
        while self.kv.free:
            with self._cond:
                if not self._queue:
                    return
                s = self._queue.popleft()
            s.slot = self.kv.acquire()
            self._prefilling.append(s)
            try:
                attach_media(self.model, self.media_cache, s)
            except Exception as e:  # noqa: BLE001 - this request fails, the others go on
                log.exception("lmmrt serve: media encoding failed for %s", s.handle.id)
                self._retire(s, "error", f"media encoding failed: {type(e).__name__}: {e}")

    def _prefill(self) -> None:
        """Newcomers whose whole prompts fit the step's budget (padded to the longest) in one
        forward; then chunks, first come first served, while budget is left (one at the least)."""
        budget = self.token_budget - len(self._decoding)
        whole: list[Sequence] = []
        for s in self._prefilling:
            if s.prefilled or (len(whole) + 1) * max([s.prompt_len] + [w.prompt_len for w in whole]) > budget:
                break
            whole.append(s)
        if len(whole) > 1:
            try:
                logits = prefill_prompts(self.model, self.kv, whole)
                toks = sample_rows(logits, list(enumerate(whole)))
            except Exception as e:  # noqa: BLE001 - these requests fail, the others go on
                log.exception("lmmrt serve: prefill failed")
                for s in whole:
                    self._retire(s, "error", f"prefill failed: {type(e).__name__}: {e}")
                return
            budget -= len(whole) * max(s.prompt_len for s in whole)
            self._counts["prefill_batches"] += 1
            for s, tok in zip(whole, toks):
                s.prefilled = s.prompt_len
                self._prefilled(s, tok)
        ran = len(whole) > 1
        for s in list(self._prefilling):
            if ran and budget <= 0:
                break
            chunk = min(s.prompt_len - s.prefilled, max(budget, self._min_chunk))
            try:
                logits = prefill_chunk(self.model, self.kv, s, s.prefilled + chunk)
                s.prefilled += chunk
                tok = sample_rows(logits, [(0, s)])[0] if s.prefilled == s.prompt_len else None
            except Exception as e:  # noqa: BLE001 - this request fails, the others go on
                log.exception("lmmrt serve: prefill failed for %s", s.handle.id)
                self._retire(s, "error", f"prefill failed: {type(e).__name__}: {e}")
                continue
            budget -= chunk
            ran = True
            self._counts["prefill_chunks"] += 1
            if tok is not None:
                self._prefilled(s, tok)

    def _prefilled(self, s: Sequence, tok: int) -> None:
        """s's prompt is in its row and `tok` is its first token: on to decoding (unless it ended)."""
        self._prefilling.remove(s)
        s.length = s.prompt_len
        self._counts["prompt_tokens"] += s.prompt_len
        self._ttft.append(time.perf_counter() - s.submitted)
        if self._take(s, tok):
            self._decoding.append(s)
            self._version += 1

    def _decode(self) -> None:
        rows = self._decoding
        if not rows:
            return
        try:
            logits = self.decoder(rows, self._version)
            toks = sample_rows(logits, [(s.slot, s) for s in rows])
        except Exception as e:  # noqa: BLE001 - the step's requests fail, the engine goes on
            log.exception("lmmrt serve: decode step failed")
            for s in list(rows):
                self._retire(s, "error", f"decode step failed: {type(e).__name__}: {e}")
            return
        self._counts["decode_steps"] += 1
        for s, tok in zip(list(rows), toks):
            s.length += 1
            self._take(s, tok)

    def _take(self, s: Sequence, tok: int) -> bool:
        """Hand s its next token; False when s has ended (finished, or NaN logits)."""
        if tok == NAN_TOKEN:
            self._retire(s, "error", NAN_MESSAGE)
            return False
        self._counts["tokens_generated"] += 1
        if s.accept(tok):
            self._retire(s)
            return False
        return True

    def _retire(self, s: Sequence, reason: str | None = None, error: str | None = None) -> None:
        """End s: free its row and media at once, send its Finished."""
        if s in self._decoding:
            self._decoding.remove(s)
            self._version += 1
        if s in self._prefilling:
            self._prefilling.remove(s)
        final = reason or s.row_text.reason
        if s.slot >= 0:
            if final == "error":  # it may have left NaN in its row (see kv_slots)
                self.kv.clear(s.slot)
            self.kv.release(s.slot)
            s.slot = -1
        s.media_kv, s.features = [], None
        # counted before the client hears of it: metrics read after result() include it
        key = {"cancelled": "requests_cancelled", "error": "requests_failed"}.get(final, "requests_finished")
        self._counts[key] += 1
        self._latency.append(time.perf_counter() - s.submitted)
        s.finish(final, error)
