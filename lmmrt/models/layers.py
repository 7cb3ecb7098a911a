"""Small building blocks shared by the model files."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from lmmrt.kernels import backend as _backend
from lmmrt.kernels import norms  # noqa: F401 - registers the norm ops' implementations


class _Norm(nn.Module):
    """A norm whose implementation is looked up once per (op, backend, device), not per call: a
    decode step runs a norm about 30 times."""

    def __init__(self):
        super().__init__()
        self.backend = "torch"
        self._impls: dict = {}

    def _impl(self, op: str, device: torch.device):
        key = (op, self.backend, device)
        impl = self._impls.get(key)
        if impl is None:
            impl = self._impls[key] = _backend.resolve(op, self.backend, device)
        return impl


class RMSNorm(_Norm):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x):
        return self._impl("rms_norm", x.device)(x, self.weight, self.eps)

    def add(self, x, residual):
        """(norm(x + residual), x + residual) in one fused kernel where the backend has one."""
        return self._impl("add_rms_norm", x.device)(x, residual, self.weight, self.eps)


class LayerNorm(_Norm):
    def __init__(self, dim: int, eps: float, bias: bool = True):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.bias = nn.Parameter(torch.zeros(dim)) if bias else None
        self.eps = eps

    def forward(self, x):
        return self._impl("layer_norm", x.device)(x, self.weight, self.bias, self.eps)

    def add(self, x, residual):
        """(norm(x + residual), x + residual) in one fused kernel where the backend has one."""
        return self._impl("add_layer_norm", x.device)(x, residual, self.weight, self.bias, self.eps)


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

