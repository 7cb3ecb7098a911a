"""Loading in float16 / bfloat16 (CPU, torch backend) stays close to float32: the reference path
keeps norms and softmax in float32 whatever the storage dtype."""

from __future__ import annotations

import pytest

import lmmrt
from lmmrt.demo import demo_images, save_demo


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return save_demo(tmp_path_factory.mktemp("lp") / "demo")


@pytest.mark.parametrize("dtype, tol", [("float16", 1e-2), ("bfloat16", 5e-2)])
def test_low_precision_logits_close_to_fp32(ckpt, dtype, tol):
    ref = lmmrt.load(ckpt, device="cpu", backend="torch")
    low = lmmrt.load(ckpt, device="cpu", dtype=dtype, backend="torch")
    assert str(low.dtype) == f"torch.{dtype}"
    prompt, imgs = "see<image>and<image>now", demo_images()
    a = lmmrt.logits(ref, prompt, imgs)[0]
    b = lmmrt.logits(low, prompt, imgs)[0]
    rel = ((a - b).abs().max() / a.abs().max()).item()
    assert rel <= tol, rel
