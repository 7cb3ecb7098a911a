"""Backend selection: which implementation each op uses.

`LMMRT_BACKEND=torch|triton|cuda|auto` (or `lmmrt.load(..., backend=...)`). `auto` resolves per op
and per device: on the CPU always the torch reference; on CUDA the fastest available
implementation (cuda kernel > triton kernel > torch reference).
"""

from __future__ import annotations

import functools
import os

BACKENDS = ("torch", "triton", "cuda", "auto")


def requested_backend(backend: str | None = None) -> str:
    """The backend asked for: the argument, else $LMMRT_BACKEND, else 'auto'."""
    name = (backend or os.environ.get("LMMRT_BACKEND") or "auto").strip().lower()
    if name not in BACKENDS:
        raise ValueError(f"unknown backend {name!r}: expected one of {', '.join(BACKENDS)} "
                         "(from the backend= argument or the LMMRT_BACKEND environment variable)")
    return name


@functools.lru_cache(maxsize=None)
def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except Exception:
        return False
    return True


def triton_interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@functools.lru_cache(maxsize=None)
def cuda_extension():
    """The compiled extension module, or None when it was not built."""
    try:
        from lmmrt import _C  # type: ignore[attr-defined]
    except ImportError:
        return None
    return _C


@functools.lru_cache(maxsize=None)
def cuda_kernels_choice() -> tuple[str, str]:
    """Which runs lmmrt's CUDA C++ kernels, and why: ("extension" | "jit" | "none", reason).
    The extension when built; else the NVRTC JIT (lmmrt.kernels.cuda_jit) when CuPy and a CUDA
    device are there. LMMRT_CUDA_JIT=1 picks the JIT even beside the extension, 0 never."""
    from lmmrt.kernels import cuda_jit

    mode, ext = cuda_jit.jit_mode(), cuda_extension()
    if ext is not None and mode != "on":
        return "extension", "lmmrt._C is built; the extension is preferred"
    if mode == "off":
        return "none", "lmmrt._C is not built and LMMRT_CUDA_JIT=0"
    why_not = cuda_jit.jit_unusable_reason()
    if why_not is None:
        return "jit", ("LMMRT_CUDA_JIT=1" if mode == "on" else "lmmrt._C is not built") + \
            "; kernels compiled by NVRTC on first use"
    if ext is not None:
        return "extension", f"LMMRT_CUDA_JIT=1 but the JIT is unusable: {why_not}"
    return "none", f"lmmrt._C is not built and the NVRTC JIT is unusable: {why_not}"


def cuda_kernels():
    """What launches the CUDA C++ kernels (lmmrt._C or its NVRTC stand-in with the same
    interface), or None. See cuda_kernels_choice."""
    choice = cuda_kernels_choice()[0]
    if choice == "extension":
        return cuda_extension()
    if choice == "jit":
        from lmmrt.kernels import cuda_jit

        return cuda_jit.jit_kernels()
    return None


def cuda_build_info() -> dict | None:
    """What the CUDA extension was built for: {"archs": "80,90", "cuda_version": "13.0.88"}, or
    None when lmmrt was installed without it. Reads build constants only: never touches a device."""
    ext = cuda_extension()
    if ext is None:
        return None
    info = ext.build_info()
    return {"archs": info["cuda_archs"], "cuda_version": info["cuda_version"]}


# op name -> {backend name -> callable}. Kernel files register what they provide.
_REGISTRY: dict[str, dict[str, object]] = {}
# Preference when backend == "auto" on a CUDA device.
_AUTO_ORDER = ("cuda", "triton", "torch")


def register(op: str, backend: str, fn) -> None:
    _REGISTRY.setdefault(op, {})[backend] = fn


def available(op: str) -> tuple[str, ...]:
    return tuple(_REGISTRY.get(op, {}))


def resolve_name(op: str, backend: str, device) -> str:
    """The implementation an op will run: the requested one when it exists for this op and device,
    else the next in cuda > triton > torch order. An explicit request for an unavailable backend on
    CUDA falls back quietly per op (a backend is a preference for the whole model, and not every op
    has every kernel); `lmmrt.info()` shows what each op uses."""
    impls = _REGISTRY.get(op, {})
    dev = getattr(device, "type", str(device))
    if backend == "torch":
        return "torch"
    if dev != "cuda":
        # Kernels run on CUDA tensors only, except Triton under its CPU interpreter (tests).
        if backend == "triton" and "triton" in impls and triton_interpreted():
            return "triton"
        return "torch"
    order = _AUTO_ORDER if backend == "auto" else _AUTO_ORDER[_AUTO_ORDER.index(backend):]
    for name in order:
        if name in impls:
            return name
    return "torch"


def resolve(op: str, backend: str, device):
    return _REGISTRY[op][resolve_name(op, backend, device)]
