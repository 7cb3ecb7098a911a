"""Small building blocks shared by the model files."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from lmmrt.kernels import norms


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps
        self.backend = "torch"

    def forward(self, x):
        return norms.rms_norm(x, self.weight, self.eps, backend=self.backend)

    def add(self, x, residual):
        """(norm(x + residual), x + residual) in one fused kernel where the backend has one."""
        return norms.add_rms_norm(x, residual, self.weight, self.eps, backend=self.backend)


class LayerNorm(nn.Module):
    def __init__(self, dim: int, eps: float, bias: bool = True):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.bias = nn.Parameter(torch.zeros(dim)) if bias else None
        self.eps = eps
        self.backend = "torch"

    def forward(self, x):
        return norms.layer_norm(x, self.weight, self.bias, self.eps, backend=self.backend)

    def add(self, x, residual):
        """(norm(x + residual), x + residual) in one fused kernel where the backend has one."""
        return norms.add_layer_norm(x, residual, self.weight, self.bias, self.eps, backend=self.backend)


def make_norm(kind: str, dim: int, eps: float, bias: bool = True) -> nn.Module:
    if kind == "rms":
        return RMSNorm(dim, eps)
    if kind == "ln":
        return LayerNorm(dim, eps, bias)
    raise ValueError(f"unknown norm kind {kind!r}")


def activation(name: str):
    if name == "gelu":
        return F.gelu
    if name == "gelu_tanh" or name == "gelu_new" or name == "gelu_pytorch_tanh":
        return lambda x: F.gelu(x, approximate="tanh")
    if name == "quick_gelu":
        return lambda x: x * torch.sigmoid(1.702 * x)
    if name == "relu":
        return F.relu
    if name == "silu":
        return F.silu
    raise ValueError(f"unknown activation {name!r}")

