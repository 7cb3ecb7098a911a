"""The benchmark run every lmmrt benchmark uses: BenchRun times each case's implementations on the
same rotating inputs (the timing methods and ceilings are in bench/timing.py), compares them with the
first (eager) one, and rewrites its JSON after every case; results are filed under a key of the
device, the software and the source (run_key).

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
from dataclasses import dataclass
from pathlib import Path

import torch

from bench.timing import measure_ceilings, roofline, sync_device, time_calls, time_cuda_graph

# also importable from here, as the benchmarks do
from bench.timing import rotation_sets as rotation_sets

REPO = Path(__file__).resolve().parents[1]

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
                sync_device(self.device)
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
