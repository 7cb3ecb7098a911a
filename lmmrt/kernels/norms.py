"""Normalization ops with the residual add fused in, and the tanh-gated residual epilogue.

`add_rms_norm(x, residual, w)` returns (norm(x + residual), x + residual): the decoder's
"residual add then pre-norm" pattern, one read and two writes in a fused kernel.

File layout: references (also the CPU path), then the public dispatching ops.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from lmmrt.kernels import backend as _backend


def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """LLaMA/IDEFICS RMSNorm: statistics in float32, result in x's dtype. x: (..., D); weight: (D,)."""
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
