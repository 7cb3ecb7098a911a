"""lmmrt.kernels.cpu_linear under torch.compile: inductor cannot lower oneDNN's linear on the
input-major weights use_cpu_linears leaves, so a compiled trace takes F.linear instead."""

import torch
import torch.nn as nn

from lmmrt.kernels.cpu_linear import CPULinear, use_cpu_linears


def test_inductor_compiles_cpu_linears_and_matches_eager():
    torch.manual_seed(3)
    # 7 -> 19 is wide (input-major weight, the layout inductor rejected), 19 -> 5 narrow.
    model = nn.Sequential(nn.Linear(7, 19), nn.GELU(), nn.Linear(19, 5, bias=False)).eval()
    use_cpu_linears(model)
    assert type(model[0]) is CPULinear and not model[0].weight.is_contiguous()
    x = torch.randn(3, 7)
    with torch.no_grad():
        eager = model(x)
        compiled = torch.compile(model, backend="inductor", dynamic=False)(x)
    hidden = nn.functional.gelu(x.double() @ model[0].weight.double().t() + model[0].bias.double())
    want = (hidden @ model[2].weight.double().t()).float()
    torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(compiled, want, rtol=1e-5, atol=1e-6)
