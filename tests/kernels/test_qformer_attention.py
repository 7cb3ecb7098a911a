"""The perceiver attention op without its latents source, as the Q-Former runs it: queries over
one key source, no mask. Triton (interpreter without a GPU) against the float64 reference on
awkward sizes and strided views of fused projections; the BLIP-2 Q-Former on the triton backend
against the torch one."""

from __future__ import annotations

import pytest
import torch
from blip2_util import tiny_blip2

from lmmrt.convert.blip2 import blip2_state
from lmmrt.kernels.perceiver_attention import perceiver_attention, perceiver_attention_reference
from lmmrt.models.splice import SpliceModel

try:  # tests/kernels may or may not be a package, depending on how pytest imports it
    from .kernel_testing import DEVICE, DTYPES, assert_close, nan_buffer, needs_triton
except ImportError:
    from kernel_testing import DEVICE, DTYPES, assert_close, nan_buffer, needs_triton

pytestmark = pytest.mark.filterwarnings("ignore:Conversion of an array with ndim:DeprecationWarning")


def _inputs(M, n_q, S, H, dh, dtype, seed=0):
    """q a slice of a wider projection; k, v halves of one fused (M, S, 2, H, dh) projection."""
    g = torch.Generator().manual_seed(seed)
    kv = torch.randn(M, S, 2, H, dh, generator=g).to(dtype=dtype, device=DEVICE)
    q = torch.randn(M, n_q, H, 2 * dh, generator=g).to(dtype=dtype, device=DEVICE)[..., dh:]
    return q, kv[:, :, 0], kv[:, :, 1]


@needs_triton
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("M,n_q,S,H,dh", [(2, 32, 97, 2, 64), (3, 5, 17, 4, 24), (1, 19, 1, 1, 16)])
def test_triton_without_latents_matches_float64_reference(dtype, M, n_q, S, H, dh):
    q, k, v = _inputs(M, n_q, S, H, dh, dtype)
    storage, out = nan_buffer(q.shape, dtype, strided=True)
    got = perceiver_attention(q, k, v, None, None, backend="triton", out=out)
    assert got.data_ptr() == out.data_ptr()
    want = perceiver_attention_reference(q.double(), k.double(), v.double(), None, None)
    assert_close(got, want, dtype, f"q-former attention {(M, n_q, S, H, dh)}")


def test_reference_without_latents_is_attention_over_the_media_keys():
    q, k, v = _inputs(2, 7, 13, 3, 8, torch.float64, seed=1)
    want = torch.softmax(torch.einsum("mqhd,mshd->mhqs", q, k) * 8 ** -0.5, -1)
    want = torch.einsum("mhqs,mshd->mqhd", want, v)
    torch.testing.assert_close(perceiver_attention_reference(q, k, v, None, None), want)


def test_latents_both_or_neither():
    q, k, v = _inputs(1, 4, 6, 2, 8, torch.float32)
    with pytest.raises(ValueError, match="both be given or both be None"):
        perceiver_attention(q, k, v, k[:, :4], None)
    with pytest.raises(ValueError, match="at least one key"):
        perceiver_attention(q, k[:, :0], v[:, :0], None, None)


@needs_triton
def test_qformer_on_the_triton_backend_matches_torch(tmp_path):
    ref = tiny_blip2(seed=21)
    ref.save_pretrained(tmp_path)
    cfg, state = blip2_state(tmp_path, progress=False)
    model = SpliceModel(cfg)
    model.load_state_dict(state)
    feats = torch.randn(3, cfg.vision.n_tokens, cfg.vision.width, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        want = model.connector(feats)
        model.set_backend("triton")
        got = model.connector(feats)
    assert_close(got, want, torch.float32, "Q-Former triton vs torch")
