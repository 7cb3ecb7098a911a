"""Achieved bandwidth of the CUDA decode masked cross-attention kernel vs the torch reference.

IDEFICS-9B cross-attention shape: 32 heads x 128, 64 latents per media item, bfloat16, cumulative
mode, every sequence attending to all of its media (1 or 8 items), batch 1 / 8 / 32. Bytes = K and
V of every attended media item (each read once) + q + out. Standalone (the general harness lives
elsewhere in bench/).

Kernel time: a CUDA graph of one call per rotating K/V copy (the copies together exceed the L2, so
the cache does not flatter small shapes), replayed and timed with CUDA events; median per call.
"Eager" times the same calls launched from Python (launch overhead included). The reference
syncs on the host (it reads media_count.max()), so it is timed eagerly.

    python bench/bench_cuda_decode.py [--json PATH] [--reps N]
Writes JSON to PATH, else to $OUT/bench_cuda_decode.json when OUT is set.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

H, D, L = 32, 128, 64
DEVICE = "cuda"
ROTATE_BYTES = 512 << 20  # K/V bytes cycled through per graph: well above any L2
# Device-to-device copy bandwidth measured on the GPU machines (shared docs), GB/s.
CEILINGS_GBPS = {"H200": 4300.0, "H100": 3000.0}


def _ceiling(name: str) -> float | None:
    return next((v for k, v in CEILINGS_GBPS.items() if k in name), None)


def _commit() -> str | None:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=Path(__file__).parent, check=True).stdout.strip()
    except Exception:
        return None


def _time_ms(fn, reps: int, calls_per_rep: int) -> float:
    """Median milliseconds per call of fn() (which makes calls_per_rep calls), by CUDA events."""
    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / calls_per_rep)
    return statistics.median(times)


def bench_shape(B: int, n_media: int, reps: int) -> dict:
    from lmmrt.kernels import masked_cross_attention_cuda as mxa
    from lmmrt.kernels.masked_cross_attention import masked_cross_attention_reference

    dev, dt = torch.device(DEVICE), torch.bfloat16
    N = B * n_media
    kv_bytes = 2 * N * L * H * D * dt.itemsize
    io_bytes = kv_bytes + 2 * B * H * D * dt.itemsize
    copies = max(1, min(512, math.ceil(ROTATE_BYTES / kv_bytes)))
    q = torch.randn(B, 1, H, D, device=dev, dtype=dt)
    kvs = [(torch.randn(N, L, H, D, device=dev, dtype=dt), torch.randn(N, L, H, D, device=dev, dtype=dt))
           for _ in range(copies)]
    tt = torch.full((B, 1), n_media, device=dev, dtype=torch.int64)
    ms = torch.arange(B, device=dev, dtype=torch.int32) * n_media
    mc = torch.full((B,), n_media, device=dev, dtype=torch.int32)

    def run_all():
        for k, v in kvs:
            mxa.masked_cross_attention_decode(q, k, v, tt, ms, mc, mode="cumulative")

    run_all()  # warm-up (and first-call setup) outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        run_all()
    t_graph = _time_ms(graph.replay, reps, copies)
    t_eager = _time_ms(run_all, max(3, reps // 4), copies)

    k0, v0 = kvs[0]
    ref_calls = min(copies, 8)
    t_ref = _time_ms(lambda: [masked_cross_attention_reference(q, k, v, tt, ms, mc, mode="cumulative")
                              for k, v in kvs[:ref_calls]], max(3, reps // 4), ref_calls)
    # Agreement check on the benchmarked inputs (cheap insurance for a number worth reporting).
    got = mxa.masked_cross_attention_decode(q, k0, v0, tt, ms, mc, mode="cumulative").float()
    ref = masked_cross_attention_reference(q.float(), k0.float(), v0.float(), tt, ms, mc, mode="cumulative")
    max_err = (got - ref).abs().max().item()
    splits = mxa.pick_num_splits(B, H, N * L, mxa._sm_count(dev.index or 0))
    gbps = lambda ms_: io_bytes / (ms_ * 1e-3) / 1e9
    return dict(batch=B, media=n_media, keys_per_seq=n_media * L, num_splits=splits, bytes=io_bytes,
                rotating_copies=copies, kernel_graph_us=t_graph * 1e3, kernel_graph_gbps=gbps(t_graph),
                kernel_eager_us=t_eager * 1e3, kernel_eager_gbps=gbps(t_eager),
                torch_ref_us=t_ref * 1e3, torch_ref_gbps=gbps(t_ref), max_abs_err_vs_fp32=max_err)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", default=None, help="output JSON path (default: $OUT/bench_cuda_decode.json)")
    ap.add_argument("--reps", type=int, default=20)
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_cuda_decode: no CUDA device, nothing to measure")
        return 0
    from lmmrt.kernels.backend import cuda_build_info, cuda_extension

    if cuda_extension() is None:
        print("bench_cuda_decode: lmmrt._C is not built")
        return 1
    name = torch.cuda.get_device_name()
    ceiling = _ceiling(name)
    rows = [bench_shape(B, n, args.reps) for n in (1, 8) for B in (1, 8, 32)]

    print(f"# decode masked cross-attention, cumulative, {H} heads x {D}, {L} latents, bf16 on {name}"
          + (f" (copy ceiling {ceiling:.0f} GB/s)" if ceiling else ""))
    hdr = f"{'B':>3} {'media':>5} {'splits':>6} {'MB':>8} {'graph us':>9} {'GB/s':>7} {'%ceil':>6} " \
          f"{'eager us':>9} {'ref us':>9} {'ref GB/s':>8} {'speedup':>7} {'maxerr':>8}"
    print(hdr)
    for r in rows:
        pct = f"{100 * r['kernel_graph_gbps'] / ceiling:5.1f}%" if ceiling else "   n/a"
        print(f"{r['batch']:>3} {r['media']:>5} {r['num_splits']:>6} {r['bytes'] / 1e6:>8.2f} "
              f"{r['kernel_graph_us']:>9.2f} {r['kernel_graph_gbps']:>7.0f} {pct:>6} {r['kernel_eager_us']:>9.2f} "
              f"{r['torch_ref_us']:>9.1f} {r['torch_ref_gbps']:>8.0f} {r['torch_ref_us'] / r['kernel_graph_us']:>6.1f}x "
              f"{r['max_abs_err_vs_fp32']:>8.1e}")

    result = dict(bench="cuda_decode_masked_cross_attention", gpu=name, ceiling_gbps=ceiling,
                  torch=torch.__version__, cuda=torch.version.cuda, extension=cuda_build_info(), commit=_commit(),
                  shape=dict(heads=H, head_dim=D, latents=L, dtype="bfloat16", mode="cumulative"), rows=rows)
    path = args.json or (os.path.join(os.environ["OUT"], "bench_cuda_decode.json") if os.environ.get("OUT") else None)
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(result, indent=2))
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
