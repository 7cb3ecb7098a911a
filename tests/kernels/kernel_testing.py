"""Shared helpers of the kernel tests: dtypes to run, tolerances, a comparison that explains itself."""

from __future__ import annotations

import pytest
import torch

from lmmrt.kernels import backend as _backend

HAS_CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if HAS_CUDA else "cpu")
# bf16 arithmetic is silently wrong in the Triton interpreter (environment.md): GPU only.
DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if HAS_CUDA else [])
TOL = {torch.float32: 1e-4, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}

needs_triton = pytest.mark.skipif(
    not _backend.triton_available() or not (HAS_CUDA or _backend.triton_interpreted()),
    reason="needs triton and either CUDA or TRITON_INTERPRET=1 (tests/conftest.py sets it without CUDA)")
gpu_only = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")


def assert_close(out: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype, what: str = "") -> None:
    """|out - ref| <= tol * (1 + |ref|), per element, with tol by dtype; NaN anywhere fails."""
    tol = TOL[dtype]
    out64, ref64 = out.detach().double().cpu(), ref.detach().double().cpu()
    assert out64.shape == ref64.shape, f"{what}: shape {tuple(out64.shape)} != {tuple(ref64.shape)}"
    nan = torch.isnan(out64)
    if nan.any():
        idx = tuple(int(i) for i in nan.nonzero()[0])
        raise AssertionError(f"{what}: {int(nan.sum())} NaN outputs (unwritten?), first at {idx}")
    err = (out64 - ref64).abs()
    bad = err > tol * (1 + ref64.abs())
    if bad.any():
        idx = tuple(int(i) for i in bad.nonzero()[0])
        raise AssertionError(
            f"{what} {dtype}: max err {err.max().item():.3e}, mean err {err.mean().item():.3e}, "
            f"{int(bad.sum())}/{bad.numel()} beyond tol {tol:g}; first at {idx}: "
            f"got {out64[idx].item():.6g}, expected {ref64[idx].item():.6g}")


def nan_buffer(shape, dtype, *, strided: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(storage, out): a NaN-filled buffer and a view of it of `shape` (4-D), transposed in storage
    when strided, so a kernel that misses any element (or honours the strides wrongly) leaves NaN."""
    a, b, c, d = shape
    if strided:
        storage = torch.full((a, c, b, d), float("nan"), dtype=dtype, device=DEVICE)
        return storage, storage.transpose(1, 2)
    storage = torch.full(shape, float("nan"), dtype=dtype, device=DEVICE)
    return storage, storage


class KernelSpy:
    """Wraps a @triton.jit kernel and counts launches (kernel[grid](...))."""

    def __init__(self, kernel):
        self.kernel, self.launches = kernel, 0

    def __getitem__(self, grid):
        self.launches += 1
        return self.kernel[grid]
