"""Linear layers on the CPU through oneDNN, with each weight held in the layout oneDNN streams fastest.

Reference: torch.nn.functional.linear (what every other device, dtype and autograd call uses).

A decode step multiplies a few rows per sequence by every weight of the model, so on the CPU it is
bound by how fast the BLAS streams the weights. Measured on the CPU proxy's shapes (one thread,
float32, AMD EPYC, torch's MKL vs its oneDNN; bench/bench_cpu_proxy.py's model): oneDNN's inner
product runs a wide weight (out > in: q/k/v, gate/up, the LM head) 1.25-2x faster than MKL when the
weight is input-major, and a narrow one (out <= in: the down projection, o) up to 1.6x faster when
it is output-major, at 1, 4 and 16 rows. Results agree with F.linear to float32 rounding (the
summation order differs), not bit for bit.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

_ONEDNN = torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


def _onednn_applies(x: torch.Tensor, weight: torch.Tensor) -> bool:
    # float32 only: oneDNN's reduced-precision paths round differently from the reference, and
    # _linear_pointwise has no autograd formula. Not under torch.compile: inductor lowers
    # _linear_pointwise only for a weight it holds as a graph constant, and asserts on the strided
    # (input-major) parameters here; F.linear it lowers to its own choice of GEMM.
    return (_ONEDNN and not torch.compiler.is_compiling() and x.device.type == "cpu"
            and x.dtype == torch.float32 and weight.dtype == torch.float32
            and not (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad)))


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear(x, weight, bias); on the CPU in float32 without autograd, outside torch.compile,
    oneDNN's inner product."""
    if _onednn_applies(x, weight):
        return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")
    return F.linear(x, weight, bias)


class CPULinear(nn.Linear):
    """nn.Linear whose forward is `linear` above; parameters and state_dict are nn.Linear's."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)


@torch.no_grad()
def use_cpu_linears(module: nn.Module) -> None:
    """Turn every nn.Linear under module into a CPULinear, its weight in the faster layout for its
    shape: input-major (the (in, out) transpose contiguous, the parameter a strided view of it) when
    out > in, output-major (contiguous) otherwise. Values and shapes are unchanged. CPU modules only."""
    for m in module.modules():
        if type(m) not in (nn.Linear, CPULinear) or m.weight.device.type != "cpu":
            continue
        out_f, in_f = m.weight.shape
        w = m.weight.data
        if out_f > in_f and w.is_contiguous():
            m.weight.data = w.t().contiguous().t()
        elif out_f <= in_f and not w.is_contiguous():
            m.weight.data = w.contiguous()
        # The class swap keeps the parameters, hooks and state_dict keys as they are; CPULinear
        # adds no state of its own.
        m.__class__ = CPULinear
