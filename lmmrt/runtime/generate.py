"""Prefill + decode loop over a static KV cache and a media K/V cache.

Media are encoded once (vision encoder + perceiver, all media of the batch together) and each
cross-attention block's K/V are projected once into the media cache; every decode step reads
them. Prompts are left-padded to a common length so all rows decode at the same cache slot;
positions count from each row's first real token, so padding never changes the result.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch

from lmmrt.models.xattn import MediaContext
from lmmrt.runtime.batch import Batch, build_batch
from lmmrt.runtime.decode_plan import DecodePlan, EagerDecode, gather_media
from lmmrt.runtime.generation_args import check_generation_args
from lmmrt.runtime.kv_cache import KVCache
from lmmrt.runtime.sampling import NAN_TOKEN, apply_repetition_penalty, sample
from lmmrt.runtime.static_decode import FixedDecode, graph_capturable, length_bucket, uses_fixed_step

# Finished rows are dropped once at most this fraction of the running batch is live: a compaction
# copies the live rows' KV cache (about what one step reads), so it pays off when it drops many rows.
COMPACT_LIVE_FRACTION = 0.5


@dataclass
class GenerationResult:
    text: str
    token_ids: list[int]  # new tokens only
    finish_reason: str  # "stop" (eos, stop token or stop string) | "length"
    prompt_tokens: int = 0


@dataclass
class GenerationStats:
    batch: int = 0
    prompt_tokens: int = 0
    new_tokens: int = 0
    media_s: float = 0.0  # vision encoder + perceiver + media K/V projection
    prefill_s: float = 0.0  # includes media_s: time to the first token
    decode_s: float = 0.0
    decode_steps: int = 0
    decode_tokens: int = 0  # tokens of the steps after the first (rows that have finished give none)
    extra: dict = field(default_factory=dict)

    @property
    def decode_tokens_per_s(self) -> float:
        return self.decode_tokens / self.decode_s if self.decode_s > 0 else float("nan")

    @property
    def ms_per_step(self) -> float:
        return 1e3 * self.decode_s / self.decode_steps if self.decode_steps else float("nan")

    def summary(self) -> str:
        parts = [f"media {1e3 * self.media_s:.1f} ms", f"prefill (incl. media) {1e3 * self.prefill_s:.1f} ms"]
        if self.decode_steps:
            parts.append(f"decode {self.ms_per_step:.2f} ms/token, {self.decode_tokens_per_s:.1f} tokens/s")
        else:
            parts.append("no decode steps")
        return ", ".join(parts)


def encode_batch_media(model, batch: Batch) -> tuple[torch.Tensor | None, list]:
    """Vision + perceiver for every media item of the batch, grouped by frame count so each group
    is one launch; then each block's K/V. Returns (latents (N, L, Dv) or None, kv per block)."""
    module = model.module
    if not batch.media:
        return None, []
    if batch.aspect_ratio_ids is not None:  # Mllama: every image is max_num_tiles tiles, one launch
        px = torch.stack(batch.media).to(model.device)
        latents = module.encode_media(px, batch.media_time, aspect_ratio_ids=batch.aspect_ratio_ids,
                                      aspect_ratio_mask=batch.aspect_ratio_mask)
        return latents, module.project_media(latents)
    n = len(batch.media)
    by_frames: dict[int, list[int]] = {}
    for i, px in enumerate(batch.media):
        by_frames.setdefault(px.shape[0], []).append(i)
    latents = None
    for _, idx in by_frames.items():
        px = torch.stack([batch.media[i] for i in idx]).to(model.device)
        lat = module.encode_media(px, batch.media_time[idx])
        if latents is None:
            latents = lat.new_empty((n,) + tuple(lat.shape[1:]))
        latents[idx] = lat
    return latents, module.project_media(latents)


def precomputed_media(model, batch: Batch, media_latents) -> tuple[torch.Tensor | None, list]:
    """Media encoded ahead of time (e.g. on another CUDA stream by the video pipeline) for the
    media items of `batch`, in batch order: latents (N, L, Dv), whose K/V are projected here, or
    (latents, kv per block) as returned by encode_batch_media. The caller orders the streams."""
    latents, kv = (media_latents, None) if isinstance(media_latents, torch.Tensor) else media_latents
    n = len(batch.media)
    got = 0 if latents is None else latents.shape[0]
    if got != n:
        raise ValueError(f"media_latents hold {got} media item(s) but the prompts have {n}")
    if n == 0:
        return None, []
    return latents, (model.module.project_media(latents) if kv is None else list(kv))


def run_prefill(model, batch: Batch, cache: KVCache, logits_for: str = "last", media_latents=None,
                stats: GenerationStats | None = None, clock: _Clock | None = None):
    """Media encoding + the prompt forward. Returns (logits, MediaContext for decode).
    media_latents: already-encoded media (see precomputed_media); default: encode here.
    clock: when given, marks before and after the media encoding go to stats (see _Clock)."""
    module = model.module
    before = clock.mark() if clock is not None else None
    if media_latents is None:
        latents, kv = encode_batch_media(model, batch)
    else:
        latents, kv = precomputed_media(model, batch, media_latents)
    if clock is not None and stats is not None:
        stats.extra["_media_marks"] = (before, clock.mark())
    media = _media_context(batch, kv, slice(None))
    ctx = DecodePlan(module, batch).prefill_context(batch.tokens.shape[1])
    logits = module(batch.tokens, ctx, cache, media, logits_for=logits_for)
    # Decode tokens keep the media of the last prompt token (as the reference implementations do).
    return logits, _media_context(batch, kv, slice(-1, None))


def _media_context(batch: Batch, kv: list, tokens: slice) -> MediaContext:
    """The MediaContext of the batch's `tokens` (all of the prompt, or its last token for decode)."""
    first = batch.text_time_first
    return MediaContext(kv=kv, text_time=batch.text_time[:, tokens].contiguous(), media_start=batch.media_start,
                        media_count=batch.media_count, any_media=bool(batch.media),
                        text_time_first=None if first is None else first[:, tokens].contiguous(),
                        media_len=batch.media_len)


class _Clock:
    """Device progress seen from the host without a device-wide synchronize: CUDA events on the
    current stream (read once a later host wait has passed them), else host time (CPU ops are
    synchronous)."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"

    def mark(self):
        if not self.cuda:
            return time.perf_counter()
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def seconds(self, start, end) -> float:
        return start.elapsed_time(end) / 1e3 if self.cuda else end - start

    def wait(self, mark) -> None:
        """Block the host until the device has passed `mark` (host marks: already passed)."""
        if self.cuda:
            mark.synchronize()


@torch.inference_mode()
def prompt_logits(model, prompts, images=None) -> list[torch.Tensor]:
    batch = build_batch(model, prompts, images)
    cache = KVCache.allocate(model.config.decoder, batch.size, batch.tokens.shape[1], model.dtype, model.device)
    logits, _ = run_prefill(model, batch, cache, logits_for="all")
    T = batch.tokens.shape[1]
    return [logits[b, T - n:].cpu() for b, n in enumerate(batch.lengths)]


def generate_steps(model, prompts, images=None, *, max_new_tokens=64, temperature=0.0, top_k=0, top_p=1.0,
                   repetition_penalty=1.0, stop=None, stop_token_ids=None, ignore_eos=False, seed=None,
                   stats: GenerationStats | None = None, media_latents=None,
                   on_step=None) -> Iterator[tuple[list[int], list[str | None]]]:
    """Yields, per decode step, (token of each row or -1 when finished, finish reason or None).
    The caller turns that into results or a text stream. It may send back (generator.send) the
    prompt indices it ended itself after that step (a stop string found in their text): those rows
    then count as finished here, so they yield -1, add no more tokens to `stats` and are dropped by
    compaction like rows ended by a stop token. A plain `for` loop sends None: nothing ended.

    media_latents: media already encoded for `images` (see precomputed_media), so prefill skips
    the vision encoder and perceiver. on_step: called on the host between decode steps (the video
    pipeline launches the next chunk's encoding there, on its own CUDA stream)."""
    args = check_generation_args(model, max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k,
                                 top_p=top_p, repetition_penalty=repetition_penalty, stop=stop,
                                 stop_token_ids=stop_token_ids, ignore_eos=ignore_eos, seed=seed)
    max_new_tokens, temperature, top_k, top_p = args.max_new_tokens, args.temperature, args.top_k, args.top_p
    repetition_penalty, seed = args.repetition_penalty, args.seed
    stats = stats if stats is not None else GenerationStats()
    dev = model.device
    t0 = time.perf_counter()
    batch = build_batch(model, prompts, images, max_new_tokens=max_new_tokens)
    B, T = batch.tokens.shape
    stats.batch, stats.prompt_tokens = B, sum(batch.lengths)
    stats.extra["prompt_lengths"] = list(batch.lengths)
    if max_new_tokens == 0:
        return
    generator = None
    if seed is not None:
        generator = torch.Generator(device=dev)
        generator.manual_seed(seed)
    module, clock = model.module, _Clock(dev)
    state = getattr(model, "decode_state", None)
    # The model's KV pool serves one generation at a time; one started while another is still
    # being consumed (two live streams) gets a cache of its own.
    pool = state.kv if state is not None and not state.kv.in_use else None
    fixed = uses_fixed_step(model)
    use_graph = fixed and pool is not None and state.graph_error is None and graph_capturable(model)
    if getattr(model, "cuda_graph", False) == "auto" and not use_graph:
        fixed = False  # without a graph the eager step is the faster one
    cache_len = length_bucket(T + max_new_tokens) if use_graph else T + max_new_tokens
    try:
        if pool is not None:
            pool.in_use = True
            cache = pool.view(model.config.decoder, B, cache_len, model.dtype, dev)
        else:
            cache = KVCache.allocate(model.config.decoder, B, cache_len, model.dtype, dev)
        # inference_mode wraps the compute only, never a `yield`: a suspended generator would leave
        # it switched on in the caller's code between steps.
        with torch.inference_mode():
            logits, media = run_prefill(model, batch, cache, logits_for="last", media_latents=media_latents,
                                        stats=stats, clock=clock)
            seen = None if repetition_penalty == 1.0 else _prompt_tokens_seen(batch, logits.shape[-1])
            if use_graph:  # a CUDA graph per bucket, captured once per model and replayed
                decode = FixedDecode(model, cache, media, batch.pad, state=state)
            else:
                media.gathered = gather_media(module, media, model.backend)
                if fixed:
                    decode = FixedDecode(model, cache, media, batch.pad, state=None)
                else:
                    decode = EagerDecode(module, batch, cache, media)
        yield from _decode_loop(decode, logits, B, T, max_new_tokens, args.stop_ids, sample_kw=dict(
            temperature=temperature, top_k=top_k, top_p=top_p, generator=generator), seen=seen,
            repetition_penalty=repetition_penalty, stats=stats, clock=clock, t0=t0, on_step=on_step,
            overlap=clock.cuda)
    finally:
        if pool is not None:
            pool.in_use = False


def _prompt_tokens_seen(batch: Batch, vocab: int) -> torch.Tensor:
    """(B, vocab) bool: the tokens of each prompt (not its left padding) that the logits score; Mllama's
    embedding has rows the head does not score (<|image|>, ...), which no penalty can reach."""
    B, T = batch.tokens.shape
    seen = torch.zeros(B, vocab, dtype=torch.bool, device=batch.tokens.device)
    for b in range(B):
        ids = batch.tokens[b, T - batch.lengths[b]:]
        seen[b, ids[ids < vocab]] = True
    return seen


def _sample(logits: torch.Tensor, kept: torch.Tensor | None, B: int, sample_kw: dict) -> torch.Tensor:
    """sample() for the running rows, `kept` (their prompt indices, None before any was dropped).
    A seeded sampler draws its noise for the whole (rows, vocab) tensor, so after a compaction the
    running rows' logits go back to their places in a (B, vocab) tensor: each row then draws the
    noise it would have drawn uncompacted, and a seeded run samples the same tokens either way."""
    if kept is None or sample_kw["temperature"] <= 0.0 or sample_kw["generator"] is None:
        return sample(logits, **sample_kw)
    full = logits.new_zeros(B, logits.shape[-1]).index_copy_(0, kept, logits)
    return sample(full, **sample_kw).index_select(0, kept)


def _decode_loop(decode, logits, B: int, T: int, max_new_tokens: int, stop_ids, *, sample_kw: dict, seen,
                 repetition_penalty: float, stats: GenerationStats, clock: _Clock, t0: float, on_step,
                 overlap: bool):
    """Sample, hand the tokens to the host, decode the next step; one host sync per step. With
    `overlap` (on CUDA) the tokens go non-blocking into pinned memory and step k + 1 is queued
    before waiting for step k's tokens, so the device never idles on the host's bookkeeping. Once at
    most COMPACT_LIVE_FRACTION of the running rows are live, the finished ones are dropped (when
    `decode` finds it worth it for the steps left): the live rows' tokens, or with overlap the
    logits of the step already queued, are kept and `decode` selects their cache rows."""
    host = torch.empty(B, dtype=torch.long, pin_memory=clock.cuda) if overlap else None
    rows = list(range(B))  # the prompt index of each row of the running batch
    kept = None  # rows on the device, once some were dropped
    finished = [False] * B
    for step in range(max_new_tokens):
        last = step == max_new_tokens - 1
        with torch.inference_mode():
            if seen is not None:
                logits = apply_repetition_penalty(logits, seen, repetition_penalty)
            nxt = _sample(logits, kept, B, sample_kw)
            if seen is not None:
                seen.scatter_(1, nxt.clamp(min=0)[:, None], True)
            if overlap:
                host[:len(rows)].copy_(nxt, non_blocking=True)
                copied = clock.mark()
                if not last:
                    logits = decode(nxt, T + step)
        if overlap:
            clock.wait(copied)
            toks = host[:len(rows)].tolist()
        else:
            toks = nxt.tolist()  # the one host sync per step
        now = time.perf_counter()
        if step == 0:
            stats.prefill_s = now - t0
            marks = stats.extra.pop("_media_marks", None)
            if marks is not None:  # both marks precede the token copy just waited for
                stats.media_s = clock.seconds(*marks)
            t_dec = now
        else:
            stats.decode_s, stats.decode_steps = now - t_dec, step
        nan_rows = [b for b, t in zip(rows, toks) if not finished[b] and t == NAN_TOKEN]
        if nan_rows:
            raise ValueError(f"the model produced NaN logits for prompt {nan_rows[0]} at decode step {step} "
                             f"(step 0 follows the prompt; prompts with NaN: {nan_rows}): no token can be "
                             "sampled. Check the weights and the dtype (float16 can overflow).")
        out, reasons = [-1] * B, [None] * B
        for b, t in zip(rows, toks):
            if finished[b]:
                continue
            out[b] = t
            if t in stop_ids:
                finished[b], reasons[b] = True, "stop"
            elif last:
                finished[b], reasons[b] = True, "length"
        emitted = sum(1 for t in out if t >= 0)
        stats.new_tokens += emitted
        if step > 0:
            stats.decode_tokens += emitted
        ended = yield out, reasons
        for b in ended or ():
            finished[b] = True
        if all(finished) or last:
            break
        if on_step is not None:
            on_step()
        live = [i for i, b in enumerate(rows) if not finished[b]]
        # decode calls to come: this step's (unless overlap queued it already) and those of the
        # steps after this one but the last
        steps_left = max_new_tokens - 1 - step - int(overlap)
        with torch.inference_mode():
            if len(live) <= COMPACT_LIVE_FRACTION * len(rows) and decode.worth_compacting(steps_left):
                # non_blocking: a plain copy to the device would wait for the step overlap queued
                keep = torch.tensor(live).to(nxt.device, non_blocking=True)
                if overlap:
                    logits = logits[keep]
                else:
                    nxt = nxt[keep]
                seen = None if seen is None else seen[keep]
                decode.select(keep)
                rows = [rows[i] for i in live]
                kept = torch.tensor(rows).to(nxt.device, non_blocking=True)
            if not overlap:
                logits = decode(nxt, T + step)
