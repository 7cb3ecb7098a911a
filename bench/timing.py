"""How the lmmrt benchmarks time a call and what they set it against (bench.harness.BenchRun uses these).

- Warm-up first (the first call pays Triton JIT / torch.compile), then timed calls: CUDA events
  around each call on a GPU, `time.perf_counter` on the CPU. We report the median and the p10/p90
  spread, never the mean of a noisy distribution.
- Rotating inputs: each case builds several input sets and the calls cycle through them, so a
  kernel cannot be flattered by finding the previous call's operands still in L2 (enough sets that
  their useful bytes together exceed a few times the L2 size).
- Optional CUDA-graph replay: the calls over all input sets are captured once in a graph and the
  graph is replayed; the time per call is replay time / calls in the graph. This removes the CPU
  launch overhead that dominates microsecond kernels (decode), and is how the runtime would run them.
- Achieved GB/s and TFLOP/s of each result are set against ceilings measured in the same process
  (`measure_ceilings`): a large device-to-device copy and a large matmul in the benchmark dtype.
  On the CPU (smoke runs) the "ceilings" are a memcpy and an fp32 matmul, labelled as such: they
  only exercise the code path, they are not a statement about any hardware.
- Fraction of roofline = roofline time / measured time, where roofline time =
  max(FLOPs / ceiling FLOP/s, bytes / ceiling B/s): 1.0 means the op ran at the speed of its
  binding resource.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

import torch

# ---------------------------------------------------------------------------------------------
# timing
# ---------------------------------------------------------------------------------------------


@dataclass
class Timing:
    median_ms: float
    p10_ms: float
    p90_ms: float
    min_ms: float
    n: int  # timed calls (graph mode: calls inside the timed replays)
    method: str  # "cuda-events" | "perf_counter" | "cuda-graph"

    def to_dict(self) -> dict:
        return asdict(self)


def _quantile(sorted_xs: Sequence[float], q: float) -> float:
    if not sorted_xs:
        return float("nan")
    pos = q * (len(sorted_xs) - 1)
    lo, hi = math.floor(pos), math.ceil(pos)
    return sorted_xs[lo] + (sorted_xs[hi] - sorted_xs[lo]) * (pos - lo)


def summarize(times_ms: Sequence[float], method: str, n: int | None = None) -> Timing:
    xs = sorted(times_ms)
    return Timing(median_ms=_quantile(xs, 0.5), p10_ms=_quantile(xs, 0.1), p90_ms=_quantile(xs, 0.9),
                  min_ms=xs[0] if xs else float("nan"), n=n if n is not None else len(xs), method=method)


def sync_device(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_calls(fn: Callable, inputs: Sequence[tuple], device: torch.device, *, warmup_s: float = 0.05,
               target_s: float = 0.25, min_iters: int = 5, max_iters: int = 200) -> Timing:
    """Time fn(*inputs[i % len(inputs)]) per call. The first call (JIT, compile) is never timed;
    warm-up then runs for ~warmup_s; the number of timed calls is picked to take ~target_s."""
    n = len(inputs)
    fn(*inputs[0])
    sync_device(device)
    t0, w = time.perf_counter(), 1
    while time.perf_counter() - t0 < warmup_s or w < 3:
        fn(*inputs[w % n])
        w += 1
        sync_device(device)
    per_call = max((time.perf_counter() - t0) / w, 1e-7)
    iters = int(min(max_iters, max(min_iters, target_s / per_call)))
    if device.type == "cuda":
        starts = [torch.cuda.Event(enable_timing=True) for _ in range(iters)]
        ends = [torch.cuda.Event(enable_timing=True) for _ in range(iters)]
        for i in range(iters):
            starts[i].record()
            fn(*inputs[i % n])
            ends[i].record()
        torch.cuda.synchronize(device)
        return summarize([s.elapsed_time(e) for s, e in zip(starts, ends)], "cuda-events")
    times = []
    for i in range(iters):
        t = time.perf_counter()
        fn(*inputs[i % n])
        times.append(1e3 * (time.perf_counter() - t))
    return summarize(times, "perf_counter")


def time_cuda_graph(fn: Callable, inputs: Sequence[tuple], device: torch.device, *, target_s: float = 0.25,
                    min_calls_per_graph: int = 8, max_replays: int = 100) -> Timing:
    """Capture calls over all input sets (repeated to >= min_calls_per_graph calls) in one CUDA
    graph, replay it, and report replay time / calls per graph. Raises when capture fails (an op
    that syncs with the host, allocates outside the graph pool, ...)."""
    n = len(inputs)
    reps = max(1, math.ceil(min_calls_per_graph / n))
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):  # warm-up on a side stream, as capture requires
        for args in inputs:
            fn(*args)
    torch.cuda.current_stream(device).wait_stream(side)
    torch.cuda.synchronize(device)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(reps):
            for args in inputs:
                fn(*args)
    calls = reps * n
    graph.replay()
    torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    graph.replay()
    torch.cuda.synchronize(device)
    per_replay = max(time.perf_counter() - t0, 1e-6)
    replays = int(min(max_replays, max(5, target_s / per_replay)))
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(replays)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(replays)]
    for i in range(replays):
        starts[i].record()
        graph.replay()
        ends[i].record()
    torch.cuda.synchronize(device)
    per_call = [s.elapsed_time(e) / calls for s, e in zip(starts, ends)]
    del graph
    return summarize(per_call, "cuda-graph", n=replays * calls)


def l2_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return int(getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 50 << 20) or (50 << 20))
    return 32 << 20  # a guess for the CPU smoke run; it only sizes the rotation


def rotation_sets(useful_bytes_per_set: float, device: torch.device, *, alloc_bytes_per_set: float | None = None,
                  max_sets: int = 64, alloc_budget: float = 4 * 2**30, smoke: bool = False) -> int:
    """How many input sets to cycle through: enough that the sets' useful bytes together exceed
    3x the L2 size, bounded by max_sets and by alloc_budget bytes of inputs in all."""
    if smoke:
        return 2
    need = math.ceil(3 * l2_bytes(device) / max(useful_bytes_per_set, 1.0))
    alloc = alloc_bytes_per_set or useful_bytes_per_set
    cap = max(1, int(alloc_budget // max(alloc, 1.0)))
    return max(1, min(max_sets, need, cap))


# ---------------------------------------------------------------------------------------------
# ceilings
# ---------------------------------------------------------------------------------------------


def measure_ceilings(device: torch.device, dtype: torch.dtype, *, smoke: bool = False) -> dict:
    """Peak rates measured now, on this device: the copy's GB/s (bytes read + written) and a large
    matmul's TFLOP/s in `dtype`. GPU: a 1 GiB device-to-device copy and an 8192^3 matmul. CPU: a
    64 MiB memcpy and a 1024^3 fp32 matmul, labelled as smoke-run stand-ins."""
    out: dict = {}
    if device.type == "cuda":
        nbytes, mm, mm_dtype = 1 << 30, 8192, dtype
        label = f"measured in this run on {torch.cuda.get_device_name(device)}: 1 GiB D2D copy, {mm}^3 {str(mm_dtype)[6:]} matmul"
    else:
        nbytes, mm, mm_dtype = 64 << 20, 1024, torch.float32
        label = "CPU smoke-run stand-ins (64 MiB memcpy, 1024^3 fp32 matmul): NOT GPU ceilings"
    src = torch.empty(nbytes, dtype=torch.uint8, device=device).random_(0, 255)
    dst = torch.empty_like(src)
    t = time_calls(lambda d, s: d.copy_(s), [(dst, src)], device, target_s=0.3 if not smoke else 0.05)
    out["copy_gbps"] = 2 * nbytes / (t.median_ms * 1e-3) / 1e9
    out["copy_bytes"] = nbytes
    del src, dst
    a = torch.randn(mm, mm, device=device, dtype=mm_dtype)
    b = torch.randn(mm, mm, device=device, dtype=mm_dtype)
    t = time_calls(torch.matmul, [(a, b)], device, target_s=0.3 if not smoke else 0.05)
    out["matmul_tflops"] = 2 * mm**3 / (t.median_ms * 1e-3) / 1e12
    out["matmul_shape"] = [mm, mm, mm]
    out["matmul_dtype"] = str(mm_dtype).replace("torch.", "")
    out["label"] = label
    out["smoke_stand_in"] = device.type != "cuda"
    del a, b
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return out


def roofline(flops: float, nbytes: float, ms: float, ceilings: dict) -> dict:
    """Achieved rates and the fraction of roofline for one measured time."""
    s = ms * 1e-3
    bw, fl = ceilings["copy_gbps"] * 1e9, ceilings["matmul_tflops"] * 1e12
    t_roof = max(flops / fl if fl > 0 else 0.0, nbytes / bw if bw > 0 else 0.0)
    return {
        "gbps": nbytes / s / 1e9 if s > 0 else float("nan"),
        "tflops": flops / s / 1e12 if s > 0 else float("nan"),
        "roofline_frac": t_roof / s if s > 0 else float("nan"),
        "bound": "memory" if nbytes / bw >= flops / fl else "compute",
    }
