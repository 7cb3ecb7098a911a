"""What this installation can do: the compiled extension, library versions, the GPU, and which
implementation each op runs under the requested backend."""

from __future__ import annotations

import platform

import torch

from lmmrt.kernels import backend as _backend

OPS = ("perceiver_attention", "masked_cross_attention", "rms_norm", "layer_norm", "add_rms_norm",
       "add_layer_norm", "gated_residual")


def _cuda_kernels_info() -> dict:
    uses, why = _backend.cuda_kernels_choice()
    d = {"uses": uses, "why": why}
    if uses == "jit":
        from lmmrt.kernels.cuda_jit import nvrtc_build

        d["nvrtc"] = ".".join(map(str, nvrtc_build.nvrtc_version()))
        d["cache"] = str(nvrtc_build.default_cache_dir())
    return d


def info(backend: str | None = None) -> dict:
    import lmmrt.kernels  # noqa: F401  (registers every op's implementations)

    requested = _backend.requested_backend(backend)
    ext = _backend.cuda_extension()
    build = None
    if ext is not None:
        b = ext.build_info()
        build = {"cuda_archs": b["cuda_archs"].split(","), "cuda_version": b["cuda_version"],
                 "cudart_version": b.get("cudart_version")}
    try:
        import triton

        triton_version = triton.__version__
    except Exception:
        triton_version = None
    gpu = None
    device = torch.device("cpu")
    if torch.cuda.is_available():
        device = torch.device("cuda")
        p = torch.cuda.get_device_properties(0)
        gpu = {"name": p.name, "capability": f"{p.major}.{p.minor}", "memory_gib": round(p.total_memory / 2**30, 1)}
    ops = {op: {"available": list(_backend.available(op)),
                "uses": _backend.resolve_name(op, requested, device)} for op in OPS if _backend.available(op)}
    return {
        "lmmrt": lmmrt.__version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "triton": triton_version,
        "cuda_extension": build,
        "cuda_kernels": _cuda_kernels_info(),
        "gpu": gpu,
        "device": str(device),
        "backend": requested,
        "ops": ops,
    }


def info_text(backend: str | None = None) -> str:
    d = info(backend)
    ext = d["cuda_extension"]
    lines = [
        f"lmmrt {d['lmmrt']}  (python {d['python']}, torch {d['torch']}, triton {d['triton'] or 'not installed'})",
        "CUDA extension: " + (f"built for sm_{', sm_'.join(ext['cuda_archs'])} with CUDA {ext['cuda_version']}"
                              if ext else "not built (pure-Python install: no nvcc at install time)"),
        f"CUDA kernels: {d['cuda_kernels']['uses']} ({d['cuda_kernels']['why']})"
        + (f"; NVRTC {d['cuda_kernels']['nvrtc']}, cache {d['cuda_kernels']['cache']}" if "nvrtc" in d["cuda_kernels"]
           else ""),
        "GPU: " + (f"{d['gpu']['name']} (sm_{d['gpu']['capability'].replace('.', '')}, {d['gpu']['memory_gib']} GiB)"
                   if d["gpu"] else "none (ops run their PyTorch reference on the CPU)"),
        f"backend requested: {d['backend']}  on device {d['device']}",
    ]
    for op, v in d["ops"].items():
        lines.append(f"  {op:24s} uses {v['uses']:7s} (available: {', '.join(v['available'])})")
    return "\n".join(lines)
