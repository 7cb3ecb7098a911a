"""lmmrt.kernels.cpu_linear: oneDNN linear layers on the CPU against a float64 reference."""

import pytest
import torch
import torch.nn as nn

from lmmrt.kernels.cpu_linear import CPULinear, linear, use_cpu_linears


def _ref(x, w, b=None):
    y = x.double() @ w.double().t()
    return (y if b is None else y + b.double()).float()


@pytest.mark.parametrize("rows", [(1,), (3,), (2, 5)])
@pytest.mark.parametrize("out_f,in_f", [(37, 19), (19, 37), (24, 24)])
@pytest.mark.parametrize("input_major", [False, True])
@pytest.mark.parametrize("with_bias", [False, True])
def test_linear_matches_float64(rows, out_f, in_f, input_major, with_bias):
    g = torch.Generator().manual_seed(out_f * 100 + in_f)
    x = torch.randn(*rows, in_f, generator=g)
    w = torch.randn(out_f, in_f, generator=g)
    if input_major:
        w = w.t().contiguous().t()
    b = torch.randn(out_f, generator=g) if with_bias else None
    got = linear(x, w, b)
    assert got.shape == (*rows, out_f) and got.dtype == torch.float32
    torch.testing.assert_close(got, _ref(x, w, b), rtol=1e-5, atol=1e-5)


def test_linear_keeps_autograd_and_other_dtypes():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(3, 9, generator=g, requires_grad=True)
    w = torch.randn(5, 9, generator=g)
    linear(x, w).sum().backward()  # falls back to F.linear, which has a gradient
    torch.testing.assert_close(x.grad, w.sum(0).expand(3, 9))
    xd, wd = x.detach().double(), w.double()
    torch.testing.assert_close(linear(xd, wd), xd @ wd.t())


def test_use_cpu_linears_layouts_values_and_state_dict():
    torch.manual_seed(2)
    model = nn.Sequential(nn.Linear(13, 40), nn.Linear(40, 13, bias=False), nn.LayerNorm(13))
    x = torch.randn(4, 13)
    with torch.no_grad():
        want = model(x)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    use_cpu_linears(model)
    wide, narrow = model[0], model[1]
    assert type(wide) is CPULinear and type(narrow) is CPULinear
    assert not wide.weight.is_contiguous() and wide.weight.t().is_contiguous()  # out > in: input-major
    assert narrow.weight.is_contiguous()  # out <= in: output-major
    assert list(model.state_dict()) == list(state)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in state.items())
    with torch.no_grad():
        torch.testing.assert_close(model(x), want, rtol=1e-5, atol=1e-5)
