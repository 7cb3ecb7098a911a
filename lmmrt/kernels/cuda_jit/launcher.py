"""`JitKernels`: the NVRTC-compiled kernels behind the same interface as the extension `lmmrt._C`
(raw device pointers and a stream as integers), so lmmrt's wrappers run either unchanged.

Argument checks: each entry point first runs lmmrt.kernels.cuda_launch_checks, the very functions
the extension's glue (csrc/bindings.cpp) calls, before anything touches CUDA. Then the cubin for
the current device's arch is loaded (compiled on first use, else from the disk cache) and launched
with CuPy's driver binding on the caller's stream. Both kernel groups load together on first use,
so a later first launch never loads a module inside a CUDA-graph capture.
"""

from __future__ import annotations

import ctypes
import threading

from lmmrt.kernels import cuda_launch_checks as checks
from lmmrt.kernels.cuda_jit import kernel_params as kp
from lmmrt.kernels.cuda_jit import nvrtc_build


class JitKernels:
    """lmmrt._C's kernel entry points over NVRTC cubins (modules loaded per device on first use)."""

    def __init__(self, *, cache_dir=None):
        self._cache_dir = cache_dir
        self._modules: dict[int, dict] = {}  # device -> {launcher key: (Function, kept Module)}
        self._lock = threading.Lock()
        self.compiled: dict[int, bool] = {}  # device -> whether NVRTC ran (not all from the cache)

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
            fns, compiled = {}, False
            for name in nvrtc_build.GROUPS:
                built = nvrtc_build.compile_group(name, arch, cache_dir=self._cache_dir)
                module = function.Module()
                module.load(built.cubin)
                for key, entry in built.entries.items():
                    fns[key] = (module.get_function(entry), module)
                compiled |= not built.cached
            self.compiled[dev] = compiled
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
        if not checks.masked_cross_attention_decode(
                out, q, k, v, text_time, media_start, media_count, workspace, batch=batch, heads=heads,
                head_dim=head_dim, latents=latents, num_media=num_media, q_strides=q_strides,
                out_strides=out_strides, kv_strides=kv_strides, index_strides=index_strides,
                index_int64=index_int64, cumulative=cumulative, scale=scale, num_splits=num_splits, dtype=dtype,
                stream=stream):
            return
        ws_ml = workspace + 4 * batch * heads * num_splits * head_dim if num_splits > 1 else None
        p = kp.DecodeParams(
            out=out, q=q, k=k, v=v, text_time=text_time, media_start=media_start, media_count=media_count,
            tt_int64=index_int64[0], ms_int64=index_int64[1], mc_int64=index_int64[2],
            ws_acc=workspace if num_splits > 1 else None, ws_ml=ws_ml, batch=batch, heads=heads, latents=latents,
            num_media=num_media, q_stride_b=q_strides[0], q_stride_h=q_strides[1], out_stride_b=out_strides[0],
            out_stride_h=out_strides[1], kv_stride_tok=kv_strides[0], kv_stride_h=kv_strides[1],
            tt_stride=index_strides[0], ms_stride=index_strides[1], mc_stride=index_strides[2],
            cumulative=cumulative, scale=scale, num_splits=num_splits)
        self._launch(f"decode_split/{dtype}/{head_dim}", (num_splits, heads, batch), kp.DECODE_THREADS, stream, [p])
        if num_splits > 1:
            self._launch(f"decode_combine/{dtype}/{head_dim}", (heads, batch), head_dim, stream, [p])

    def fused_norm(self, out, h_out, x, residual, weight, bias, *, rows, dim, eps, layer_norm, dtype,
                   weight_dtype, stream) -> None:
        if not checks.fused_norm(out, h_out, x, residual, weight, bias, rows=rows, dim=dim, eps=eps,
                                 layer_norm=layer_norm, dtype=dtype, weight_dtype=weight_dtype, stream=stream):
            return
        vec = nvrtc_build.norm_vec(dtype, weight_dtype)
        vec_ok = dim % vec == 0 and all(ptr % 16 == 0 for ptr in (out, x, weight, h_out, residual, bias) if ptr)
        per_thread = vec if vec_ok else 1
        p = kp.NormParams(out=out, h_out=h_out or None, x=x, residual=residual or None, weight=weight,
                          bias=bias or None, rows=rows, dim=dim, eps=eps, layer_norm=layer_norm)
        self._launch(f"norm/{dtype}/{weight_dtype}/{per_thread}", (rows,), kp.norm_threads(dim // per_thread), stream, [p])

    def gated_residual(self, out, x, branch, gate, *, numel, dim, gate_numel, dtype, gate_dtype, stream) -> None:
        if not checks.gated_residual(out, x, branch, gate, numel=numel, dim=dim, gate_numel=gate_numel,
                                     dtype=dtype, gate_dtype=gate_dtype, stream=stream):
            return
        vec = nvrtc_build.gated_vec(dtype)
        per_thread = vec if dim % vec == 0 and out % 16 == 0 and x % 16 == 0 and branch % 16 == 0 else 1
        nvec = numel // per_thread
        args = [ctypes.c_void_p(out), ctypes.c_void_p(x), ctypes.c_void_p(branch), ctypes.c_void_p(gate),
                ctypes.c_int64(nvec), ctypes.c_int(dim), ctypes.c_bool(gate_numel == dim and dim != 1)]
        self._launch(f"gated_residual/{dtype}/{gate_dtype}/{per_thread}", (kp.gated_blocks(nvec),), kp.GATED_THREADS,
                     stream, args)
