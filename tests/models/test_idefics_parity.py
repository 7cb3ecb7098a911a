"""Parity with transformers' IdeficsForVisionText2Text: tiny random configs with non-zero gates,
saved with save_pretrained, converted with the CLI, loaded with lmmrt.load; float32 prompt logits
(relative error <= 1e-4) and greedy tokens (>= 16 new tokens, identical)."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from idefics_util import IMAGE_ID, hf_inputs, tiny_idefics

import lmmrt

CONFIGS = {
    "base": dict(),
    "qk_norms+vector_gates": dict(qk_layer_norms=True, alpha_type="vector"),
    "interval2+perceiver_qk": dict(cross_layer_interval=2, qk_layer_norms_perceiver=True),
    "interval2+vector+qk": dict(cross_layer_interval=2, alpha_type="vector", qk_layer_norms=True),
    "no_resampler": dict(use_resampler=False),
}

I = IMAGE_ID
# prompt name -> (token ids, number of images)
PROMPTS = {
    "no_image": ([1, 5, 17, 33, 8, 9, 41], 0),
    "one_image_text_first": ([1, 5, 6, 7, I, 30, 31, 32, 33], 1),
    "starts_with_image": ([I, 12, 13, 14, 15, 16], 1),
    "three_images": ([1, 4, I, 7, 8, I, 9, I, 10, 11, 12], 3),
    # IDEFICS resets to "no media" after an end-of-sequence token (2) until the next marker
    "eos_reset": ([1, I, 20, 21, 2, 22, 23, I, 24, 2, 25, 26], 2),
}


def _convert(hf_model, tmp_path_factory, name):
    d = tmp_path_factory.mktemp(name)
    hf_model.save_pretrained(d / "hf")
    r = subprocess.run([sys.executable, "-m", "lmmrt", "convert", "idefics", str(d / "hf"), str(d / "lmmrt"),
                        "--quiet"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    return lmmrt.load(d / "lmmrt", device="cpu", dtype="float32", backend="torch")


@pytest.fixture(scope="module", params=list(CONFIGS))
def pair(request, tmp_path_factory):
    hf = tiny_idefics(seed=len(request.param), **CONFIGS[request.param])
    return hf, _convert(hf, tmp_path_factory, request.param.replace("+", "_"))


def _pixels(n, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, 28, 28, generator=g)


def _rel(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


@pytest.mark.parametrize("prompt", list(PROMPTS))
def test_prompt_logits_and_greedy_tokens(pair, prompt):
    hf, model = pair
    ids, n = PROMPTS[prompt]
    px = _pixels(n, seed=len(ids))
    inp = hf_inputs([ids], [n], [px])
    with torch.no_grad():
        ref = hf(**inp).logits[0]
        ref_tokens = hf.generate(**inp, max_new_tokens=16, do_sample=False, eos_token_id=None, pad_token_id=0)
    got = lmmrt.logits(model, [ids], [list(px)])[0]
    assert got.shape == ref.shape
    assert _rel(got, ref) <= 1e-4, f"logits rel err {_rel(got, ref):.2e}"
    out = lmmrt.generate(model, [ids], [list(px)], max_new_tokens=16, ignore_eos=True)[0]
    assert out.token_ids == ref_tokens[0, len(ids):].tolist()
    assert out.finish_reason == "length"


def test_batch_with_different_image_counts(pair):
    hf, model = pair
    names = ["three_images", "no_image", "one_image_text_first", "eos_reset"]
    ids = [PROMPTS[k][0] for k in names]
    counts = [PROMPTS[k][1] for k in names]
    pxs = [_pixels(n, seed=10 + i) for i, n in enumerate(counts)]
    inp = hf_inputs(ids, counts, pxs)
    T = inp["input_ids"].shape[1]
    with torch.no_grad():
        ref = hf(**inp).logits
        ref_tokens = hf.generate(**inp, max_new_tokens=16, do_sample=False, eos_token_id=None, pad_token_id=0)
    got = lmmrt.logits(model, ids, [list(p) for p in pxs])
    outs = lmmrt.generate(model, ids, [list(p) for p in pxs], max_new_tokens=16, ignore_eos=True)
    for b, seq in enumerate(ids):
        assert _rel(got[b], ref[b, T - len(seq):]) <= 1e-4, names[b]
        assert outs[b].token_ids == ref_tokens[b, T:].tolist(), names[b]


def test_batched_equals_single(pair):
    """Left padding must not change any row: batched logits equal each prompt run alone."""
    _, model = pair
    names = ["three_images", "no_image", "starts_with_image"]
    ids = [PROMPTS[k][0] for k in names]
    pxs = [list(_pixels(PROMPTS[k][1], seed=3)) for k in names]
    batched = lmmrt.logits(model, ids, pxs)
    for b in range(len(ids)):
        alone = lmmrt.logits(model, [ids[b]], [pxs[b]])[0]
        torch.testing.assert_close(batched[b], alone, rtol=1e-5, atol=1e-5)


def test_gates_are_nonzero_and_matter(pair):
    """Guard against a test model whose zero gates would hide cross-attention bugs."""
    hf, model = pair
    for blk in hf.model.gated_cross_attn_layers:
        assert (blk.alpha_cross_attn.abs() > 0.1).all() and (blk.alpha_dense.abs() > 0.1).all()
    ids, n = PROMPTS["one_image_text_first"]
    a = lmmrt.logits(model, [ids], [list(_pixels(n, 1))])[0]
    b = lmmrt.logits(model, [ids], [list(_pixels(n, 2))])[0]
    before = ids.index(IMAGE_ID)
    # text before the image does not see it; text after does
    torch.testing.assert_close(a[:before], b[:before])
    assert (a[before:] - b[before:]).abs().max() > 1e-3
