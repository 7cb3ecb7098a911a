"""Streaming video generation: each chunk of frames is its own prompt; chunk k+1 is encoded on a
side CUDA stream (events order it, record_stream guards its memory) while chunk k decodes. On the
CPU the same pipeline runs inline and gives the tokens of the sequential run. Sources, clips and
prompts: lmmrt.runtime.video.
"""

from __future__ import annotations

import contextlib
import queue
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from lmmrt.runtime import text_output
from lmmrt.runtime.frame_sampling import check_count
from lmmrt.runtime.generation_args import check_generation_args
from lmmrt.runtime.video import (
    VIDEO,
    VideoClip,
    clip_media_items,
    clip_pixels,
    fill_video_markers,
    iter_chunks,
    load_video,
    resolve_mode,
)


# --- streaming: encode chunk k+1 while decoding chunk k -------------------------------------------
class VideoChunkText(tuple):
    """(chunk index, text) of one chunk. Also: .result (GenerationResult: token_ids, finish_reason),
    .timestamps / .frame_indices of the chunk's frames, .stats (GenerationStats of its decode)."""

    def __new__(cls, index: int, result, clip: VideoClip, stats):
        self = super().__new__(cls, (index, result.text))
        self.result, self.stats = result, stats
        self.timestamps, self.frame_indices = clip.timestamps, clip.indices
        return self

    @property
    def index(self) -> int:
        return self[0]

    @property
    def text(self) -> str:
        return self[1]


@dataclass
class _Encoded:
    index: int
    clip: VideoClip
    pixels: torch.Tensor  # (F, 3, S, S)
    latents: torch.Tensor  # (media items, L, Dv)
    kv: list  # per xattn block (k, v)
    done: torch.cuda.Event | None  # recorded on the side stream after the last kernel of this chunk


class _ChunkEncoder:
    """Frame preprocessing, vision encoder, perceiver and media K/V projection of one chunk. On a GPU
    with pipelining, the work is queued on a side stream and ordered by an event; elsewhere it runs
    inline, in the same order and with the same ops as lmmrt.generate's own media encoding."""

    def __init__(self, model, mode: str, side_stream: bool):
        self.model, self.mode = model, mode
        self.stream = None
        if side_stream and model.device.type == "cuda":
            self.stream = torch.cuda.Stream(device=model.device)
            # Whatever the compute stream produced so far (the weights included) is visible to it.
            self.stream.wait_stream(torch.cuda.current_stream(model.device))

    def submit(self, index: int, clip: VideoClip) -> _Encoded:
        module, dev = self.model.module, self.model.device
        on_side = torch.cuda.stream(self.stream) if self.stream is not None else contextlib.nullcontext()
        with on_side, torch.inference_mode():
            pixels = clip_pixels(self.model, clip)
            if self.mode == "frames":  # F media items of one frame each, media_time 0..F-1
                px, media_time = pixels[:, None], torch.arange(len(clip), device=dev)
            else:  # one media item of F frames
                px, media_time = pixels[None], torch.zeros(1, dtype=torch.long, device=dev)
            latents = module.encode_media(px, media_time)
            kv = module.project_media(latents)
            done = None
            if self.stream is not None:
                done = torch.cuda.Event()
                done.record(self.stream)
        return _Encoded(index, clip, pixels, latents, kv, done)

    def hand_over(self, enc: _Encoded) -> None:
        """Make the compute stream wait for the chunk's encoding, and tell the caching allocator the
        compute stream uses its tensors (they were allocated on the side stream: without
        record_stream their memory could be reused by the side stream while decode still reads it)."""
        if enc.done is None:
            return
        cur = torch.cuda.current_stream(self.model.device)
        cur.wait_event(enc.done)
        for t in (enc.pixels, enc.latents, *(x for kv in enc.kv for x in kv)):
            t.record_stream(cur)


_PENDING, _END = object(), object()


class _Reader:
    """Reads chunks from the source on a background thread, so a source that blocks for its next
    frames (a camera) never stalls decoding; the model runs only on the caller's thread."""

    def __init__(self, chunks: Iterator, depth: int = 2):
        self._q: queue.Queue = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._ended = False
        self._thread = threading.Thread(target=self._run, args=(chunks,), daemon=True, name="lmmrt-video-reader")
        self._thread.start()

    def _run(self, chunks):
        try:
            for c in chunks:
                if not self._put((c, None)):
                    return
            self._put((_END, None))
        except BaseException as e:  # handed to the caller's thread
            self._put((_END, e))

    def _put(self, msg) -> bool:
        while not self._stop.is_set():
            try:
                self._q.put(msg, timeout=0.05)
                return True
            except queue.Full:
                pass
        return False

    def get(self, block: bool = True):
        """The next chunk, _PENDING (none ready and block=False) or _END; re-raises the source's error."""
        if self._ended:
            return _END
        try:
            item, err = self._q.get(block=block)
        except queue.Empty:
            return _PENDING
        if item is _END:
            self._ended = True
            if err is not None:
                raise err
        return item

    def close(self) -> None:
        self._stop.set()


def generate_video_stream(model, chunks, prompt_template: str = VIDEO, *, chunk_frames: int | None = None,
                          mode: str | None = None, fps: float | None = None, source_fps: float | None = None,
                          max_frames: int | None = None, pipelined: bool = True, max_new_tokens: int = 64,
                          temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0,
                          repetition_penalty: float = 1.0, stop=None, stop_token_ids=None,
                          ignore_eos: bool = False, seed: int | None = None) -> Iterator[VideoChunkText]:
    """Text for each chunk of a video stream, as an iterator of (chunk index, text).

    chunks: with chunk_frames=n, a video source (file path, array, list or iterator of frames - a
    live stream -, VideoClip) cut into chunks of n frames (sampled at fps, at most max_frames in
    all; the last chunk may be shorter); without it, an iterable of chunks, each a VideoClip or a
    list / array of frames.

    Semantics: every chunk is its own, independent prompt: `prompt_template` with "{video}" (or its
    start) replaced by the chunk's markers (see video_prompt), generated from a fresh context with
    the given options; chunk k samples with seed + k. So chunk k's result equals
        lmmrt.generate(model, *video_prompt(model, chunk_k, prompt_template, mode=mode), seed=seed + k, ...)
    token for token; context never grows with the stream's length and every chunk's latency is
    the same (a running conversation would grow without bound).

    pipelined=True: on a GPU, chunk k+1's frame preprocessing, vision encoder, perceiver and media
    K/V projection run on a side CUDA stream while the LM decodes chunk k (ordered by events; the
    encoding is launched as soon as chunk k+1's frames have arrived, between decode steps). The
    source is read on a background thread. On the CPU the same pipeline runs inline, no streams.
    pipelined=False: encode, then decode, one chunk after the other, all on the current stream.

    Each item also carries .result (token_ids, finish_reason), .timestamps, .frame_indices, .stats.
    """
    if getattr(model, "tp", None) is not None:
        # its chunks bypass lmmrt.generate, whose input agreement and seed broadcast keep the ranks in step
        from lmmrt.parallel import TensorParallelError

        raise TensorParallelError("generate_video_stream does not run under tensor parallelism yet: call "
                                  "lmmrt.generate on each chunk's video_prompt instead (the same result per chunk)")
    if model.tokenizer is None:
        raise ValueError("generate_video_stream needs a tokenizer (text prompts); this model has none")
    chunk_frames = check_count("chunk_frames", chunk_frames, optional=True)
    gen_kw = dict(max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                  repetition_penalty=repetition_penalty, stop=stop, stop_token_ids=stop_token_ids,
                  ignore_eos=ignore_eos)
    check_generation_args(model, seed=seed, **gen_kw)  # bad options fail here, not at the first chunk
    if chunk_frames is not None:
        mode = resolve_mode(model, mode, chunk_frames)
        source = iter_chunks(chunks, chunk_frames, fps=fps, source_fps=source_fps, max_frames=max_frames)
    else:
        if fps is not None or source_fps is not None or max_frames is not None:
            raise ValueError("fps=, source_fps= and max_frames= sample a frame source cut with chunk_frames=; "
                             "pass chunk_frames= (or sample each chunk with load_video)")
        if isinstance(chunks, (str, Path, np.ndarray, torch.Tensor, VideoClip)):
            raise TypeError("without chunk_frames=, chunks must be an iterable of chunks; pass chunk_frames= "
                            "to cut a video into chunks")
        mode = resolve_mode(model, mode)
        source = (c if isinstance(c, VideoClip) else load_video(c) for c in chunks)
    fill_video_markers(prompt_template, model, mode, 1)  # a bad template fails here, not at the first chunk
    return _run_stream(model, source, prompt_template, mode, pipelined, seed, gen_kw)


def _decode_chunk(model, enc: _Encoded, template: str, mode: str, seed, gen_kw, on_step=None) -> VideoChunkText:
    prompt = fill_video_markers(template, model, mode, len(enc.clip))
    result = text_output.generate(model, prompt, clip_media_items(enc.pixels, mode),
                                  media_latents=(enc.latents, enc.kv), on_step=on_step,
                                  seed=None if seed is None else seed + enc.index, **gen_kw)[0]
    return VideoChunkText(enc.index, result, enc.clip, model.last_stats)


def _run_stream(model, source: Iterator[VideoClip], template, mode, pipelined, seed, gen_kw):
    no_frames = "the video stream has no frames (the frame source was empty)"
    encoder = _ChunkEncoder(model, mode, side_stream=pipelined)
    if not pipelined:
        k = -1
        for k, clip in enumerate(source):
            resolve_mode(model, mode, len(clip))
            yield _decode_chunk(model, encoder.submit(k, clip), template, mode, seed, gen_kw)
        if k < 0:
            raise ValueError(no_frames)
        return

    reader = _Reader(source)
    try:
        first = reader.get()
        if first is _END:
            raise ValueError(no_frames)
        resolve_mode(model, mode, len(first))
        nxt: _Encoded | None = encoder.submit(0, first)
        while nxt is not None:
            cur = nxt
            # chunk k+1: encoded yet? may the source still have it? did reading it fail?
            state = {"next": None, "open": True, "error": None}

            def launch_next(block=False, k=cur.index, state=state):
                if state["next"] is not None or not state["open"]:
                    return
                try:
                    clip = reader.get(block)
                    if clip is not _END and clip is not _PENDING:
                        resolve_mode(model, mode, len(clip))
                        state["next"] = encoder.submit(k + 1, clip)
                except Exception as e:  # raised after chunk k's text is out, not in its middle
                    state["error"], clip = e, _END
                if clip is _END:
                    state["open"] = False

            encoder.hand_over(cur)
            launch_next()  # frames already here: queue their encoding before this chunk's decode
            out = _decode_chunk(model, cur, template, mode, seed, gen_kw, on_step=launch_next)
            del cur  # the decode's tensors are released before the consumer runs
            yield out
            launch_next(block=True)
            if state["error"] is not None:
                raise state["error"]
            nxt = state["next"]
    finally:
        reader.close()
