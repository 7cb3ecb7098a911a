"""`JitKernels`: the NVRTC-compiled kernels behind the same interface as the extension `lmmrt._C`
(raw device pointers and a stream as integers), so lmmrt's wrappers run either unchanged.

Argument checks: each entry point runs the checks of csrc/bindings.cpp, in the same order with the
same messages, before anything touches CUDA; tests/kernels/test_cuda_jit.py runs every bad case
through both and requires identical errors. Then the cubin for the current device's arch is
loaded (compiled on first use, else from the disk cache) and launched with CuPy's driver binding
on the caller's stream. Both kernel groups load together on first use, so a later first launch
never loads a module inside a CUDA-graph capture.
"""

from __future__ import annotations

import ctypes
import threading

from lmmrt.kernels.cuda_jit import kernel_params as kp
from lmmrt.kernels.cuda_jit import nvrtc_build

_DTYPES = ("float32", "float16", "bfloat16")
_SIZE = {"float32": 4, "float16": 2, "bfloat16": 2}
_MIN_KEYS_PER_SPLIT = 64  # lmmrt::kMinKeysPerSplit


def _bad(fn: str, msg: str) -> ValueError:
    return ValueError(f"{fn}: {msg}")


def _dtype(fn: str, arg: str, s: str) -> str:
    if s not in _DTYPES:
        raise _bad(fn, f"{arg} must be 'float32', 'float16' or 'bfloat16', got '{s}'")
    return s


def _require_ptr(fn: str, arg: str, p: int, align: int) -> None:
    if p == 0:
        raise _bad(fn, f"{arg} is a null pointer")
    if p % align:
        raise _bad(fn, f"{arg} must be {align}-byte aligned")


class JitKernels:
    """Drop-in for lmmrt._C built from NVRTC cubins (one module per device, loaded on first use)."""

    def __init__(self, *, cache_dir=None):
        self._cache_dir = cache_dir
        self._modules: dict[int, dict] = {}  # device -> {launcher key: (Function, kept Module)}
        self._lock = threading.Lock()
        self.load_seconds: dict[int, float] = {}
        self.compiled: dict[int, bool] = {}

    # ---- what lmmrt._C also provides ---------------------------------------------------------------
    def build_info(self) -> dict:
        major, minor = nvrtc_build.nvrtc_version()
        return {"cuda_archs": "jit", "cuda_version": f"NVRTC {major}.{minor}", "cudart_version": None,
                "decode_min_keys_per_split": _MIN_KEYS_PER_SPLIT}

    def device_count(self) -> int:
        from cupy.cuda import runtime

        return runtime.getDeviceCount()

    # ---- module loading ------------------------------------------------------------------------
    def _functions(self) -> dict:
        from cupy.cuda import function, runtime

        dev = runtime.getDevice()
        fns = self._modules.get(dev)
        if fns is not None:
            return fns
        with self._lock:
            if dev in self._modules:
                return self._modules[dev]
            props = runtime.getDeviceProperties(dev)
            arch = props["major"] * 10 + props["minor"]
            fns, seconds, compiled = {}, 0.0, False
            for name in nvrtc_build.GROUPS:
                built = nvrtc_build.compile_group(name, arch, cache_dir=self._cache_dir)
                module = function.Module()
                module.load(built.cubin)
                for key, entry in built.entries.items():
                    fns[key] = (module.get_function(entry), module)
                seconds += built.seconds
                compiled |= not built.cached
            self.load_seconds[dev], self.compiled[dev] = seconds, compiled
            self._modules[dev] = fns
            return fns

    def _launch(self, key: str, grid, block: int, stream: int, args) -> None:
        from cupy_backends.cuda.api import driver

        fn = self._functions()[key][0]
        ptrs = (ctypes.c_void_p * len(args))(*[ctypes.addressof(a) for a in args])
        gx, gy, gz = (tuple(grid) + (1, 1))[:3]
        driver.launchKernel(fn.ptr, gx, gy, gz, block, 1, 1, 0, stream, ctypes.addressof(ptrs), 0)

    # ---- entry points (csrc/bindings.cpp) ---------------------------------------------------------
    def masked_cross_attention_decode(self, out, q, k, v, text_time, media_start, media_count, workspace, *,
                                      batch, heads, head_dim, latents, num_media, q_strides, out_strides,
                                      kv_strides, index_strides, index_int64, cumulative, scale, num_splits,
                                      dtype, stream) -> None:
        fn = "masked_cross_attention_decode"
        dt = _dtype(fn, "dtype", dtype)
        if dt == "float32":
            raise _bad(fn, "dtype must be 'float16' or 'bfloat16' (float32 is not supported)")
        if head_dim not in (64, 96, 128):
            raise _bad(fn, f"head_dim must be 64, 96 or 128, got {head_dim}")
        if not 0 <= batch <= 65535:
            raise _bad(fn, f"batch must be in [0, 65535], got {batch}")
        if not 0 <= heads <= 65535:
            raise _bad(fn, f"heads must be in [0, 65535], got {heads}")
        if latents < 0 or num_media < 0:
            raise _bad(fn, "latents and num_media must be >= 0")
        if not 1 <= num_splits <= 65535:
            raise _bad(fn, f"num_splits must be in [1, 65535], got {num_splits}")
        if any(s % 8 for s in (q_strides[0], q_strides[1], kv_strides[0], kv_strides[1])):
            raise _bad(fn, "q/k/v strides must be multiples of 8 elements (16-byte loads)")
        if batch == 0 or heads == 0:
            return
        _require_ptr(fn, "out", out, 2)
        _require_ptr(fn, "q", q, 16)
        if num_media > 0 and latents > 0:
            _require_ptr(fn, "k", k, 16)
            _require_ptr(fn, "v", v, 16)
        _require_ptr(fn, "text_time", text_time, 8 if index_int64[0] else 4)
        _require_ptr(fn, "media_start", media_start, 8 if index_int64[1] else 4)
        _require_ptr(fn, "media_count", media_count, 8 if index_int64[2] else 4)
        if num_splits > 1:
            _require_ptr(fn, "workspace", workspace, 4)
        ws_ml = workspace + 4 * batch * heads * num_splits * head_dim if num_splits > 1 else None
        p = kp.DecodeParams(
            out=out, q=q, k=k, v=v, text_time=text_time, media_start=media_start, media_count=media_count,
            tt_int64=index_int64[0], ms_int64=index_int64[1], mc_int64=index_int64[2],
            ws_acc=workspace if num_splits > 1 else None, ws_ml=ws_ml, batch=batch, heads=heads, latents=latents,
            num_media=num_media, q_stride_b=q_strides[0], q_stride_h=q_strides[1], out_stride_b=out_strides[0],
            out_stride_h=out_strides[1], kv_stride_tok=kv_strides[0], kv_stride_h=kv_strides[1],
            tt_stride=index_strides[0], ms_stride=index_strides[1], mc_stride=index_strides[2],
            cumulative=cumulative, scale=scale, num_splits=num_splits)
        self._launch(f"decode_split/{dt}/{head_dim}", (num_splits, heads, batch), kp.DECODE_THREADS, stream, [p])
        if num_splits > 1:
            self._launch(f"decode_combine/{dt}/{head_dim}", (heads, batch), head_dim, stream, [p])

    def fused_norm(self, out, h_out, x, residual, weight, bias, *, rows, dim, eps, layer_norm, dtype,
                   weight_dtype, stream) -> None:
        fn = "fused_norm"
        dt, wdt = _dtype(fn, "dtype", dtype), _dtype(fn, "weight_dtype", weight_dtype)
        if wdt not in (dt, "float32"):
            raise _bad(fn, "weight_dtype must equal dtype or be 'float32'")
        if not 0 <= rows <= 0x7FFFFFFF:
            raise _bad(fn, f"rows must be in [0, 2^31), got {rows}")
        if dim < 1:
            raise _bad(fn, f"dim must be >= 1, got {dim}")
        if (residual == 0) != (h_out == 0):
            raise _bad(fn, "residual and h_out must be given together")
        if bias != 0 and not layer_norm:
            raise _bad(fn, "bias is only valid with layer_norm=True")
        if rows == 0:
            return
        a, aw = _SIZE[dt], _SIZE[wdt]
        _require_ptr(fn, "out", out, a)
        _require_ptr(fn, "x", x, a)
        _require_ptr(fn, "weight", weight, aw)
        if residual:
            _require_ptr(fn, "residual", residual, a)
            _require_ptr(fn, "h_out", h_out, a)
        if bias:
            _require_ptr(fn, "bias", bias, aw)
        vec = nvrtc_build.norm_vec(dt, wdt)
        vec_ok = dim % vec == 0 and all(ptr % 16 == 0 for ptr in (out, x, weight, h_out, residual, bias) if ptr)
        per_thread = vec if vec_ok else 1
        p = kp.NormParams(out=out, h_out=h_out or None, x=x, residual=residual or None, weight=weight,
                          bias=bias or None, rows=rows, dim=dim, eps=eps, layer_norm=layer_norm)
        self._launch(f"norm/{dt}/{wdt}/{per_thread}", (rows,), kp.norm_threads(dim // per_thread), stream, [p])

    def gated_residual(self, out, x, branch, gate, *, numel, dim, gate_numel, dtype, gate_dtype, stream) -> None:
        fn = "gated_residual"
        dt, gdt = _dtype(fn, "dtype", dtype), _dtype(fn, "gate_dtype", gate_dtype)
        if gdt not in (dt, "float32"):
            raise _bad(fn, "gate_dtype must equal dtype or be 'float32'")
        if dim < 1:
            raise _bad(fn, f"dim must be >= 1, got {dim}")
        if numel < 0 or numel % dim:
            raise _bad(fn, "numel must be a non-negative multiple of dim")
        if gate_numel not in (1, dim):
            raise _bad(fn, f"gate must hold 1 or dim ({dim}) elements, got {gate_numel}")
        if numel == 0:
            return
        a = _SIZE[dt]
        _require_ptr(fn, "out", out, a)
        _require_ptr(fn, "x", x, a)
        _require_ptr(fn, "branch", branch, a)
        _require_ptr(fn, "gate", gate, _SIZE[gdt])
        vec = nvrtc_build.gated_vec(dt)
        per_thread = vec if dim % vec == 0 and out % 16 == 0 and x % 16 == 0 and branch % 16 == 0 else 1
        nvec = numel // per_thread
        args = [ctypes.c_void_p(out), ctypes.c_void_p(x), ctypes.c_void_p(branch), ctypes.c_void_p(gate),
                ctypes.c_int64(nvec), ctypes.c_int(dim), ctypes.c_bool(gate_numel == dim and dim != 1)]
        self._launch(f"gated_residual/{dt}/{gdt}/{per_thread}", (kp.gated_blocks(nvec),), kp.GATED_THREADS,
                     stream, args)
