"""Compile lmmrt's CUDA kernels with NVRTC (through CuPy's low-level bindings), no GPU needed.

The sources are the extension's own torch-free templates (csrc/include/lmmrt/*.cuh); a generated
translation unit instantiates every kernel the host launchers of csrc/*.cu would, by NVRTC name
expressions, so the cubin's mangled entry names come back from NVRTC itself. CuPy's high-level
`compile_with_cache` asks the driver for a device first; `cupy_backends.cuda.libs.nvrtc` does not,
so this module also runs on a CI box without a GPU (`lmmrt build-kernels`).

Cubins are cached on disk under a key of the source (generated unit + every header), the arch and
the NVRTC version: a hit loads the cubin and skips NVRTC entirely. `-Xptxas -v` puts ptxas'
register/spill report into the NVRTC log, which is kept beside each cubin.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import importlib
import json
import os
import re
import tempfile
import time
import warnings
from pathlib import Path

from lmmrt.kernels.cuda_jit.kernel_params import DECODE_THREADS, DECODE_UNROLL, struct_layout_asserts

CTYPES = {"float32": "float", "float16": "__half", "bfloat16": "__nv_bfloat16"}
_SIZE = {"float32": 4, "float16": 2, "bfloat16": 2}
DECODE_DTYPES = ("float16", "bfloat16")
HEAD_DIMS = (64, 96, 128)
# (activation dtype, weight/gate dtype) pairs the extension's dispatch (csrc/norms.cu) instantiates.
NORM_DTYPE_PAIRS = (("float32", "float32"), ("float16", "float16"), ("float16", "float32"),
                    ("bfloat16", "bfloat16"), ("bfloat16", "float32"))
DEFAULT_ARCHS = (80, 90)
TOOLKIT_INCLUDE = Path("/usr/local/cuda/include")

# NVRTC ships no C library headers: the two things the kernels take from them.
_CSTDINT_SHIM = ("#pragma once\ntypedef signed char int8_t; typedef short int16_t; typedef int int32_t;\n"
                 "typedef long long int64_t; typedef unsigned char uint8_t; typedef unsigned short uint16_t;\n"
                 "typedef unsigned int uint32_t; typedef unsigned long long uint64_t;\n"
                 "typedef unsigned long long uintptr_t;\n")
_PRELUDE = "#ifndef INFINITY\n#define INFINITY __int_as_float(0x7f800000)\n#endif\n"


class KernelBuildError(RuntimeError):
    """NVRTC rejected a kernel source; the message carries NVRTC's log."""


class CudaJitUnavailable(ImportError):
    """A package or header the JIT needs is missing; the message says which to install."""


class KernelCacheError(OSError):
    """The kernel cache directory cannot be written (an error only where storing is the point: build-kernels)."""


def norm_vec(dtype: str, weight_dtype: str) -> int:
    """Elements per 16-byte pack of the norm kernel (a pack of T and of WT must both be aligned)."""
    return min(16 // _SIZE[dtype], 16 // _SIZE[weight_dtype])


def gated_vec(dtype: str) -> int:
    return 16 // _SIZE[dtype]


@dataclasses.dataclass(frozen=True)
class KernelGroup:
    """One NVRTC program (one cubin): the kernels of one csrc/*.cu file. `kernels` maps the key a
    launcher asks for to the C++ name expression NVRTC instantiates."""

    name: str
    header: str
    kernels: dict

    def source(self) -> str:
        lines = [_PRELUDE, f'#include "lmmrt/{self.header}"', struct_layout_asserts(),
                 f"static_assert(lmmrt::decode_detail::kDecodeThreads == {DECODE_THREADS} && "
                 f"lmmrt::decode_detail::kDecodeUnroll == {DECODE_UNROLL}, \"decode launch geometry "
                 "changed: update lmmrt/kernels/cuda_jit/kernel_params.py\");"
                 if self.name == "masked_cross_attention_decode" else ""]
        return "\n".join(lines) + "\n"


def _decode_group() -> KernelGroup:
    k = {}
    for dt in DECODE_DTYPES:
        for hd in HEAD_DIMS:
            t = CTYPES[dt]
            k[f"decode_split/{dt}/{hd}"] = (f"lmmrt::decode_detail::decode_split_kernel<{t}, {hd}, "
                                            "lmmrt::decode_detail::kDecodeThreads, "
                                            "lmmrt::decode_detail::kDecodeUnroll>")
            k[f"decode_combine/{dt}/{hd}"] = f"lmmrt::decode_detail::decode_combine_kernel<{t}, {hd}>"
    return KernelGroup("masked_cross_attention_decode", "masked_cross_attention_decode.cuh", k)


def _norms_group() -> KernelGroup:
    k = {}
    for dt, wdt in NORM_DTYPE_PAIRS:
        t, w = CTYPES[dt], CTYPES[wdt]
        for vec in sorted({norm_vec(dt, wdt), 1}):
            k[f"norm/{dt}/{wdt}/{vec}"] = f"lmmrt::norm_detail::norm_kernel<{t}, {w}, {vec}>"
        for vec in sorted({gated_vec(dt), 1}):
            k[f"gated_residual/{dt}/{wdt}/{vec}"] = f"lmmrt::norm_detail::gated_residual_kernel<{t}, {w}, {vec}>"
    return KernelGroup("norms", "norms.cuh", k)


GROUPS = {g.name: g for g in (_decode_group(), _norms_group())}


# ---- where things are ---------------------------------------------------------------------------

def kernel_include_dir() -> Path:
    """csrc/include: packaged beside lmmrt in a wheel (lmmrt/_csrc/include), else the source tree."""
    here = Path(__file__).resolve()
    for cand in (here.parents[2] / "_csrc" / "include", here.parents[3] / "csrc" / "include"):
        if (cand / "lmmrt" / "common.cuh").is_file():
            return cand
    raise CudaJitUnavailable(f"lmmrt's CUDA sources (csrc/include/lmmrt/*.cuh) are not installed next to {here.parents[2]}")


def cuda_include_dir() -> Path:
    """The CUDA headers the kernels include (cuda_bf16.h, cuda_fp16.h), found as CuPy finds them:
    NVIDIA's pip wheels first, then CUDA_PATH / CUDA_HOME / the toolkit, via cuda.pathfinder."""
    env = os.environ.get("LMMRT_CUDA_INCLUDE")
    cands = [Path(env)] if env else []
    try:
        from cuda import pathfinder

        found = pathfinder.find_nvidia_header_directory("cudart")
        if found:
            cands.append(Path(found))
    except Exception:  # cuda-pathfinder missing or too old: fall back to the usual places
        pass
    for var in ("CUDA_PATH", "CUDA_HOME"):
        if os.environ.get(var):
            cands.append(Path(os.environ[var]) / "include")
    cands.append(TOOLKIT_INCLUDE)
    for c in cands:
        if (c / "cuda_bf16.h").is_file():
            return c
    raise CudaJitUnavailable(
        "the CUDA headers (cuda_bf16.h) were not found: pip install nvidia-cuda-runtime (CUDA 13; "
        "nvidia-cuda-runtime-cu12 for CUDA 12), or set LMMRT_CUDA_INCLUDE / CUDA_HOME to a toolkit")


def _nvrtc():
    try:
        nvrtc = importlib.import_module("cupy_backends.cuda.libs.nvrtc")
    except ImportError as e:  # cupy_backends is part of CuPy
        raise CudaJitUnavailable(
            "compiling lmmrt's CUDA kernels with NVRTC needs CuPy, which is not installed: install it first with "
            "pip install \"lmmrt[cupy]\" (CUDA 13 driver) or \"lmmrt[cupy-cuda12]\" (CUDA 12 driver); in the venv "
            "`make demo` made: make install EXTRAS=cupy") from e
    try:
        nvrtc.getVersion()  # loads libnvrtc: fails here when no NVRTC library is installed
    except Exception as e:
        raise CudaJitUnavailable(
            f"CuPy is installed but cannot load NVRTC ({type(e).__name__}: {e}): pip install nvidia-cuda-nvrtc "
            "(nvidia-cuda-nvrtc-cu12 for a CUDA 12 driver), or reinstall with pip install \"lmmrt[cupy]\"") from e
    return nvrtc


def nvrtc_version() -> tuple[int, int]:
    return tuple(_nvrtc().getVersion())


def default_cache_dir() -> Path:
    if os.environ.get("LMMRT_KERNEL_CACHE"):
        return Path(os.environ["LMMRT_KERNEL_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "lmmrt" / "kernels"


# ---- compile + cache ----------------------------------------------------------------------------

@dataclasses.dataclass
class CompiledGroup:
    group: str
    arch: int
    cubin: bytes
    entries: dict        # launcher key -> mangled entry name
    resources: dict      # mangled entry name -> {"registers", "spill_stores", "spill_loads", "smem"}
    log: str
    cached: bool         # loaded from the disk cache (no NVRTC call)
    seconds: float


def _options(arch: int, include: Path, cuda_include: Path) -> list:
    # As nvcc builds the extension (CMakeLists.txt, Release: -O3, -DNDEBUG, fmad on); NVRTC has no
    # --expt-relaxed-constexpr, which the kernels do not need.
    return [f"--gpu-architecture=sm_{arch}", "--std=c++17", "-DNDEBUG",
            f"-I{include}", f"-I{cuda_include}", "-Xptxas=-v"]


def cache_key(source: str, arch: int, version: tuple, include: Path) -> str:
    h = hashlib.sha256(source.encode())
    for f in sorted((include / "lmmrt").iterdir()):
        h.update(f.name.encode() + b"\0" + f.read_bytes())
    h.update(f"sm_{arch} nvrtc {version[0]}.{version[1]}".encode())
    return h.hexdigest()[:20]


_RES_LINE = re.compile(r"Function properties for (\S+)\n.*?(\d+) bytes spill stores, (\d+) bytes spill loads"
                       r".*?Used (\d+) registers(?:.*?(\d+) bytes smem)?", re.S)


def parse_ptxas_log(log: str) -> dict:
    """ptxas -v's per-entry report (its 'Function properties' blocks) -> per entry name counts."""
    out = {}
    for block in re.split(r"(?=ptxas info\s*: Compiling entry function)", log):
        m = _RES_LINE.search(block)
        if m:
            out[m.group(1)] = {"registers": int(m.group(4)), "spill_stores": int(m.group(2)),
                               "spill_loads": int(m.group(3)), "smem": int(m.group(5) or 0)}
    return out


def compile_group(name: str, arch: int, *, cache_dir: Path | None = None, source: str | None = None,
                  cache_required: bool = False) -> CompiledGroup:
    """The cubin of kernel group `name` for sm_`arch`: from the disk cache, else compiled by NVRTC
    (and cached). `source` replaces the generated translation unit (tests of the error path).
    cache_required: a cache that cannot be written raises KernelCacheError (else: a warning)."""
    group = GROUPS[name]
    nvrtc = _nvrtc()
    version = tuple(nvrtc.getVersion())
    include, cuda_include = kernel_include_dir(), cuda_include_dir()
    src = group.source() if source is None else source
    cache_dir = default_cache_dir() if cache_dir is None else Path(cache_dir)
    stem = f"{name}-sm{arch}-nvrtc{version[0]}.{version[1]}-{cache_key(src, arch, version, include)}"
    cubin_path, meta_path = cache_dir / f"{stem}.cubin", cache_dir / f"{stem}.json"
    t0 = time.perf_counter()
    if cubin_path.is_file() and meta_path.is_file():
        try:
            meta = json.loads(meta_path.read_text())
            return CompiledGroup(name, arch, cubin_path.read_bytes(), meta["entries"], meta["resources"],
                                 meta["log"], True, time.perf_counter() - t0)
        except (OSError, ValueError, KeyError):
            pass  # a torn or foreign cache entry: compile again and overwrite it
    prog = nvrtc.createProgram(src, f"lmmrt_{name}.cu", [_CSTDINT_SHIM.encode()], [b"cstdint"])
    try:
        for expr in group.kernels.values():
            nvrtc.addNameExpression(prog, expr)
        try:
            nvrtc.compileProgram(prog, _options(arch, include, cuda_include))
        except nvrtc.NVRTCError as e:
            log = nvrtc.getProgramLog(prog)
            raise KernelBuildError(f"NVRTC failed to compile the {name} kernels for sm_{arch} ({e}):\n{log}") from None
        log = nvrtc.getProgramLog(prog)
        entries = {key: nvrtc.getLoweredName(prog, expr) for key, expr in group.kernels.items()}
        cubin = bytes(nvrtc.getCUBIN(prog))
    finally:
        nvrtc.destroyProgram(prog)
    result = CompiledGroup(name, arch, cubin, entries, parse_ptxas_log(log), log, False, time.perf_counter() - t0)
    try:
        _write_cache(cache_dir, cubin_path, meta_path, result)
    except KernelCacheError as e:
        if cache_required:
            raise
        # the cache is an optimisation on first use: a read-only or full disk costs a recompile next run
        warnings.warn(f"{e}; the kernels will be compiled again next time", stacklevel=2)
    return result


def make_cache_dir(cache_dir) -> None:
    """Create the cache directory, or raise KernelCacheError naming it."""
    cache_dir = Path(cache_dir)
    if cache_dir.exists() and not cache_dir.is_dir():
        raise KernelCacheError(f"kernel cache directory {cache_dir} is not a directory")
    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise KernelCacheError(f"cannot create the kernel cache directory {cache_dir}: {e.strerror or e}") from None


@functools.cache
def _file_mode() -> int:
    # 0644 under the usual umask, as open() would create it (mkstemp makes 0600): a cache built by one user,
    # e.g. root in a container image, must be readable by the user who runs the model. Read once: os.umask
    # can only be read by setting it.
    mask = os.umask(0o022)
    os.umask(mask)
    return 0o666 & ~mask


def _write_atomic(path: Path, data: bytes) -> None:
    """Temporary file + fsync + rename: a concurrent reader, or one after a crash, sees a whole file or none."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, _file_mode())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def _write_cache(cache_dir: Path, cubin_path: Path, meta_path: Path, r: CompiledGroup) -> None:
    make_cache_dir(cache_dir)
    try:
        for path, data in ((cubin_path, r.cubin),
                           (meta_path, json.dumps({"entries": r.entries, "resources": r.resources,
                                                   "log": r.log}).encode())):
            _write_atomic(path, data)
    except OSError as e:
        raise KernelCacheError(f"cannot write to the kernel cache directory {cache_dir}: {e.strerror or e}") from None


def build_all(archs=DEFAULT_ARCHS, *, cache_dir: Path | None = None) -> list:
    """Every kernel group for every arch (what `lmmrt build-kernels` runs); storing them is the point, so a
    cache directory that cannot be written is an error (KernelCacheError), raised before any compile."""
    cache_dir = default_cache_dir() if cache_dir is None else Path(cache_dir)
    make_cache_dir(cache_dir)
    return [compile_group(name, int(arch), cache_dir=cache_dir, cache_required=True)
            for arch in archs for name in GROUPS]


def supported_archs() -> tuple:
    return tuple(int(a) for a in _nvrtc().getSupportedArchs())
