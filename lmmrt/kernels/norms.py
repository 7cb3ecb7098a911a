"""Normalization ops with the residual add fused in, and the tanh-gated residual epilogue.

`add_rms_norm(x, residual, w)` returns (norm(x + residual), x + residual): the decoder's
"residual add then pre-norm" pattern, one read and two writes in a fused kernel.

File layout: references (also the CPU path), then the CUDA kernels' checks, launchers and custom
ops (csrc/include/lmmrt/norms.cuh), then the public dispatching ops and the registration.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from lmmrt.kernels import backend as _backend
from lmmrt.kernels.cuda_jit.dlpack import accepts_dlpack_arrays


def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """LLaMA/IDEFICS RMSNorm: statistics in float32, result in x's dtype. x: (..., D); weight: (D,)."""
    if x.dtype == torch.float32 and weight.dtype == torch.float32:
        # the same math in one fused op: a float32 decode step runs ~24 norms, and the casts and
        # five separate ops below cost more than the norm itself at one row
        return F.rms_norm(x, (x.shape[-1],), weight, eps)
    xf = x.float()
    y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return (y * weight.float()).to(x.dtype)


def layer_norm_reference(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, eps: float) -> torch.Tensor:
    """LayerNorm over the last dim in float32, result in x's dtype. bias may be None (MPT)."""
    return F.layer_norm(x.float(), (x.shape[-1],), weight.float(),
                        None if bias is None else bias.float(), eps).to(x.dtype)


def add_rms_norm_reference(x, residual, weight, eps):
    h = x + residual
    return rms_norm_reference(h, weight, eps), h


def add_layer_norm_reference(x, residual, weight, bias, eps):
    h = x + residual
    return layer_norm_reference(h, weight, bias, eps), h


def gated_residual_reference(x: torch.Tensor, branch: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
    """x + tanh(gate) * branch, gate of shape (1,) or (D,) — for gates not folded into a weight."""
    return (x.float() + torch.tanh(gate.float()) * branch.float()).to(x.dtype)


# ---- CUDA kernels (lmmrt._C; csrc/include/lmmrt/norms.cuh) ------------------------------------
# The `*_cuda` functions check strictly (ValueError naming the argument: shape, dtype, layout, then
# device, so CPU/meta tensors exercise every check) and run a torch.library custom op that launches
# on the current stream. The functions registered as the "cuda" backend make the activations
# contiguous (cheap, and the kernel needs it) and send dtypes the kernels lack to the reference.

_CUDA_DTYPES = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}


def _ext():
    ext = _backend.cuda_kernels()
    if ext is None:
        raise RuntimeError("no CUDA kernels: lmmrt._C is not built and the NVRTC JIT is unusable ("
                           + _backend.cuda_kernels_choice()[1] + ")")
    return ext


def _check_cuda_args(op: str, x: torch.Tensor, same_as_x: dict, per_channel: dict,
                     device_only: dict | None = None) -> None:
    """same_as_x: name -> tensor of x's shape and dtype; per_channel: name -> (D,) tensor of x's dtype
    or float32 (None entries are skipped); device_only: name -> tensor whose device alone is checked."""
    if x.dtype not in _CUDA_DTYPES:
        raise ValueError(f"{op}: x must be float32, float16 or bfloat16, got {x.dtype}")
    if x.dim() < 1 or x.shape[-1] < 1:
        raise ValueError(f"{op}: x must be (..., D) with D >= 1, got {tuple(x.shape)}")
    D = x.shape[-1]
    for name, t in same_as_x.items():
        if t.shape != x.shape:
            raise ValueError(f"{op}: {name} must have x's shape {tuple(x.shape)}, got {tuple(t.shape)}")
        if t.dtype != x.dtype:
            raise ValueError(f"{op}: {name} must have x's dtype {x.dtype}, got {t.dtype}")
    for name, t in per_channel.items():
        if t is None:
            continue
        if tuple(t.shape) != (D,):
            raise ValueError(f"{op}: {name} must be ({D},), got {tuple(t.shape)}")
        if t.dtype not in (x.dtype, torch.float32):
            raise ValueError(f"{op}: {name} must be {x.dtype} or float32, got {t.dtype}")
    named = {"x": x, **same_as_x, **{k: t for k, t in per_channel.items() if t is not None}}
    for name, t in named.items():
        if not t.is_contiguous():
            raise ValueError(f"{op}: {name} must be contiguous (got strides {t.stride()}); call .contiguous() first")
    for name, t in {**named, **(device_only or {})}.items():
        if t.device.type != "cuda":
            raise ValueError(f"{op}: {name} must be a CUDA tensor, got device {t.device}")
        if t.device != x.device:
            raise ValueError(f"{op}: {name} is on {t.device}, x is on {x.device}")


def _ptr(t: torch.Tensor | None) -> int:
    return 0 if t is None else t.data_ptr()


def launch_norm(out, h_out, x, residual, weight, bias, eps: float, layer_norm: bool) -> None:
    """Raw launch into caller-provided out (and h_out = x + residual when residual is given)."""
    D = x.shape[-1]
    ext = _ext()
    with torch.cuda.device(x.device):  # the binding launches on the current device: make it x's
        ext.fused_norm(_ptr(out), _ptr(h_out), _ptr(x), _ptr(residual), _ptr(weight), _ptr(bias),
                       rows=x.numel() // D, dim=D, eps=float(eps), layer_norm=layer_norm,
                       dtype=_CUDA_DTYPES[x.dtype], weight_dtype=_CUDA_DTYPES[weight.dtype],
                       stream=torch.cuda.current_stream(x.device).cuda_stream)


def launch_gated_residual(out, x, branch, gate) -> None:
    """Raw launch of out = x + tanh(gate) * branch into caller-provided out."""
    D = x.shape[-1]
    ext = _ext()
    with torch.cuda.device(x.device):  # the binding launches on the current device: make it x's
        ext.gated_residual(out.data_ptr(), x.data_ptr(), branch.data_ptr(), gate.data_ptr(),
                           numel=x.numel(), dim=D, gate_numel=gate.numel(), dtype=_CUDA_DTYPES[x.dtype],
                           gate_dtype=_CUDA_DTYPES[gate.dtype],
                           stream=torch.cuda.current_stream(x.device).cuda_stream)


@torch.library.custom_op("lmmrt::norm", mutates_args=())
def _norm_op(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, eps: float,
             layer_norm: bool) -> torch.Tensor:
    out = torch.empty_like(x)
    launch_norm(out, None, x, None, weight, bias, eps, layer_norm)
    return out


@_norm_op.register_fake
def _norm_fake(x, weight, bias, eps, layer_norm):
    return torch.empty_like(x)


@torch.library.custom_op("lmmrt::add_norm", mutates_args=())
def _add_norm_op(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                 eps: float, layer_norm: bool) -> tuple[torch.Tensor, torch.Tensor]:
    out, h = torch.empty_like(x), torch.empty_like(x)
    launch_norm(out, h, x, residual, weight, bias, eps, layer_norm)
    return out, h


@_add_norm_op.register_fake
def _add_norm_fake(x, residual, weight, bias, eps, layer_norm):
    return torch.empty_like(x), torch.empty_like(x)


@torch.library.custom_op("lmmrt::gated_residual", mutates_args=())
def _gated_residual_op(x: torch.Tensor, branch: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
    out = torch.empty_like(x)
    launch_gated_residual(out, x, branch, gate)
    return out


@_gated_residual_op.register_fake
def _gated_residual_fake(x, branch, gate):
    return torch.empty_like(x)


@accepts_dlpack_arrays
def rms_norm_cuda(x, weight, eps):
    _check_cuda_args("rms_norm", x, {}, {"weight": weight})
    return _norm_op(x, weight, None, float(eps), False)


@accepts_dlpack_arrays
def layer_norm_cuda(x, weight, bias, eps):
    _check_cuda_args("layer_norm", x, {}, {"weight": weight, "bias": bias})
    return _norm_op(x, weight, bias, float(eps), True)


@accepts_dlpack_arrays
def add_rms_norm_cuda(x, residual, weight, eps):
    _check_cuda_args("add_rms_norm", x, {"residual": residual}, {"weight": weight})
    return _add_norm_op(x, residual, weight, None, float(eps), False)


@accepts_dlpack_arrays
def add_layer_norm_cuda(x, residual, weight, bias, eps):
    _check_cuda_args("add_layer_norm", x, {"residual": residual}, {"weight": weight, "bias": bias})
    return _add_norm_op(x, residual, weight, bias, float(eps), True)


@accepts_dlpack_arrays
def gated_residual_cuda(x, branch, gate):
    if gate.numel() == 1 and gate.dim() <= 1:  # one gate for every channel
        if gate.dtype not in (x.dtype, torch.float32):
            raise ValueError(f"gated_residual: gate must be {x.dtype} or float32, got {gate.dtype}")
        _check_cuda_args("gated_residual", x, {"branch": branch}, {}, device_only={"gate": gate})
    else:
        _check_cuda_args("gated_residual", x, {"branch": branch}, {"gate": gate})
    return _gated_residual_op(x, branch, gate)


def _kernel_dtypes_ok(x, *params) -> bool:
    return x.dtype in _CUDA_DTYPES and all(p is None or p.dtype in (x.dtype, torch.float32) for p in params)


def _rms_norm_backend(x, weight, eps):
    if not _kernel_dtypes_ok(x, weight):
        return rms_norm_reference(x, weight, eps)
    return rms_norm_cuda(x.contiguous(), weight, eps)


def _layer_norm_backend(x, weight, bias, eps):
    if not _kernel_dtypes_ok(x, weight, bias):
        return layer_norm_reference(x, weight, bias, eps)
    return layer_norm_cuda(x.contiguous(), weight, bias, eps)


def _add_rms_norm_backend(x, residual, weight, eps):
    if not _kernel_dtypes_ok(x, weight) or residual.dtype != x.dtype or residual.shape != x.shape:
        return add_rms_norm_reference(x, residual, weight, eps)
    return add_rms_norm_cuda(x.contiguous(), residual.contiguous(), weight, eps)


def _add_layer_norm_backend(x, residual, weight, bias, eps):
    if not _kernel_dtypes_ok(x, weight, bias) or residual.dtype != x.dtype or residual.shape != x.shape:
        return add_layer_norm_reference(x, residual, weight, bias, eps)
    return add_layer_norm_cuda(x.contiguous(), residual.contiguous(), weight, bias, eps)


def _gated_residual_backend(x, branch, gate):
    if (not _kernel_dtypes_ok(x, gate) or branch.dtype != x.dtype or branch.shape != x.shape
            or gate.numel() not in (1, x.shape[-1])):
        return gated_residual_reference(x, branch, gate)
    return gated_residual_cuda(x.contiguous(), branch.contiguous(), gate.reshape(-1))



def rms_norm(x, weight, eps, *, backend: str = "torch"):
    return _backend.resolve("rms_norm", backend, x.device)(x, weight, eps)


def layer_norm(x, weight, bias, eps, *, backend: str = "torch"):
    return _backend.resolve("layer_norm", backend, x.device)(x, weight, bias, eps)


def add_rms_norm(x, residual, weight, eps, *, backend: str = "torch"):
    """Returns (rms_norm(x + residual), x + residual). x, residual: (..., D)."""
    return _backend.resolve("add_rms_norm", backend, x.device)(x, residual, weight, eps)


def add_layer_norm(x, residual, weight, bias, eps, *, backend: str = "torch"):
    """Returns (layer_norm(x + residual), x + residual). x, residual: (..., D)."""
    return _backend.resolve("add_layer_norm", backend, x.device)(x, residual, weight, bias, eps)


def gated_residual(x, branch, gate, *, backend: str = "torch"):
    """x + tanh(gate) * branch. x, branch: (..., D); gate: (1,) or (D,)."""
    return _backend.resolve("gated_residual", backend, x.device)(x, branch, gate)


_backend.register("rms_norm", "torch", rms_norm_reference)
_backend.register("layer_norm", "torch", layer_norm_reference)
_backend.register("add_rms_norm", "torch", add_rms_norm_reference)
_backend.register("add_layer_norm", "torch", add_layer_norm_reference)
_backend.register("gated_residual", "torch", gated_residual_reference)

if _backend.cuda_kernels() is not None:
    _backend.register("rms_norm", "cuda", _rms_norm_backend)
    _backend.register("layer_norm", "cuda", _layer_norm_backend)
    _backend.register("add_rms_norm", "cuda", _add_rms_norm_backend)
    _backend.register("add_layer_norm", "cuda", _add_layer_norm_backend)
    _backend.register("gated_residual", "cuda", _gated_residual_backend)
