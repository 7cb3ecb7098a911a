"""Video input (lmmrt.runtime.video): decoding and rate sampling, both feeding modes against the
reference path with the frames passed explicitly, the pipelined stream against the sequential run,
and the errors a user meets."""

from __future__ import annotations

import dataclasses
import os
import threading
from types import SimpleNamespace

import numpy as np
import pytest
import torch

import lmmrt
from lmmrt.runtime.frame_sampling import sample_frame_indices
from lmmrt.runtime.video import VideoClip, iter_chunks
from lmmrt.runtime.video_stream import generate_video_stream

av = pytest.importorskip("av")

W, H, FPS, N_FRAMES = 64, 48, 10, 20


def colour(i: int) -> np.ndarray:
    """Frame i's colour: far enough from its neighbours to survive lossy encoding."""
    return np.array([10 + 12 * i, 250 - 12 * i, (i % 2) * 200], dtype=np.float64)


def frame_id(frame) -> int:
    """Which source frame a decoded frame is: the nearest colour (of the untextured quadrant)."""
    mean = torch.as_tensor(frame)[H // 2 + 4:, W // 2 + 4:].double().mean(dim=(0, 1)).numpy()
    return int(np.argmin([np.abs(mean - colour(i)).sum() for i in range(N_FRAMES)]))


def synthetic_frames(n: int = N_FRAMES) -> np.ndarray:
    out = np.zeros((n, H, W, 3), np.uint8)
    for i in range(n):
        out[i] = colour(i).astype(np.uint8)
        out[i, : H // 2, : W // 2] = (255 - 10 * i) % 256  # some texture, so frames are not flat
    return out


def write_video(path, frames: np.ndarray, fps: int = FPS) -> str:
    with av.open(str(path), "w") as c:
        s = c.add_stream("mpeg4", rate=fps)
        s.width, s.height, s.pix_fmt = W, H, "yuv420p"
        for f in frames:
            for p in s.encode(av.VideoFrame.from_ndarray(f, format="rgb24")):
                c.mux(p)
        for p in s.encode():
            c.mux(p)
    return str(path)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """The models here are tiny: intra-op threads buy nothing, and on a busy 2-core machine their
    spin-waiting made these tests 5-10x slower. Restored afterwards for the other modules."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def video_path(tmp_path_factory):
    return write_video(tmp_path_factory.mktemp("video") / "clip.mp4", synthetic_frames())


@pytest.fixture(scope="module")
def demo():
    from lmmrt.demo import demo_model

    return demo_model(device="cpu", backend="torch")


@pytest.fixture(scope="module")
def demo_frames8(demo):
    """The demo model with frame embeddings (max_frames=8): the "clip" mode's checkpoint."""
    from lmmrt.api import Model
    from lmmrt.models.random_init import random_model

    cfg = demo.config
    cfg = dataclasses.replace(cfg, perceiver=dataclasses.replace(cfg.perceiver, max_frames=8))
    return Model(random_model(cfg, seed=7, device="cpu"), cfg, demo.tokenizer, backend="torch")


# --- decoding and sampling --------------------------------------------------------------------------
def test_file_decodes_every_frame_in_order(video_path):
    clip = lmmrt.load_video(video_path)
    assert len(clip) == N_FRAMES and clip.indices == list(range(N_FRAMES))
    assert [frame_id(f) for f in clip.frames] == list(range(N_FRAMES))
    assert clip.frames[0].dtype == torch.uint8 and tuple(clip.frames[0].shape) == (H, W, 3)
    np.testing.assert_allclose(clip.timestamps, np.arange(N_FRAMES) / FPS, atol=1e-6)


@pytest.mark.parametrize("fps, max_frames, expected", [
    (2, None, [0, 5, 10, 15]),
    (3, None, [0, 3, 7, 10, 13, 17]),  # targets 0, 1/3, 2/3, ... s take the nearest 10 fps frame
    (4, None, [0, 2, 5, 7, 10, 12, 15, 17]),  # ties (0.25 s between 0.2 and 0.3) go to the earlier frame
    (1, None, [0, 10]),  # a target after the last frame (2.0 s > 1.9 s) takes nothing
    (5, 4, [0, 2, 4, 6]),  # the cap keeps the first frames taken
    (25, None, list(range(N_FRAMES))),  # above the source rate: every frame, none twice
])
def test_rate_sampling_picks_nearest_frames(video_path, fps, max_frames, expected):
    clip = lmmrt.load_video(video_path, fps=fps, max_frames=max_frames)
    assert clip.indices == expected
    assert [frame_id(f) for f in clip.frames] == expected  # checked on the pixels, not only the bookkeeping
    assert sample_frame_indices([i / FPS for i in range(N_FRAMES)], fps, max_frames) == expected


def test_array_list_iterator_and_clip_sources():
    frames = synthetic_frames()
    want = [0, 3, 7, 10, 13, 17]
    for src in (frames, torch.from_numpy(frames), list(frames), iter(list(frames))):
        clip = lmmrt.load_video(src, fps=3, source_fps=FPS)
        assert clip.indices == want and [frame_id(f) for f in clip.frames] == want
    assert lmmrt.load_video(lmmrt.load_video(frames, source_fps=FPS), fps=3).indices == want
    # a live stream is read only as far as the cap needs: this one never ends
    def endless():
        i = 0
        while True:
            yield frames[i % N_FRAMES]
            i += 1
    assert [frame_id(f) for f in lmmrt.load_video(endless(), max_frames=5).frames] == [0, 1, 2, 3, 4]
    chunks = list(iter_chunks(frames, 8))
    assert [c.indices for c in chunks] == [list(range(8)), list(range(8, 16)), list(range(16, 20))]
    with pytest.raises(ValueError, match="needs frame timestamps"):
        lmmrt.load_video(frames, fps=2)


# --- feeding modes against the reference path -----------------------------------------------------------
def test_frames_mode_matches_frames_passed_as_images(demo, video_path):
    clip = lmmrt.load_video(video_path, fps=2)  # 4 frames
    prompt, media = lmmrt.video_prompt(demo, clip, "User: {video} What happens?\nAssistant:")
    assert prompt == "User: " + "<image>" * 4 + " What happens?\nAssistant:"  # default mode: no frame_embs
    assert len(media) == 4
    ref_prompt = "User: <image><image><image><image> What happens?\nAssistant:"
    ref_images = [f.numpy() for f in clip.frames]
    got = lmmrt.logits(demo, prompt, media)[0]
    ref = lmmrt.logits(demo, ref_prompt, ref_images)[0]
    assert torch.equal(got, ref), f"max diff {(got - ref).abs().max()}"
    # the path and sampling options given straight to video_prompt give the same thing
    prompt2, media2 = lmmrt.video_prompt(demo, video_path, "User: {video} What happens?\nAssistant:", fps=2)
    assert prompt2 == prompt and torch.equal(lmmrt.logits(demo, prompt2, media2)[0], ref)


def test_clip_mode_matches_explicit_clip(demo_frames8, video_path):
    m = demo_frames8
    clip = lmmrt.load_video(video_path, fps=3)  # 6 frames <= max_frames 8
    prompt, media = lmmrt.video_prompt(m, clip, "{video}Describe the clip.")
    assert prompt == "<image>Describe the clip." and len(media) == 1  # default mode with frame_embs: clip
    ref = lmmrt.logits(m, "<image>Describe the clip.", [SimpleNamespace(frames=[f.numpy() for f in clip.frames])])[0]
    got = lmmrt.logits(m, prompt, media)[0]
    assert torch.equal(got, ref), f"max diff {(got - ref).abs().max()}"
    # a VideoClip is itself a media item for lmmrt.generate
    assert torch.equal(lmmrt.logits(m, prompt, [clip])[0], ref)
    # the frame embeddings matter: the frames mode on the same checkpoint reads differently
    p2, m2 = lmmrt.video_prompt(m, clip, "{video}Describe the clip.", mode="frames")
    assert p2.count("<image>") == 6 and not torch.equal(lmmrt.logits(m, p2, m2)[0][-1], ref[-1])


def test_mode_errors(demo, demo_frames8, video_path):
    clip = lmmrt.load_video(video_path, max_frames=9)
    with pytest.raises(ValueError, match="needs a checkpoint with frame embeddings"):
        lmmrt.video_prompt(demo, clip, mode="clip")
    with pytest.raises(ValueError, match="9 frames is longer than the checkpoint's max_frames=8"):
        lmmrt.video_prompt(demo_frames8, clip)
    with pytest.raises(ValueError, match="longer than the checkpoint's max_frames=8"):
        generate_video_stream(demo_frames8, video_path, chunk_frames=12)
    with pytest.raises(ValueError, match="unknown video mode"):
        lmmrt.video_prompt(demo, clip, mode="video")


# --- the pipelined stream ------------------------------------------------------------------------------
@pytest.mark.parametrize("which, mode, kw", [
    ("demo", None, dict(max_new_tokens=5, ignore_eos=True)),  # frames mode
    ("frames8", None, dict(max_new_tokens=4, temperature=0.9, top_k=20, seed=3, ignore_eos=True)),  # clip mode
])
def test_pipelined_stream_matches_sequential(request, video_path, which, mode, kw):
    model = request.getfixturevalue("demo" if which == "demo" else "demo_frames8")
    template = "Frames: {video} Caption:"
    source = dict(fps=5, chunk_frames=3)  # 10 frames -> chunks of 3, 3, 3, 1
    piped = list(generate_video_stream(model, video_path, template, mode=mode, **source, **kw))
    seq = list(generate_video_stream(model, video_path, template, mode=mode, pipelined=False, **source, **kw))
    assert [c.index for c in piped] == [0, 1, 2, 3]
    assert [c.frame_indices for c in piped] == [[0, 2, 4], [6, 8, 10], [12, 14, 16], [18]]
    assert [c.result.token_ids for c in piped] == [c.result.token_ids for c in seq]
    assert [tuple(c) for c in piped] == [tuple(c) for c in seq]
    # and both equal lmmrt.generate on each chunk's hand-made prompt (chunk k samples with seed + k)
    for chunk, out in zip(iter_chunks(video_path, 3, fps=5), piped):
        prompt, media = lmmrt.video_prompt(model, chunk, template, mode=mode)
        kk = dict(kw, seed=None if kw.get("seed") is None else kw["seed"] + out.index)
        ref = lmmrt.generate(model, prompt, media, **kk)[0]
        assert out.result.token_ids == ref.token_ids and out.text == ref.text
        assert len(out.result.token_ids) == kw["max_new_tokens"]


def test_stream_of_explicit_chunks_and_live_iterator(demo):
    frames = synthetic_frames(8)
    kw = dict(max_new_tokens=3, ignore_eos=True)
    chunks = [frames[:4], list(frames[4:8])]
    explicit = list(generate_video_stream(demo, chunks, "{video}?", **kw))
    live = list(generate_video_stream(demo, iter(list(frames)), "{video}?", chunk_frames=4, **kw))
    assert [c.result.token_ids for c in explicit] == [c.result.token_ids for c in live]
    assert len(explicit) == 2

    def camera_lost():
        yield from frames[:4]
        raise RuntimeError("camera disconnected")

    # the source's error comes after the text of the chunk it interrupted, not instead of it
    for pipelined in (True, False):
        stream = generate_video_stream(demo, camera_lost(), "{video}?", chunk_frames=4, pipelined=pipelined, **kw)
        assert next(stream).result.token_ids == explicit[0].result.token_ids
        with pytest.raises(RuntimeError, match="camera disconnected"):
            next(stream)


def test_next_chunk_is_encoded_between_decode_steps(demo, monkeypatch):
    """A live source whose second chunk arrives while the first is being decoded: its encoding is
    queued between decode steps (on the GPU: on the side stream, alongside the decode)."""
    from lmmrt.runtime import video_stream

    forwards, decoding = [0], threading.Event()

    def count_forwards(*_):
        forwards[0] += 1
        if forwards[0] >= 3:  # prefill + 2 decode steps of chunk 0
            decoding.set()

    submitted = []
    submit = video_stream._ChunkEncoder.submit
    monkeypatch.setattr(video_stream._ChunkEncoder, "submit",
                        lambda self, k, clip: submitted.append((k, forwards[0])) or submit(self, k, clip))
    frames = synthetic_frames(8)

    def live():
        yield from frames[:4]
        assert decoding.wait(timeout=60)
        yield from frames[4:]

    kw = dict(max_new_tokens=16, ignore_eos=True)
    hook = demo.module.register_forward_hook(count_forwards)
    try:
        piped = list(generate_video_stream(demo, live(), "{video}!", chunk_frames=4, **kw))
    finally:
        hook.remove()
    assert submitted[0] == (0, 0)
    k, at = submitted[1]
    assert k == 1 and 3 <= at < kw["max_new_tokens"], submitted  # during chunk 0's decode
    seq = list(generate_video_stream(demo, frames, "{video}!", chunk_frames=4, pipelined=False, **kw))
    assert [c.result.token_ids for c in piped] == [c.result.token_ids for c in seq]


# --- errors ----------------------------------------------------------------------------------------------
def test_bad_files_give_clear_errors(tmp_path, demo):
    missing = tmp_path / "nope.mp4"
    with pytest.raises(FileNotFoundError, match="video file not found: .*nope.mp4"):
        lmmrt.load_video(missing)
    with pytest.raises(FileNotFoundError, match="video file not found"):
        generate_video_stream(demo, missing, chunk_frames=4)  # fails at the call, not at the first chunk
    empty = tmp_path / "empty.mp4"
    empty.write_bytes(b"")
    with pytest.raises(ValueError, match=r"empty \(0 bytes\)"):
        lmmrt.load_video(empty)
    corrupt = tmp_path / "corrupt.mp4"
    corrupt.write_bytes(np.random.default_rng(0).integers(0, 256, 8192, dtype=np.uint8).tobytes())
    with pytest.raises(ValueError, match="corrupt or not a video"):
        lmmrt.load_video(corrupt)
    with pytest.raises(ValueError, match="corrupt or not a video"):
        lmmrt.video_prompt(demo, str(corrupt))


def test_zero_frame_streams_give_clear_errors(tmp_path, demo):
    with pytest.raises(ValueError, match="no frames"):
        lmmrt.load_video(iter([]))
    with pytest.raises(ValueError, match="no frames"):
        lmmrt.load_video(np.zeros((0, H, W, 3), np.uint8))
    for pipelined in (True, False):
        with pytest.raises(ValueError, match="video stream has no frames"):
            next(generate_video_stream(demo, iter([]), chunk_frames=4, pipelined=pipelined))
    # a file whose video stream holds no frame
    path = tmp_path / "zero.mp4"
    with av.open(str(path), "w") as c:
        s = c.add_stream("mpeg4", rate=FPS)
        s.width, s.height, s.pix_fmt = W, H, "yuv420p"
        c.start_encoding()
    assert os.path.getsize(path) > 0
    with pytest.raises(ValueError, match="no video stream|no frames"):
        lmmrt.load_video(path)
    with pytest.raises(ValueError, match="at least one frame"):
        VideoClip([])


def test_cli_generate_with_video(tmp_path):
    import subprocess
    import sys

    from lmmrt.demo import save_demo

    ckpt = save_demo(tmp_path / "demo")
    path = tmp_path / "v.mp4"
    write_video(path, synthetic_frames())
    r = subprocess.run([sys.executable, "-m", "lmmrt", "generate", str(ckpt), "-p", "{video}What happens?",
                        "--video", str(path), "--fps", "2", "--max-frames", "3", "--max-new-tokens", "4",
                        "--device", "cpu", "--quiet"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    r = subprocess.run([sys.executable, "-m", "lmmrt", "generate", str(ckpt), "-p", "x", "--video",
                        str(tmp_path / "missing.mp4"), "--device", "cpu"], capture_output=True, text=True)
    assert r.returncode == 2 and "missing.mp4" in r.stderr
    # an infinite rate is refused (it used to loop forever)
    r = subprocess.run([sys.executable, "-m", "lmmrt", "generate", str(ckpt), "-p", "{video}x", "--video", str(path),
                        "--fps", "inf", "--device", "cpu"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "fps" in r.stderr and "finite" in r.stderr and "Traceback" not in r.stderr
