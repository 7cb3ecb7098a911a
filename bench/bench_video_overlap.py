"""How much of the video encoding the streaming pipeline hides behind decoding.

lmmrt.generate_video_stream encodes chunk k+1 (frame preprocessing, vision encoder, perceiver,
media K/V projection) on a side CUDA stream while the LM decodes chunk k. For N chunks of F frames
and a fixed number of new tokens per chunk (ignore_eos, greedy), this measures wall time of:
  encode only      every chunk's encoding, back to back on the current stream (then one sync);
  decode only      every chunk's prefill + decode from media encoded beforehand;
  sequential       generate_video_stream(pipelined=False): encode, decode, next chunk;
  pipelined        generate_video_stream(pipelined=True).
  hidden     = sequential - pipelined
  hideable   = min(encode - encode/N, decode)   (the first chunk's encoding can never be hidden)
  efficiency = hidden / hideable                (1.0: the shorter side entirely overlapped)
Each measurement: one warm-up, then the median of --repeats runs. The pipelined run's tokens are
compared with the sequential run's ("tokens_match").

Shapes: "idefics-9b" (default on a GPU): IDEFICS-9B's vision encoder (ViT-H/14 at 224 px, 257
tokens per frame) and perceiver (depth 6, 16 x 96, 64 latents) with a LLaMA-7B-shaped decoder and
8 cross-attention blocks, random weights, bf16: about 18 GB, builds in seconds on an H100/H200.
"small" halves the decoder and vision depth if the 9B shape does not fit the time budget;
"tiny" (--smoke, the CPU) only exercises the code path.

    python bench/bench_video_overlap.py                 # GPU, idefics-9b
    python bench/bench_video_overlap.py --smoke         # CPU smoke test
Writes bench_video_overlap.json to $OUT (else bench/results/) and prints a table.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a script from a checkout without an installed lmmrt
    sys.path.insert(0, str(REPO))

from lmmrt.api import Model  # noqa: E402
from lmmrt.models.config import (  # noqa: E402
    DecoderConfig,
    ModelConfig,
    PerceiverConfig,
    VisionConfig,
    XAttnConfig,
)
from lmmrt.models.random_init import random_model  # noqa: E402
from lmmrt.runtime.video import VideoClip, resolve_mode  # noqa: E402
from lmmrt.runtime.video_stream import _ChunkEncoder, _decode_chunk, generate_video_stream  # noqa: E402


def shape_config(shape: str, demo: ModelConfig, max_frames: int) -> ModelConfig:
    """The benchmark model's config; token ids (image marker, bos, eos, pad) are the demo's, so the
    demo tokenizer drives it."""
    if shape == "tiny":
        return dataclasses.replace(demo, perceiver=dataclasses.replace(demo.perceiver, max_frames=max_frames))
    vit_layers, lm_layers = {"idefics-9b": (32, 32), "small": (16, 16)}[shape]
    vision = VisionConfig(image_size=224, patch_size=14, width=1280, layers=vit_layers, heads=16, mlp_dim=5120,
                          act="gelu", output="all_tokens")
    perceiver = PerceiverConfig(dim=1280, depth=6, heads=16, head_dim=96, n_latents=64, mlp_dim=5120,
                                mlp_act="relu", max_frames=max_frames)
    decoder = DecoderConfig(family="llama", vocab_size=32002, dim=4096, layers=lm_layers, heads=32,
                            ffn_dim=11008, max_seq_len=2048)
    xattn = XAttnConfig(style="idefics", layers=list(range(0, lm_layers, 4)), heads=32, head_dim=128,
                        media_dim=1280, ffn_dim=11008)
    return dataclasses.replace(demo, vision=vision, perceiver=perceiver, decoder=decoder, xattn=xattn)


def build_model(shape: str, device: torch.device, dtype: torch.dtype, max_frames: int, backend: str) -> Model:
    from lmmrt.demo import demo_model

    demo = demo_model(device="cpu", backend="torch")
    cfg = shape_config(shape, demo.config, max_frames)
    return Model(random_model(cfg, seed=0, device=device, dtype=dtype), cfg, demo.tokenizer, backend=backend)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device, repeats: int) -> tuple[float, object]:
    """(median seconds over `repeats` runs after one warm-up, last result)."""
    out = fn()
    times = []
    for _ in range(repeats):
        sync(device)
        t0 = time.perf_counter()
        out = fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times), out


def run_key(device: torch.device, smoke: bool) -> dict:
    try:  # the shared harness, when it is there, files results the same way as the other benches
        from bench.harness import run_key as harness_key

        return harness_key(device, smoke=smoke)
    except Exception:
        pass
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True,
                                timeout=10).stdout.strip() or None
    except OSError:
        commit = None
    return {"gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({os.cpu_count()} cores)",
            "torch": torch.__version__, "cuda": torch.version.cuda, "python": platform.python_version(),
            "git_commit": os.environ.get("LMMRT_GIT_COMMIT") or commit or "unknown", "smoke": smoke}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--smoke", action="store_true", help="tiny shapes, CPU-friendly: exercises the code path")
    ap.add_argument("--shape", choices=["idefics-9b", "small", "tiny"], default=None)
    ap.add_argument("--mode", choices=["frames", "clip"], default="frames",
                    help="frames: F media items per chunk (IDEFICS has no frame_embs); clip: one item of F frames")
    ap.add_argument("--chunks", type=int, default=None)
    ap.add_argument("--chunk-frames", type=int, default=None)
    ap.add_argument("--new-tokens", type=int, default=None)
    ap.add_argument("--repeats", type=int, default=None)
    ap.add_argument("--frame-size", type=int, nargs=2, default=None, metavar=("H", "W"))
    ap.add_argument("--dtype", choices=["bfloat16", "float16", "float32"], default=None)
    ap.add_argument("--backend", default="auto", help="torch | triton | cuda | auto")
    args = ap.parse_args(argv)

    device = torch.device("cuda" if torch.cuda.is_available() and not args.smoke else "cpu")
    smoke = args.smoke or device.type == "cpu"
    if smoke and not args.smoke:
        print("no GPU: running the --smoke configuration (tiny shapes; timings say nothing about a GPU)")
    shape = args.shape or ("tiny" if smoke else "idefics-9b")
    n_chunks = args.chunks or (3 if smoke else 6)
    chunk_frames = args.chunk_frames or (2 if smoke else 8)
    new_tokens = args.new_tokens or (4 if smoke else 32)
    repeats = args.repeats or (1 if smoke else 3)
    h, w = args.frame_size or ((48, 64) if smoke else (360, 640))
    dtype = getattr(torch, args.dtype or ("float32" if device.type == "cpu" else "bfloat16"))

    t0 = time.perf_counter()
    model = build_model(shape, device, dtype, chunk_frames if args.mode == "clip" else 0, args.backend)
    sync(device)
    build_s = time.perf_counter() - t0
    mode = resolve_mode(model, args.mode, chunk_frames)
    rng = np.random.default_rng(0)
    clips = [VideoClip(list(rng.integers(0, 256, (chunk_frames, h, w, 3), dtype=np.uint8)),
                       [(k * chunk_frames + i) / 30.0 for i in range(chunk_frames)]) for k in range(n_chunks)]
    template = "User: {video} Describe what happens.\nAssistant:"
    gen_kw = dict(max_new_tokens=new_tokens, ignore_eos=True)

    def encode_all():
        enc = _ChunkEncoder(model, mode, side_stream=False)
        return [enc.submit(k, c) for k, c in enumerate(clips)]

    encoded = encode_all()
    sync(device)

    def decode_all():
        return [_decode_chunk(model, e, template, mode, None, gen_kw) for e in encoded]

    def stream(pipelined):
        return lambda: list(generate_video_stream(model, clips, template, mode=mode, pipelined=pipelined, **gen_kw))

    t_enc, _ = timed(encode_all, device, repeats)
    t_dec, _ = timed(decode_all, device, repeats)
    t_seq, seq = timed(stream(False), device, repeats)
    t_pipe, piped = timed(stream(True), device, repeats)
    encoded = None  # free the pre-encoded media before the result is written

    hidden = t_seq - t_pipe
    hideable = min(t_enc * (n_chunks - 1) / n_chunks, t_dec)
    result = {
        "bench": "video_overlap",
        "key": run_key(device, smoke),
        "config": {"shape": shape, "mode": mode, "dtype": str(dtype).removeprefix("torch."), "chunks": n_chunks,
                   "chunk_frames": chunk_frames, "frame_hw": [h, w], "new_tokens_per_chunk": new_tokens,
                   "repeats": repeats, "backend": model.backend, "model_build_s": round(build_s, 3),
                   "vision": dataclasses.asdict(model.config.vision), "decoder_layers": model.config.decoder.layers},
        "seconds": {"encode_only": t_enc, "decode_only": t_dec, "sequential": t_seq, "pipelined": t_pipe},
        "hidden_s": hidden,
        "hideable_s": hideable,
        "overlap_efficiency": hidden / hideable if hideable > 0 else float("nan"),
        "speedup": t_seq / t_pipe if t_pipe > 0 else float("nan"),
        "tokens_match": [c.result.token_ids for c in piped] == [c.result.token_ids for c in seq],
    }
    if device.type == "cpu":
        result["note"] = ("CPU smoke run: no CUDA streams, encoding runs inline, so nothing overlaps and any "
                          "difference between sequential and pipelined is noise")

    print(f"video overlap: {shape} ({mode} mode, {dtype}), {n_chunks} chunks x {chunk_frames} frames "
          f"{w}x{h}, {new_tokens} new tokens/chunk, on {result['key'].get('gpu')}")
    print(f"{'measure':<16}{'seconds':>10}{'ms/chunk':>11}")
    for name, s in result["seconds"].items():
        print(f"{name:<16}{s:>10.3f}{1e3 * s / n_chunks:>11.1f}")
    print(f"hidden {hidden:.3f} s of hideable {hideable:.3f} s -> overlap efficiency "
          f"{result['overlap_efficiency']:.2f}, speedup {result['speedup']:.2f}x, "
          f"tokens match: {result['tokens_match']}")

    out_dir = Path(os.environ["OUT"]) if os.environ.get("OUT") else REPO / "bench" / "results"
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / ("bench_video_overlap" + ("_smoke" if smoke else "") + ".json")
    path.write_text(json.dumps(result, indent=2, default=str) + "\n")
    if "note" in result:
        print(result["note"])
    print(f"wrote {path}")
    return result


if __name__ == "__main__":
    main()
