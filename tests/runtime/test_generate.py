"""Generation behaviour on the embedded demo model: sampling options, seeds, stops, streaming."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import lmmrt
from lmmrt.demo import demo_images, demo_model
from lmmrt.runtime.sampling import apply_repetition_penalty, sample


@pytest.fixture(scope="module")
def model():
    return demo_model(device="cpu", backend="torch")


PROMPT = "Look:<image> and<image> then"


def _gen(model, **kw):
    kw.setdefault("max_new_tokens", 12)
    return lmmrt.generate(model, PROMPT, demo_images(), **kw)[0]


def test_greedy_is_deterministic_and_topk1_is_greedy(model):
    a = _gen(model)
    b = _gen(model)
    c = _gen(model, temperature=0.7, top_k=1, seed=3)
    assert a.token_ids == b.token_ids == c.token_ids
    assert len(a.token_ids) == 12 and a.finish_reason == "length"


def test_sampling_is_seeded(model):
    a = _gen(model, temperature=1.0, seed=11)
    b = _gen(model, temperature=1.0, seed=11)
    c = _gen(model, temperature=1.0, seed=12)
    assert a.token_ids == b.token_ids
    assert a.token_ids != c.token_ids


def test_top_p_keeps_only_the_nucleus():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    g = torch.Generator().manual_seed(0)
    draws = {int(sample(logits, temperature=1.0, top_k=0, top_p=0.7, generator=g)) for _ in range(200)}
    assert draws == {0, 1}


def test_repetition_penalty_matches_hf_rule():
    logits = torch.tensor([[2.0, -1.0, 0.5]])
    seen = torch.tensor([[True, True, False]])
    out = apply_repetition_penalty(logits, seen, 2.0)
    assert out.tolist() == [[1.0, -2.0, 0.5]]


def test_repetition_penalty_changes_greedy_output(model):
    a = _gen(model, max_new_tokens=24)
    b = _gen(model, max_new_tokens=24, repetition_penalty=5.0)
    assert a.token_ids != b.token_ids
    # with a strong penalty no token id repeats among the new ones... unless the vocab forces it
    assert len(set(b.token_ids)) >= len(set(a.token_ids))


def test_stop_token_ids_and_eos(model):
    ref = _gen(model, max_new_tokens=16)
    stop_at = ref.token_ids[5]
    out = _gen(model, max_new_tokens=16, stop_token_ids=[stop_at])
    first = ref.token_ids.index(stop_at)
    assert out.token_ids == ref.token_ids[: first + 1]
    assert out.finish_reason == "stop"
    assert model.tokenizer.decode([stop_at]) not in out.text or first > 0


def test_stop_string_cuts_text(model):
    ref = _gen(model, max_new_tokens=16, ignore_eos=True)
    piece = ref.text[4:6]
    out = _gen(model, max_new_tokens=16, ignore_eos=True, stop=[piece])
    assert out.finish_reason == "stop"
    assert out.text == ref.text[: ref.text.index(piece)]


def test_stream_gives_the_same_text(model):
    ref = _gen(model, max_new_tokens=16, ignore_eos=True, temperature=0.9, seed=5)
    pieces = list(lmmrt.generate(model, PROMPT, demo_images(), max_new_tokens=16, ignore_eos=True,
                                 temperature=0.9, seed=5, stream=True))
    assert all(isinstance(p, str) for p in pieces)
    assert "".join(pieces) == ref.text


def test_batched_stream_tags_prompt_index(model):
    prompts = ["one<image>", "two"]
    imgs = [[demo_images()[0]], []]
    ref = lmmrt.generate(model, prompts, imgs, max_new_tokens=8, ignore_eos=True)
    got = {0: "", 1: ""}
    for i, piece in lmmrt.generate(model, prompts, imgs, max_new_tokens=8, ignore_eos=True, stream=True):
        got[i] += piece
    assert [got[0], got[1]] == [r.text for r in ref]


def test_image_inputs_are_equivalent(model):
    """A PIL image, the same uint8 array and uint8 tensor give the same result."""
    from PIL import Image

    arr = demo_images()[1]
    outs = [lmmrt.logits(model, "x<image>y", [img])[0] for img in
            (arr, Image.fromarray(arr), torch.from_numpy(arr))]
    torch.testing.assert_close(outs[0], outs[1])
    torch.testing.assert_close(outs[0], outs[2])


def test_prompt_builder_wraps_images_like_idefics(model):
    from lmmrt.runtime.batch import expand_image_markers

    assert expand_image_markers("a<image><image>b", model.config) == \
        "a<fake_token_around_image><image><fake_token_around_image><image><fake_token_around_image>b"


def test_results_report_prompt_tokens_and_stats(model):
    out = lmmrt.generate(model, ["<image>a", "bb"], [[demo_images()[0]], []], max_new_tokens=4, ignore_eos=True)
    assert out[1].prompt_tokens == 3  # <s> b b
    s = model.last_stats
    assert s.batch == 2 and s.new_tokens == 8 and s.decode_steps == 3
    assert s.prefill_s > 0 and s.decode_s > 0 and np.isfinite(s.decode_tokens_per_s)
    assert s.decode_tokens == 6 and s.decode_tokens_per_s == pytest.approx(6 / s.decode_s)
    assert 0 < s.media_s < s.prefill_s
    assert "tokens/s" in s.summary()


def test_decode_tokens_per_s_counts_the_tokens_rows_gave(model):
    # a row that has stopped gives no tokens: decode tokens/s counts what the rows gave after the
    # first step, not batch x steps
    prompts, images = ["<image>a", "the cat"], [[demo_images()[0]], []]
    free = lmmrt.generate(model, prompts, images, max_new_tokens=6, ignore_eos=True)
    stop = free[1].token_ids[0]
    assert stop not in free[0].token_ids  # the premise: row 1 stops at once, row 0 runs on
    out = lmmrt.generate(model, prompts, images, max_new_tokens=6, ignore_eos=True, stop_token_ids=[stop])
    s = model.last_stats
    assert len(out[0].token_ids) == 6 and len(out[1].token_ids) == 1 and s.decode_steps == 5
    assert s.decode_tokens == 5 == s.new_tokens - 2
    assert s.decode_tokens_per_s == pytest.approx(5 / s.decode_s)


def test_stop_token_ids_accepts_one_int(model):
    ref = _gen(model, max_new_tokens=8)
    out = _gen(model, max_new_tokens=8, stop_token_ids=ref.token_ids[2])
    assert out.token_ids == ref.token_ids[: ref.token_ids.index(ref.token_ids[2]) + 1]


def test_info_reports_build_and_ops():
    d = lmmrt.info()
    assert d["torch"] == torch.__version__
    assert "masked_cross_attention" in d["ops"] and "perceiver_attention" in d["ops"]
    text = lmmrt.info_text()
    assert "CUDA extension:" in text and "masked_cross_attention" in text


def test_demo_runs(capsys):
    from lmmrt.demo import run_demo

    run_demo(device="cpu", max_new_tokens=4, backend="torch")
    out = capsys.readouterr().out
    assert "RANDOM weights" in out and "tokens/s" in out


def test_streaming_does_not_leak_inference_mode(model):
    for _ in lmmrt.generate(model, PROMPT, demo_images(), max_new_tokens=3, ignore_eos=True, stream=True):
        assert not torch.is_inference_mode_enabled()
        t = torch.ones(2, requires_grad=True)
        assert (t * 2).requires_grad  # user code between pieces keeps autograd


def test_top_p_below_float32_range_keeps_the_top_token():
    """top_p=1e-300 is 0 in float32: the mass before the top token (0) reached it, and the top token was
    dropped with the rest (every token -inf: a uniform draw over NaN)."""
    logits = torch.randn(3, 50, generator=torch.Generator().manual_seed(1))
    g = torch.Generator().manual_seed(0)
    for _ in range(20):
        got = sample(logits, temperature=1.0, top_k=0, top_p=1e-300, generator=g)
        assert got.tolist() == logits.argmax(dim=-1).tolist()


@pytest.mark.parametrize("temperature", [1e-30, 5e-324])
def test_a_temperature_whose_scaled_logits_overflow_is_greedy(temperature):
    """logits / 5e-324 is inf in float32 (the temperature is 0 there): softmax gave NaN and the draw token 0;
    now the top token, with or without top-k / top-p."""
    logits = torch.randn(4, 50, generator=torch.Generator().manual_seed(2)) * 3
    logits[:, 0] = -5.0  # token 0 is nobody's top token: the old answer is visibly wrong
    g = torch.Generator().manual_seed(0)
    for top_k, top_p in ((0, 1.0), (5, 1.0), (0, 1e-300)):
        got = sample(logits, temperature=temperature, top_k=top_k, top_p=top_p, generator=g)
        assert got.tolist() == logits.argmax(dim=-1).tolist(), (top_k, top_p)


def test_tiny_temperature_generates_the_greedy_tokens(model):
    assert _gen(model, temperature=5e-324, seed=1).token_ids == _gen(model).token_ids
