"""lmmrt's CUDA kernels without nvcc: compiled at run time by NVRTC through CuPy.

Used when the extension lmmrt._C was not built (a pip install without a CUDA toolkit) and CuPy is
importable on a CUDA machine; the extension, when built, stays preferred. `LMMRT_CUDA_JIT=0`
turns the JIT off, `LMMRT_CUDA_JIT=1` uses it even beside the extension.

    nvrtc_build.py    kernel catalogue, NVRTC compile (no GPU needed), disk cache, ptxas report
    kernel_params.py  the kernels' parameter structs as ctypes, launch geometry
    launcher.py       JitKernels: lmmrt._C's interface over the NVRTC cubins
    dlpack.py         CuPy (any DLPack) arrays in and out of the public kernel functions
"""

from __future__ import annotations

import functools
import os


def jit_mode() -> str:
    """'auto' (default), 'on' (LMMRT_CUDA_JIT=1) or 'off' (LMMRT_CUDA_JIT=0)."""
    v = os.environ.get("LMMRT_CUDA_JIT", "").strip().lower()
    return {"1": "on", "true": "on", "on": "on", "0": "off", "false": "off", "off": "off"}.get(v, "auto")


def jit_unusable_reason() -> str | None:
    """Why the JIT cannot run here (None when it can): no GPU, no CuPy, no NVRTC, no headers."""
    try:
        import torch

        if not torch.cuda.is_available():
            return "no CUDA device"
    except Exception as e:  # a broken torch install: report it, do not crash `lmmrt info`
        return f"torch.cuda is unusable ({type(e).__name__})"
    try:
        import cupy  # noqa: F401
    except Exception as e:
        return f"CuPy is not importable ({type(e).__name__}): pip install \"lmmrt[cupy]\""
    from lmmrt.kernels.cuda_jit import nvrtc_build

    try:
        nvrtc_build.nvrtc_version()
        nvrtc_build.kernel_include_dir()
        nvrtc_build.cuda_include_dir()
    except nvrtc_build.CudaJitUnavailable as e:
        return str(e)
    return None


@functools.lru_cache(maxsize=None)
def jit_kernels():
    """The process-wide JitKernels (modules are loaded per device on first launch)."""
    from lmmrt.kernels.cuda_jit.launcher import JitKernels

    return JitKernels()
