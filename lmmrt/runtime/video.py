"""Video input: clips of frames as media and the two feeding modes. Streaming generation over a
video (the next chunk encoded on its own CUDA stream while the LM decodes the current one) is in
lmmrt.runtime.video_stream.

Sources (load_video, iter_chunks, generate_video_stream):
  - a file path, decoded with PyAV;
  - a (F, H, W, 3) uint8 numpy array or tensor, or a list of frames (PIL or uint8 (H, W, 3));
  - an iterator of frames (a live stream), read as the frames come;
  - a VideoClip.

Frame sampling at `fps` (and max_frames, source_fps): see lmmrt.runtime.frame_sampling.

Feeding modes (flamingo.md §3, §7):
  "frames"  every frame is its own media item with its own marker: works with every checkpoint
            (OpenFlamingo's released checkpoints accept only this);
  "clip"    the clip is ONE media item of F frames; the perceiver adds frame_embs[:F]: only for
            checkpoints with frame embeddings (PerceiverConfig.max_frames > 0) and F <= max_frames.
The default is "clip" when the checkpoint has frame embeddings, else "frames".
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from lmmrt.runtime.frame_sampling import check_count, check_rate, sample_frames
from lmmrt.runtime.processor import normalize_uint8, pil_to_rgb

MODES = ("frames", "clip")
VIDEO = "{video}"  # where a prompt template puts the video's marker(s)


# --- clips and sources ------------------------------------------------------------------------------
def _as_frame(f, where: str) -> torch.Tensor:
    """A frame as a uint8 (H, W, 3) tensor (no copy for numpy arrays and tensors)."""
    try:
        from PIL import Image
    except ImportError:  # pragma: no cover - pillow is a dependency
        Image = None
    if Image is not None and isinstance(f, Image.Image):
        f = np.asarray(pil_to_rgb(f, on_white=False, where=where))
    if isinstance(f, np.ndarray):
        f = torch.from_numpy(np.ascontiguousarray(f))
    if not isinstance(f, torch.Tensor) or f.dtype != torch.uint8 or f.dim() != 3 or f.shape[2] != 3:
        desc = f"{f.dtype} {tuple(f.shape)}" if isinstance(f, torch.Tensor) else type(f).__name__
        raise TypeError(f"{where}: a video frame must be a uint8 (H, W, 3) array or tensor or a PIL image, "
                        f"got {desc}")
    if min(f.shape[0], f.shape[1]) < 1:
        raise ValueError(f"{where}: empty frame of shape {tuple(f.shape)}")
    return f


@dataclass
class VideoClip:
    """A video clip: ONE media item of F frames for lmmrt.generate (the "clip" mode), or F media
    items through video_prompt(mode="frames").

    frames: uint8 (H, W, 3) tensors; timestamps: seconds from the stream start, one per frame, or
    None when the source had none; indices: each frame's index in its source."""

    frames: list[torch.Tensor]
    timestamps: list[float] | None = None
    indices: list[int] | None = None

    def __post_init__(self):
        self.frames = [_as_frame(f, f"frame {i}") for i, f in enumerate(self.frames)]
        if not self.frames:
            raise ValueError("a video clip needs at least one frame; got none")
        for name in ("timestamps", "indices"):
            v = getattr(self, name)
            if v is not None and len(v) != len(self.frames):
                raise ValueError(f"a clip of {len(self.frames)} frames was given {len(v)} {name}")
        if self.indices is None:
            self.indices = list(range(len(self.frames)))

    def __len__(self) -> int:
        return len(self.frames)

    def __repr__(self) -> str:
        h, w, _ = self.frames[0].shape
        span = f", {self.timestamps[0]:.3f}-{self.timestamps[-1]:.3f} s" if self.timestamps else ""
        return f"VideoClip({len(self)} frames of {w}x{h}{span})"


def _open_file(path) -> Iterator[tuple[int, float | None, torch.Tensor]]:
    """Opens a video file now (so a missing / empty / corrupt file fails at the call) and returns
    an iterator of (index, seconds from the stream start, uint8 (H, W, 3) frame)."""
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"video file not found: {p}")
    if not p.is_file():
        raise ValueError(f"{p}: not a file")
    if p.stat().st_size == 0:
        raise ValueError(f"{p}: the video file is empty (0 bytes)")
    try:
        import av
    except ImportError:  # pragma: no cover - an optional dependency
        raise ImportError("reading video files needs PyAV: pip install av (or lmmrt[video]; in the venv `make` "
                          "made: make install EXTRAS=video); or pass the frames as arrays") from None
    try:
        container = av.open(str(p))
    except av.error.FFmpegError as e:
        raise ValueError(f"{p}: cannot read the video: the file is corrupt or not a video ({e})") from None
    if not container.streams.video:
        container.close()
        raise ValueError(f"{p}: the file has no video stream, so no frames")

    def frames():
        with container:
            stream = container.streams.video[0]
            stream.thread_type = "AUTO"
            tb, origin, rate = stream.time_base, stream.start_time, stream.average_rate
            n = 0
            try:
                for frame in container.decode(stream):
                    if frame.pts is not None and tb is not None:
                        origin = frame.pts if origin is None else origin
                        t = float((frame.pts - origin) * tb)
                    else:
                        t = n / float(rate) if rate else None
                    yield n, t, torch.from_numpy(frame.to_ndarray(format="rgb24"))
                    n += 1
            except av.error.FFmpegError as e:
                raise ValueError(f"{p}: decoding failed after {n} frame(s): the file is corrupt ({e})") from None
            if n == 0:
                raise ValueError(f"{p}: the video stream has no frames")

    return frames()


def _timed_frames(source, source_fps: float | None) -> Iterator[tuple[int, float | None, torch.Tensor]]:
    """Any video source -> iterator of (index, timestamp or None, frame)."""
    if isinstance(source, (str, Path)):
        return _open_file(source)
    if isinstance(source, VideoClip):
        ts = source.timestamps or [None] * len(source)
        return iter(zip(source.indices, ts, source.frames))
    if isinstance(source, (np.ndarray, torch.Tensor)):
        if source.ndim != 4:
            raise ValueError(f"a video array must have shape (frames, H, W, 3), got {tuple(source.shape)}")
        source = torch.from_numpy(source) if isinstance(source, np.ndarray) else source
        source = source.unbind(0)
    if not isinstance(source, Iterable):
        raise TypeError(f"a video source must be a file path, a (F, H, W, 3) uint8 array, a list or an iterator "
                        f"of frames, or a VideoClip; got {type(source).__name__}")

    def frames():
        for i, f in enumerate(source):
            yield i, (i / source_fps if source_fps else None), _as_frame(f, f"video frame {i}")

    return frames()


def load_video(source, *, fps: float | None = None, max_frames: int | None = None,
               source_fps: float | None = None) -> VideoClip:
    """Read a video into a VideoClip: every frame, or frames sampled at `fps`, at most `max_frames`.

    source: a file path (PyAV), a (F, H, W, 3) uint8 array or tensor, a list or iterator of frames,
    or a VideoClip (resampled). source_fps: the frame rate of a source without timestamps (arrays,
    lists, iterators), needed to sample them at `fps`. An iterator is read only as far as needed."""
    fps, source_fps = check_rate("fps", fps), check_rate("source_fps", source_fps)
    max_frames = check_count("max_frames", max_frames, optional=True)
    picked = list(sample_frames(_timed_frames(source, source_fps), fps, max_frames))
    if not picked:
        raise ValueError("the video has no frames (the frame source was empty)")
    idx, ts, frames = zip(*picked)
    return VideoClip(list(frames), None if ts[0] is None else list(ts), list(idx))


def iter_chunks(source, chunk_frames: int, *, fps: float | None = None, source_fps: float | None = None,
                max_frames: int | None = None) -> Iterator[VideoClip]:
    """Cut a video source into clips of `chunk_frames` consecutive (sampled) frames; the last clip
    may be shorter. A file is opened now, so a missing or corrupt file fails here."""
    chunk_frames = check_count("chunk_frames", chunk_frames, optional=False)
    fps, source_fps = check_rate("fps", fps), check_rate("source_fps", source_fps)
    max_frames = check_count("max_frames", max_frames, optional=True)
    frames = sample_frames(_timed_frames(source, source_fps), fps, max_frames)

    def chunks():
        buf, n = [], 0
        for item in frames:
            buf.append(item)
            if len(buf) == chunk_frames:
                yield _clip(buf)
                n, buf = n + 1, []
        if buf:
            yield _clip(buf)
        elif n == 0:
            raise ValueError("the video stream has no frames (the frame source was empty)")

    return chunks()


def _clip(items) -> VideoClip:
    idx, ts, frames = zip(*items)
    return VideoClip(list(frames), None if ts[0] is None else list(ts), list(idx))


# --- prompts --------------------------------------------------------------------------------------
def resolve_mode(model, mode: str | None, n_frames: int | None = None) -> str:
    """"frames" | "clip" for this checkpoint (None / "auto": "clip" when it has frame embeddings)."""
    per = model.config.perceiver
    max_frames = per.max_frames if per is not None else 0
    if mode in (None, "auto"):
        mode = "clip" if max_frames > 0 else "frames"
    if mode not in MODES:
        raise ValueError(f"unknown video mode {mode!r}; use one of {MODES} (or None for the default)")
    if mode == "clip":
        if max_frames == 0:
            raise ValueError("mode='clip' needs a checkpoint with frame embeddings (perceiver max_frames > 0); "
                             "this one has none: use mode='frames' (each frame its own media item)")
        if n_frames is not None and n_frames > max_frames:
            raise ValueError(f"a clip of {n_frames} frames is longer than the checkpoint's max_frames="
                             f"{max_frames} (its frame embeddings): take fewer frames (fps=, max_frames=, "
                             f"chunk_frames=) or use mode='frames'")
    return mode


def fill_video_markers(template: str, model, mode: str, n_frames: int) -> str:
    """The template with its "{video}" replaced by the markers (prepended when it has none)."""
    if template.count(VIDEO) > 1:
        raise ValueError(f"a video prompt template holds {VIDEO!r} at most once, got {template!r}")
    markers = model.config.image_token * (n_frames if mode == "frames" else 1)
    return template.replace(VIDEO, markers) if VIDEO in template else markers + template


@dataclass
class ClipPixels:
    """A clip already preprocessed on the model's device: one media item of F frames, as
    lmmrt.generate takes it (anything with `frames`). pixels: (F, 3, S, S) normalized float32."""

    pixels: torch.Tensor

    @property
    def frames(self) -> list[torch.Tensor]:
        return list(self.pixels.unbind(0))


def clip_pixels(model, clip: VideoClip) -> torch.Tensor:
    """A clip's frames -> normalized (F, 3, S, S) float32 on the model's device: one batched resize +
    normalize per frame size, on the device. The uint8 frames travel (from pinned memory, so the copy
    is asynchronous on the current stream), never the 4x larger floats."""
    dev, cfg = model.device, model.config.vision
    by_shape: dict[tuple, list[int]] = {}
    for i, f in enumerate(clip.frames):
        by_shape.setdefault(tuple(f.shape), []).append(i)
    out = None
    for shape, idx in by_shape.items():
        frames = [clip.frames[i] for i in idx]
        if dev.type == "cuda" and frames[0].device.type == "cpu":
            # Stack straight into pinned memory; the caching host allocator keeps the buffer alive
            # until the copy, queued on the current stream, has run.
            host = torch.empty((len(idx),) + shape, dtype=torch.uint8, pin_memory=True)
            u8 = torch.stack(frames, out=host).to(dev, non_blocking=True)
        else:
            u8 = torch.stack(frames).to(dev)
        px = normalize_uint8(u8, cfg)
        if len(by_shape) == 1:
            return px
        if out is None:
            out = px.new_empty((len(clip),) + tuple(px.shape[1:]))
        out[idx] = px
    return out


def clip_media_items(pixels: torch.Tensor, mode: str) -> list:
    return list(pixels.unbind(0)) if mode == "frames" else [ClipPixels(pixels)]


def video_prompt(model, video, text: str = VIDEO, *, mode: str | None = None, fps: float | None = None,
                 max_frames: int | None = None, source_fps: float | None = None) -> tuple[str, list]:
    """(prompt, media) for lmmrt.generate / lmmrt.logits: `text` with its "{video}" (or its start)
    replaced by the video's markers, and the media, preprocessed on the model's device.

    mode "frames": one marker and one media item per frame; "clip": one marker, one media item of F
    frames (checkpoints with frame embeddings); None: "clip" when supported, else "frames".
    video: a VideoClip or any load_video source (sampled with fps / max_frames / source_fps)."""
    if isinstance(video, VideoClip) and fps is None and max_frames is None:
        clip = video
    else:
        clip = load_video(video, fps=fps, max_frames=max_frames, source_fps=source_fps)
    mode = resolve_mode(model, mode, len(clip))
    prompt = fill_video_markers(text, model, mode, len(clip))
    return prompt, clip_media_items(clip_pixels(model, clip), mode)
