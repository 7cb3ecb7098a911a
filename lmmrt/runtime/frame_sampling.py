"""Which frames of a video a frame rate takes, and the checks on the video sampling arguments.

Frame sampling at `fps`: timestamps are seconds from the stream start (a file's come from each
frame's pts minus the stream's start_time; other sources use i / source_fps). For k = 0, 1, 2, ...
the target time k / fps takes the frame whose timestamp is nearest (a tie goes to the earlier
frame); a target after the last frame's timestamp takes nothing, and a frame nearest to several
targets (fps above the source rate) is taken once. `max_frames` keeps the first max_frames frames
taken (the source is read no further). E.g. a 10 fps file of 2 s (frames at 0.0, 0.1, ..., 1.9 s):
fps=2 takes frames 0, 5, 10, 15; fps=3 takes 0, 3, 7, 10, 13, 17. Without fps, every frame.
"""

from __future__ import annotations

import math
import numbers

# Above any real capture rate; it also keeps k / fps and the target counts well inside float range.
MAX_RATE = 1e6
_EPS = 1e-9  # timestamps are rationals turned into floats: k / fps may land a hair off a frame


def check_rate(name: str, value) -> float | None:
    """A frame rate argument: None, or a finite real number in (0, MAX_RATE]."""
    if value is None:
        return None
    if not isinstance(value, numbers.Real) or isinstance(value, bool):
        raise TypeError(f"{name} must be a number (frames per second), got {value!r} ({type(value).__name__})")
    value = float(value)
    if not math.isfinite(value) or not 0 < value <= MAX_RATE:
        raise ValueError(f"{name} must be a finite number of frames per second in (0, {MAX_RATE:g}], got {value}")
    return value


def check_count(name: str, value, *, optional: bool) -> int | None:
    """A frame count argument: a positive int (None allowed when optional)."""
    if value is None and optional:
        return None
    if not isinstance(value, numbers.Integral) or isinstance(value, bool):
        raise TypeError(f"{name} must be a positive int, got {value!r} ({type(value).__name__})")
    if value < 1:
        raise ValueError(f"{name} must be a positive int, got {value}")
    return int(value)


def _last_target(t: float, fps: float) -> int:
    """The largest k with k / fps <= t + eps (the targets a frame at time t resolves)."""
    k = math.floor((t + _EPS) * fps)
    while (k + 1) / fps <= t + _EPS:
        k += 1
    while k / fps > t + _EPS:
        k -= 1
    return k


def sample_frames(timed, fps: float | None, max_frames: int | None):
    """The frames taken at `fps` from `timed` ((index, timestamp, frame) items), read lazily. Work
    is O(frames read) whatever the rate: the targets between two frames are resolved together."""
    taken = 0
    if fps is None:
        for item in timed:
            yield item
            taken += 1
            if max_frames and taken >= max_frames:
                return
        return
    k, prev, last = 0, None, -1
    for item in timed:
        t = item[1]
        if t is None:
            raise ValueError("sampling at fps= needs frame timestamps, and frames given as an array, a list or an "
                             "iterator have none: either say their rate, e.g. load_video(frames, fps=1, "
                             "source_fps=30), or leave fps out to take every frame (up to max_frames)")
        if not math.isfinite(t):
            raise ValueError(f"frame {item[0]} has timestamp {t}: sampling at fps= needs finite timestamps")
        k_last = _last_target(t, fps)
        if k_last >= k:
            # targets k..k_last lie between prev and this frame; the earlier ones (nearer to prev,
            # ties included) take prev, the later ones this frame
            picks = []
            if prev is not None and k / fps - prev[1] <= t - k / fps + _EPS:
                picks.append(prev)
            if prev is None or k_last / fps - prev[1] > t - k_last / fps + _EPS:
                picks.append(item)
            for pick in picks:
                if pick[0] != last:
                    yield pick
                    last, taken = pick[0], taken + 1
                    if max_frames and taken >= max_frames:
                        return
            k = k_last + 1
        prev = item


def sample_frame_indices(timestamps: list[float], fps: float, max_frames: int | None = None) -> list[int]:
    """Which frames (indices into `timestamps`, seconds from the stream start) sampling at `fps` takes."""
    fps = check_rate("fps", fps)
    max_frames = check_count("max_frames", max_frames, optional=True)
    return [i for i, _, _ in sample_frames(((i, t, None) for i, t in enumerate(timestamps)), fps, max_frames)]
