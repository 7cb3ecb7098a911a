"""Video sampling arguments (fps, source_fps, max_frames, chunk_frames) are checked with errors naming
them, and rate sampling does O(frames) work whatever the rate, with the nearest-frame rule."""

from __future__ import annotations

import math
import random

import numpy as np
import pytest

import lmmrt
from lmmrt.demo import demo_model
from lmmrt.runtime.frame_sampling import sample_frame_indices
from lmmrt.runtime.video import iter_chunks
from lmmrt.runtime.video_stream import generate_video_stream

FRAMES = np.random.default_rng(0).integers(0, 255, (6, 8, 10, 3), dtype=np.uint8)


@pytest.fixture(scope="module")
def demo():
    return demo_model(device="cpu", backend="torch")


def _nearest_frames_reference(timestamps: list[float], fps: float, max_frames: int | None) -> list[int]:
    """The definition, target by target: k / fps takes the nearest frame (ties: the earlier), targets
    after the last frame take nothing, each frame is taken once."""
    eps = 1e-9
    out: list[int] = []
    k = 0
    while k / fps <= timestamps[-1] + eps:
        target = k / fps
        # the first frame at or after the target, and the one before it
        after = next(i for i, t in enumerate(timestamps) if target <= t + eps)
        pick = after - 1 if after > 0 and target - timestamps[after - 1] <= timestamps[after] - target + eps else after
        if not out or out[-1] != pick:
            out.append(pick)
        k += 1
    return out[:max_frames] if max_frames else out


def test_sampling_matches_the_nearest_frame_rule():
    rng = random.Random(0)
    for _ in range(300):
        n = rng.randint(1, 30)
        ts = sorted(rng.choice([rng.uniform(0, 3), round(rng.uniform(0, 3), 1)]) for _ in range(n))
        fps = rng.choice([0.5, 1, 2, 3, 7.5, 10, 24, 29.97, 100, rng.uniform(0.1, 50)])
        cap = rng.choice([None, 1, 3])
        assert sample_frame_indices(ts, fps, cap) == _nearest_frames_reference(ts, fps, cap), (ts, fps, cap)


def test_high_rates_do_not_scale_the_work():
    # an hour of 1 fps frames sampled at the top rate: the old loop walked 3.6e9 targets
    ts = [float(i) for i in range(3600)]
    assert sample_frame_indices(ts, 1e6) == list(range(3600))
    clip = lmmrt.load_video(FRAMES, fps=1e6, source_fps=1e-3)  # frames 1000 s apart
    assert clip.indices == list(range(len(FRAMES)))


@pytest.mark.parametrize("kw, error, msg", [
    ({"fps": math.inf}, ValueError, "fps must be a finite number"),
    ({"fps": math.nan}, ValueError, "fps must be a finite number"),
    ({"fps": 0}, ValueError, r"fps must be a finite number of frames per second in \(0, 1e\+06\], got 0"),
    ({"fps": -2}, ValueError, "fps must be a finite"),
    ({"fps": 1e7}, ValueError, "fps must be a finite"),
    ({"fps": "2"}, TypeError, "fps must be a number"),
    ({"fps": True}, TypeError, "fps must be a number"),
    ({"source_fps": math.inf, "fps": 1}, ValueError, "source_fps must be a finite"),
    ({"source_fps": -1}, ValueError, "source_fps must be a finite"),
    ({"source_fps": [30]}, TypeError, "source_fps must be a number"),
    ({"max_frames": 0}, ValueError, "max_frames must be a positive int, got 0"),
    ({"max_frames": 2.5}, TypeError, "max_frames must be a positive int"),
    ({"max_frames": math.inf}, TypeError, "max_frames must be a positive int"),
    ({"max_frames": True}, TypeError, "max_frames must be a positive int"),
])
def test_bad_sampling_arguments_are_named(kw, error, msg):
    with pytest.raises(error, match=msg):
        lmmrt.load_video(FRAMES, **kw)
    with pytest.raises(error, match=msg):
        iter_chunks(FRAMES, 2, **kw)


@pytest.mark.parametrize("chunk_frames, error", [(0, ValueError), (-1, ValueError), (2.0, TypeError),
                                                 (math.inf, TypeError), ("4", TypeError), (False, TypeError)])
def test_bad_chunk_frames_is_named(demo, chunk_frames, error):
    with pytest.raises(error, match="chunk_frames must be a positive int"):
        iter_chunks(FRAMES, chunk_frames)
    with pytest.raises(error, match="chunk_frames must be a positive int"):
        generate_video_stream(demo, FRAMES, chunk_frames=chunk_frames)


def test_numpy_scalars_are_accepted():
    ref = lmmrt.load_video(FRAMES, fps=2, source_fps=4, max_frames=2)
    got = lmmrt.load_video(FRAMES, fps=np.float32(2), source_fps=np.int64(4), max_frames=np.int64(2))
    assert got.indices == ref.indices == [0, 2]
    assert [c.indices for c in iter_chunks(FRAMES, np.int32(4))] == [[0, 1, 2, 3], [4, 5]]


def test_stream_options_fail_at_the_call(demo):
    with pytest.raises(TypeError, match="max_new_tokens must be an int"):
        generate_video_stream(demo, FRAMES, chunk_frames=2, max_new_tokens=2.5)
