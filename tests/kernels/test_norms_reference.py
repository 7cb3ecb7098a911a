"""lmmrt.kernels.norms' CPU path (the references) against float64 math; statistics are float32 by design."""

import pytest
import torch

from lmmrt.kernels.norms import add_rms_norm_reference, rms_norm_reference


def _rms64(x, w, eps):
    x64 = x.double()
    return x64 * torch.rsqrt(x64.pow(2).mean(-1, keepdim=True) + eps) * w.double()


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.float64, 1e-6), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize("shape", [(1, 1, 37), (3, 5, 129)])
def test_rms_norm_reference_matches_float64(dtype, tol, shape):
    g = torch.Generator().manual_seed(shape[-1])
    x = (torch.randn(*shape, generator=g) * 3 + 0.5).to(dtype)
    w = (torch.rand(shape[-1], generator=g) + 0.5).to(dtype)
    got = rms_norm_reference(x, w, 1e-6)
    assert got.dtype == dtype and got.shape == x.shape
    torch.testing.assert_close(got.double(), _rms64(x, w, 1e-6), rtol=tol, atol=tol)
    r = torch.randn(*shape, generator=g).to(dtype)
    normed, h = add_rms_norm_reference(x, r, w, 1e-6)
    torch.testing.assert_close(h, x + r)
    torch.testing.assert_close(normed.double(), _rms64(x + r, w, 1e-6), rtol=tol, atol=tol)
