"""The timing harness every lmmrt benchmark uses.

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
- NVML telemetry (GPU name, clocks, power, memory, temperature, throttle reasons) via nvidia-ml-py,
  degrading to {"available": false, ...} where there is no driver.
"""

from __future__ import annotations

import datetime as _dt
import functools
import hashlib
import math
import os
import platform
import subprocess
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]

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


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_calls(fn: Callable, inputs: Sequence[tuple], device: torch.device, *, warmup_s: float = 0.05,
               target_s: float = 0.25, min_iters: int = 5, max_iters: int = 200) -> Timing:
    """Time fn(*inputs[i % len(inputs)]) per call. The first call (JIT, compile) is never timed;
    warm-up then runs for ~warmup_s; the number of timed calls is picked to take ~target_s."""
    n = len(inputs)
    fn(*inputs[0])
    _sync(device)
    t0, w = time.perf_counter(), 1
    while time.perf_counter() - t0 < warmup_s or w < 3:
        fn(*inputs[w % n])
        w += 1
        _sync(device)
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


# ---------------------------------------------------------------------------------------------
# telemetry and the key results are filed under
# ---------------------------------------------------------------------------------------------


def nvml_telemetry(device: torch.device | None = None) -> dict:
    """A snapshot of the GPU through NVML; {"available": False, "error": ...} without a driver."""
    try:
        import pynvml
    except ImportError as e:
        return {"available": False, "error": f"nvidia-ml-py not installed: {e}"}
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError as e:  # NVMLError_LibraryNotFound on a machine without a driver
        return {"available": False, "error": f"{type(e).__name__}: {e}"}
    out: dict = {"available": True}
    try:
        handle = None
        if device is not None and device.type == "cuda":
            uuid = getattr(torch.cuda.get_device_properties(device), "uuid", None)
            if uuid is not None:
                try:
                    handle = pynvml.nvmlDeviceGetHandleByUUID(f"GPU-{uuid}")
                except pynvml.NVMLError:
                    handle = None
        if handle is None:
            handle = pynvml.nvmlDeviceGetHandleByIndex((device.index or 0) if device is not None else 0)

        def get(name, fn):
            try:
                v = fn()
                out[name] = v.decode() if isinstance(v, bytes) else v
            except (pynvml.NVMLError, AttributeError) as e:  # AttributeError: a call this pynvml lacks
                out[name] = f"n/a ({type(e).__name__}: {e})"

        get("name", lambda: pynvml.nvmlDeviceGetName(handle))
        get("driver", pynvml.nvmlSystemGetDriverVersion)
        get("sm_clock_mhz", lambda: pynvml.nvmlDeviceGetClockInfo(handle, pynvml.NVML_CLOCK_SM))
        get("mem_clock_mhz", lambda: pynvml.nvmlDeviceGetClockInfo(handle, pynvml.NVML_CLOCK_MEM))
        get("sm_clock_max_mhz", lambda: pynvml.nvmlDeviceGetMaxClockInfo(handle, pynvml.NVML_CLOCK_SM))
        get("mem_clock_max_mhz", lambda: pynvml.nvmlDeviceGetMaxClockInfo(handle, pynvml.NVML_CLOCK_MEM))
        get("power_w", lambda: pynvml.nvmlDeviceGetPowerUsage(handle) / 1e3)
        get("power_limit_w", lambda: pynvml.nvmlDeviceGetEnforcedPowerLimit(handle) / 1e3)
        get("temperature_c", lambda: pynvml.nvmlDeviceGetTemperature(handle, pynvml.NVML_TEMPERATURE_GPU))
        get("pstate", lambda: pynvml.nvmlDeviceGetPerformanceState(handle))
        get("clocks_event_reasons", lambda: hex(pynvml.nvmlDeviceGetCurrentClocksThrottleReasons(handle)))

        def mem():
            m = pynvml.nvmlDeviceGetMemoryInfo(handle)
            return {"used_gib": round(m.used / 2**30, 2), "total_gib": round(m.total / 2**30, 2)}

        get("memory", mem)
    finally:
        try:
            pynvml.nvmlShutdown()
        except pynvml.NVMLError:
            pass
    return out


def _git(*args: str) -> str | None:
    try:
        r = subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return r.stdout.strip() if r.returncode == 0 else None


@functools.lru_cache(maxsize=None)
def source_digest() -> str:
    """sha256 of lmmrt/, csrc/ and bench/ sources (first 12 hex digits): identifies the code even
    where the working tree was copied without .git (the device machine)."""
    h = hashlib.sha256()
    for top in ("lmmrt", "csrc", "bench"):
        for p in sorted((REPO / top).rglob("*")):
            if p.is_file() and p.suffix in (".py", ".cu", ".cuh", ".cpp", ".h", ".sh"):
                h.update(str(p.relative_to(REPO)).encode())
                h.update(p.read_bytes())
    return h.hexdigest()[:12]


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"


def run_key(device: torch.device, *, smoke: bool) -> dict:
    """What the results are filed under: GPU, versions and commit."""
    try:
        import triton

        triton_version = triton.__version__
    except Exception:
        triton_version = None
    import lmmrt
    from lmmrt.kernels import backend as _backend

    commit = os.environ.get("LMMRT_GIT_COMMIT") or _git("rev-parse", "HEAD")
    dirty = _git("status", "--porcelain", "--untracked-files=no")
    return {
        "gpu": device_name(device),
        "device": device.type,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "triton": triton_version,
        "lmmrt": lmmrt.__version__,
        "python": platform.python_version(),
        "git_commit": commit or "unknown",
        "git_dirty": bool(dirty) if dirty is not None else None,
        "source_digest": source_digest(),
        "cuda_extension": _backend.cuda_extension() is not None,
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "smoke": smoke,
    }


def slug(text: str) -> str:
    keep = [c.lower() if c.isalnum() else "-" for c in text]
    return "-".join(p for p in "".join(keep).split("-") if p)


def default_out_dir(device: torch.device) -> Path:
    """$OUT when set (the device tool), else bench/results/<gpu-or-cpu>-<date>/."""
    if os.environ.get("OUT"):
        return Path(os.environ["OUT"])
    name = slug(torch.cuda.get_device_name(device)) if device.type == "cuda" else "cpu"
    return REPO / "bench" / "results" / f"{name}-{_dt.date.today().isoformat()}"


def finite_positive(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x) and x > 0


def jsonable(x):
    """NaN/inf -> None (strict JSON), tensors/dtypes/devices -> str, recursively."""
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if isinstance(x, dict):
        return {str(k): jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [jsonable(v) for v in x]
    if isinstance(x, (torch.dtype, torch.device, Path)):
        return str(x)
    return x


def short_error(e: BaseException, limit: int = 400) -> str:
    msg = f"{type(e).__name__}: {e}".strip().replace("\n", " ")
    return msg if len(msg) <= limit else msg[: limit - 3] + "..."


# ---------------------------------------------------------------------------------------------
# a kernel benchmark: cases x implementations, written out after every case
# ---------------------------------------------------------------------------------------------


@dataclass
class Impl:
    """One implementation of the op under test. fn(*input_set) -> output tensor."""

    name: str  # e.g. "eager", "sdpa-dense-mask", "compile", "triton", "cuda"
    fn: Callable
    kind: str = "baseline"  # "baseline" | "lmmrt"
    graph: bool = False  # also time CUDA-graph replay (GPU only)
    compiled: bool = False  # a torch.compile baseline: skipped late in the time budget


class BenchRun:
    """Runs cases of one benchmark and keeps its JSON on disk up to date after every case, so a
    run killed by a timeout still leaves everything measured so far."""

    def __init__(self, name: str, *, device: torch.device, dtype: torch.dtype, smoke: bool, out_dir: Path,
                 budget_s: float, ceilings: dict | None = None, formulas: dict | None = None,
                 description: str = "", compile_budget_frac: float = 0.5, file_stem: str | None = None):
        self.name, self.device, self.dtype, self.smoke = name, device, dtype, smoke
        self.file_stem = file_stem or f"bench-{name}"  # the JSON is <out_dir>/<file_stem>.json
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.budget_s, self.compile_budget_frac = budget_s, compile_budget_frac
        self.t0 = time.perf_counter()
        self.key = run_key(device, smoke=smoke)
        self.telemetry = {"start": nvml_telemetry(device)}
        self.ceilings = ceilings if ceilings is not None else measure_ceilings(device, dtype, smoke=smoke)
        self.telemetry["after_ceilings"] = nvml_telemetry(device)
        self.formulas = formulas or {}
        self.description = description
        self.rows: list[dict] = []
        self.notes: list[str] = []
        self.extra: dict = {}  # benchmark-specific results beside the rows
        self.status = "running"
        self.save()

    @property
    def elapsed(self) -> float:
        return time.perf_counter() - self.t0

    @property
    def path(self) -> Path:
        return self.out_dir / f"{self.file_stem}.json"

    def timing_opts(self) -> dict:
        if self.smoke:
            return dict(warmup_s=0.01, target_s=0.03, min_iters=3, max_iters=20)
        return dict(warmup_s=0.03, target_s=0.1, min_iters=10, max_iters=100)

    def case(self, group: str, label: str, shape: dict, impls: Sequence[Impl], inputs: Sequence[tuple],
             flops: float, nbytes: float) -> list[dict]:
        """Time every implementation on the same rotating inputs; the first impl is the eager
        reference that speed-ups and errors are measured against."""
        rows, ref = [], None
        for impl in impls:
            row = {"bench": self.name, "group": group, "case": label, "shape": shape, "impl": impl.name,
                   "kind": impl.kind, "dtype": str(self.dtype).replace("torch.", ""), "flops": flops,
                   "bytes": nbytes, "rotating_sets": len(inputs), "status": "ok"}
            rows.append(row)
            if self.elapsed > self.budget_s:
                row.update(status="skipped", note="time budget spent")
                continue
            if impl.compiled and self.elapsed > self.compile_budget_frac * self.budget_s:
                row.update(status="skipped", note="time budget: torch.compile baseline skipped")
                continue
            try:
                out = impl.fn(*inputs[0])
                _sync(self.device)
                if ref is None:
                    ref = out.float()
                else:
                    err = (out.float() - ref).abs()
                    row["max_abs_err"] = float(err.max())
                    row["rel_err"] = float(err.max() / ref.abs().max().clamp_min(1e-30))
                del out
                t = time_calls(impl.fn, inputs, self.device, **self.timing_opts())
                row["launch"] = t.to_dict()
                best = t
                if impl.graph and self.device.type == "cuda":
                    try:
                        g = time_cuda_graph(impl.fn, inputs, self.device,
                                            target_s=self.timing_opts()["target_s"])
                        row["graph"] = g.to_dict()
                        best = g if g.median_ms < best.median_ms else best
                    except Exception as e:  # capture is optional: record why it failed
                        row["graph_error"] = short_error(e)
                        torch.cuda.synchronize(self.device)
                row.update(ms=best.median_ms, p10_ms=best.p10_ms, p90_ms=best.p90_ms, mode=best.method)
                row.update(roofline(flops, nbytes, best.median_ms, self.ceilings))
            except Exception as e:
                row.update(status="error", error=short_error(e))
                if isinstance(e, torch.cuda.OutOfMemoryError):
                    torch.cuda.empty_cache()
        eager = rows[0].get("ms") if rows and rows[0]["status"] == "ok" else None
        for row in rows:
            if row["status"] == "ok" and eager:
                row["speedup_vs_eager"] = eager / row["ms"]
        self.rows.extend(rows)
        self.save()
        self._progress(label, rows)
        return rows

    def _progress(self, label: str, rows: list[dict]) -> None:
        """One line per case as it finishes, so a long run shows where it is and how fast."""
        import sys

        parts = []
        for r in rows:
            if r["status"] == "ok":
                parts.append(f"{r['impl']} {r['ms']:.4g} ms" + (f" ({r['speedup_vs_eager']:.2f}x)"
                                                              if "speedup_vs_eager" in r else ""))
            else:
                parts.append(f"{r['impl']} {r['status']}")
        n = len({r["case"] for r in self.rows})
        print(f"  [{self.name} #{n}, {self.elapsed:.0f}/{self.budget_s:.0f} s] {label}: " + ", ".join(parts),
              file=sys.stderr, flush=True)

    def skip_case(self, group: str, label: str, shape: dict, impl_names: Sequence[str], why: str) -> None:
        for name in impl_names:
            self.rows.append({"bench": self.name, "group": group, "case": label, "shape": shape, "impl": name,
                              "status": "skipped", "note": why})
        self.save()

    def finish(self, status: str = "ok") -> dict:
        self.status = status
        self.telemetry["end"] = nvml_telemetry(self.device)
        self.save()
        return self.to_dict()

    def to_dict(self) -> dict:
        return {"bench": self.name, "description": self.description, "status": self.status, "key": self.key,
                "ceilings": self.ceilings, "telemetry": self.telemetry, "formulas": self.formulas,
                "wall_s": self.elapsed, "budget_s": self.budget_s, "notes": self.notes, "extra": self.extra,
                "rows": self.rows}

    def save(self) -> None:
        import json

        tmp = self.path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(jsonable(self.to_dict()), indent=1) + "\n")
        tmp.replace(self.path)
