"""The whole model with backend="triton" against backend="torch" on converted tiny IDEFICS models:
logits within float32 tolerance, greedy tokens identical. On the CPU the Triton kernels run under
TRITON_INTERPRET=1 (set by conftest)."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

import lmmrt
from lmmrt.kernels import backend as kb

pytestmark = pytest.mark.skipif(not kb.triton_available(), reason="triton is not installed")

I = 97


@pytest.fixture(scope="module", params=["immediate+qk", "interval2+vector"])
def models(request, tmp_path_factory):
    from idefics_util import tiny_idefics

    kw = dict(qk_layer_norms=True, qk_layer_norms_perceiver=True) if request.param == "immediate+qk" else \
        dict(cross_layer_interval=2, alpha_type="vector")
    hf = tiny_idefics(seed=7, **kw)
    d = tmp_path_factory.mktemp("bk")
    hf.save_pretrained(d / "hf")
    r = subprocess.run([sys.executable, "-m", "lmmrt", "convert", "idefics", str(d / "hf"), str(d / "m"), "--quiet"],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    return (lmmrt.load(d / "m", device=dev, dtype="float32", backend="torch"),
            lmmrt.load(d / "m", device=dev, dtype="float32", backend="triton"))


def test_ops_resolve_to_triton(models):
    _, tri = models
    dev = tri.device
    assert kb.resolve_name("perceiver_attention", tri.backend, dev) == "triton"
    assert kb.resolve_name("masked_cross_attention", tri.backend, dev) == "triton"


def test_whole_model_triton_matches_torch(models):
    ref, tri = models
    g = torch.Generator().manual_seed(0)
    px = torch.randn(4, 3, 28, 28, generator=g)
    prompts = [[1, 5, I, 6, 7, I, 8, 9, 10, I, 11], [1, 2, 3, 4], [I, 40, 41, 42, 43, 44, 45]]
    images = [list(px[:3]), [], [px[3]]]
    a = lmmrt.logits(ref, prompts, images)
    b = lmmrt.logits(tri, prompts, images)
    for x, y in zip(a, b):
        rel = ((x - y).abs().max() / x.abs().max()).item()
        assert rel <= 1e-4, rel
    ga = lmmrt.generate(ref, prompts, images, max_new_tokens=16, ignore_eos=True)
    gb = lmmrt.generate(tri, prompts, images, max_new_tokens=16, ignore_eos=True)
    assert [r.token_ids for r in ga] == [r.token_ids for r in gb]
