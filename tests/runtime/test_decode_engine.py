"""The decode engine: caches reused across calls, graphs by bucket, the sync-free sampler, NaN
logits, and the once-per-batch media gather of the torch cross-attention path."""

from __future__ import annotations

import math
import warnings

import pytest
import torch

import lmmrt
from lmmrt.demo import demo_images, demo_model
from lmmrt.kernels.masked_cross_attention import masked_cross_attention_reference
from lmmrt.models.xattn import MediaContext
from lmmrt.runtime.batch import build_batch
from lmmrt.runtime.decode_plan import DecodePlan, gather_media
from lmmrt.runtime.generate import run_prefill
from lmmrt.runtime.sampling import NAN_TOKEN, exponential_race, sample
from lmmrt.runtime.static_decode import DecodeState, StaticDecodeStep, check_cuda_graph, length_bucket

PROMPTS = ["a<image>b", "<image>c<image>dd e", "no image"]


def _images():
    im = demo_images()
    return [[im[0]], im, []]


@pytest.fixture(scope="module")
def model():
    return demo_model(device="cpu", backend="torch")


def _tokens(model, prompts, images, n, **kw):
    return [r.token_ids for r in lmmrt.generate(model, prompts, images, max_new_tokens=n, ignore_eos=True, **kw)]


@pytest.mark.parametrize("cuda_graph", [False, True])
def test_reused_caches_give_fresh_results_even_when_stale_entries_are_nan(model, cuda_graph):
    """Caches are torch.empty and reused: a small call after a big one, and a call over a pool
    filled with NaN, give what fresh caches give (masked / stale entries are never read)."""
    model.cuda_graph = cuda_graph
    try:
        model.decode_state = DecodeState()
        big = _tokens(model, PROMPTS, _images(), 10)
        small = _tokens(model, PROMPTS[1:2], [_images()[1]], 6)
        pool = model.decode_state.kv
        assert pool.generation == 1, "the small call must reuse the big call's buffer"
        pool.buffer.k.fill_(float("nan"))
        pool.buffer.v.fill_(float("nan"))
        again = _tokens(model, PROMPTS, _images(), 10)
        fresh_model = demo_model(device="cpu", backend="torch")
        fresh_model.cuda_graph = cuda_graph
        assert again == big == _tokens(fresh_model, PROMPTS, _images(), 10)
        assert small == _tokens(fresh_model, PROMPTS[1:2], [_images()[1]], 6)
    finally:
        model.cuda_graph = False


def test_second_live_generation_gets_its_own_cache(model):
    """Two streams consumed in turns must not share the pooled KV cache."""
    from lmmrt.runtime.generate import generate_steps

    model.decode_state = DecodeState()
    solo = _tokens(model, PROMPTS[:1], [_images()[0]], 8)
    a = generate_steps(model, PROMPTS[:1], [_images()[0]], max_new_tokens=8, ignore_eos=True)
    b = generate_steps(model, PROMPTS[:1], [_images()[0]], max_new_tokens=8, ignore_eos=True)
    got_a, got_b = [], []
    for (ta, _), (tb, _) in zip(a, b):
        got_a.append(ta[0])
        got_b.append(tb[0])
    assert got_a == got_b == solo[0]
    assert not model.decode_state.kv.in_use  # released when the generators finished


@torch.inference_mode()
def test_graph_steps_are_kept_per_bucket_and_replayed_across_calls(model):
    """DecodeState keeps one step per (batch, cache bucket) and refills its inputs per call; on the
    CPU it runs eagerly, which proves the refilled step computes each new batch's logits."""
    state = DecodeState()
    steps = []
    for prompts, images in ((PROMPTS, _images()), (PROMPTS[::-1], _images()[::-1]), (PROMPTS[:2], _images()[:2])):
        batch = build_batch(model, prompts, images, max_new_tokens=3)
        T = batch.tokens.shape[1]
        cache = state.kv.view(model.config.decoder, batch.size, length_bucket(T + 3), model.dtype, model.device)
        logits, media = run_prefill(model, batch, cache)
        step = state.graph_step(model, cache, media, batch.pad)
        steps.append(step)
        ref_cache = type(cache).allocate(model.config.decoder, batch.size, T + 3, model.dtype, model.device)
        ref_logits, ref_media = run_prefill(model, batch, ref_cache)
        plan = DecodePlan(model.module, batch)
        tok = logits.argmax(-1)
        for i in range(3):
            got = step(tok, T + i).clone()
            ref = model.module(tok[:, None], plan.decode_context(T + i), ref_cache, ref_media, logits_for="last")
            torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)
            tok = ref.argmax(-1)
    assert steps[0] is steps[1] and steps[2] is not steps[0]
    assert len(state.graphs) == 2
    assert length_bucket(1) == length_bucket(128) == 128 and length_bucket(129) == 256


@torch.inference_mode()
def test_failed_capture_warns_once_and_decodes_eagerly(model, monkeypatch):
    batch = build_batch(model, PROMPTS, _images(), max_new_tokens=2)
    T = batch.tokens.shape[1]
    cache = type(model.decode_state.kv.view(model.config.decoder, 1, 1, model.dtype, model.device)).allocate(
        model.config.decoder, batch.size, T + 2, model.dtype, model.device)
    logits, media = run_prefill(model, batch, cache)
    step = StaticDecodeStep(model, cache, media, batch.pad, use_graph=False)
    expected = step(logits.argmax(-1), T).clone()
    step.use_graph = True  # as on a GPU, then make the capture fail

    def fail():
        raise RuntimeError("operation not permitted when stream is capturing")

    monkeypatch.setattr(step, "_capture", fail)
    model.decode_state = DecodeState()
    with pytest.warns(RuntimeWarning, match="capture of the decode step failed.*not permitted"):
        got = step(logits.argmax(-1), T)
    torch.testing.assert_close(got, expected)
    assert not step.use_graph and "not permitted" in model.decode_state.graph_error
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        step(logits.argmax(-1), T + 1)  # no second warning


def test_cuda_graph_option_is_checked():
    assert check_cuda_graph("auto") == "auto" and check_cuda_graph(False) is False
    with pytest.raises(ValueError, match="cuda_graph must be True, False or 'auto', got 'yes'"):
        check_cuda_graph("yes")


def test_exponential_race_is_seeded_and_follows_the_distribution():
    probs = torch.tensor([[0.5, 0.25, 0.125, 0.0625, 0.0625, 0.0]]).expand(20000, -1)
    a = exponential_race(probs, torch.Generator().manual_seed(5))
    b = exponential_race(probs, torch.Generator().manual_seed(5))
    c = exponential_race(probs, torch.Generator().manual_seed(6))
    assert torch.equal(a, b) and not torch.equal(a, c)
    counts = torch.bincount(a, minlength=6).double()
    assert counts[5] == 0  # zero probability: never drawn
    expected = probs[0, :5].double() * a.numel()
    chi2 = float(((counts[:5] - expected) ** 2 / expected).sum())
    assert chi2 < 30.0, f"chi-square {chi2:.1f} with 4 degrees of freedom (p < 1e-5 above 25.7)"


@pytest.mark.parametrize("vocab", [7, 32002])
def test_sample_marks_nan_rows_without_a_host_sync(vocab):
    # sample finds NaN rows through the argmax (which lands on a row's first NaN): NaNs before and
    # after the largest logit, at either end, several in a row, a row of NaN only
    logits = torch.randn(6, vocab)
    logits[0, 0] = 1e6  # a finite row whose largest logit is first
    logits[1, 4] = float("nan")
    logits[2, -1] = float("nan")
    logits[2, 1] = 1e6
    logits[3, 2:5] = float("nan")
    logits[4] = float("nan")
    for kw in (dict(temperature=0.0), dict(temperature=0.9, top_k=3, top_p=0.8)):
        toks = sample(logits, top_k=kw.get("top_k", 0), top_p=kw.get("top_p", 1.0), temperature=kw["temperature"],
                      generator=torch.Generator().manual_seed(0))
        assert toks.tolist()[1:5] == [NAN_TOKEN] * 4
        assert toks[0] >= 0 and toks[5] >= 0


@pytest.mark.parametrize("cuda_graph", [False, True])
def test_nan_logits_raise_naming_the_prompt_and_step(cuda_graph):
    m = demo_model(device="cpu", backend="torch")
    m.cuda_graph = cuda_graph
    poison = 50  # a token only prompt 1 holds: its row's logits are NaN, prompt 0's are not
    with torch.no_grad():
        m.module.decoder.embed.weight[poison] = float("nan")
    with pytest.raises(ValueError, match=r"NaN logits for prompt 1 at decode step 0"):
        lmmrt.generate(m, [[1, 10, 11, 12], [1, 10, poison, 11]], max_new_tokens=3, ignore_eos=True)


@pytest.mark.parametrize("mode", ["immediate", "cumulative"])
def test_gathered_media_matches_the_masked_reference(mode):
    """Rows before any media, past their last media, with none at all, and ordinary ones."""
    torch.manual_seed(0)
    H, dh, L = 3, 16, 5
    counts, times = [2, 3, 0, 1, 2], [1, 3, 0, 5, 0]
    starts = [sum(counts[:b]) for b in range(len(counts))]
    N, B = sum(counts), len(counts)
    kv = [(torch.randn(N, L, H, dh), torch.randn(N, L, H, dh)) for _ in range(2)]
    media = MediaContext(kv=kv, text_time=torch.tensor(times, dtype=torch.int32)[:, None],
                         media_start=torch.tensor(starts, dtype=torch.int32),
                         media_count=torch.tensor(counts, dtype=torch.int32), any_media=True)

    class _Module:
        xattn = [None]

        class cfg:
            class xattn:
                mask_mode = mode

    g = gather_media(_Module, media, "torch")
    q = torch.randn(B, 1, H, dh)
    for j, (k, v) in enumerate(kv):
        ref = masked_cross_attention_reference(q, k, v, media.text_time, media.media_start, media.media_count,
                                               mode=mode)
        torch.testing.assert_close(g.attend(q, j), ref, rtol=1e-5, atol=1e-5)
    assert not math.isnan(float(g.attend(q, 0).sum()))


def test_cpu_decode_weight_layout_keeps_values_and_logits():
    """Input-major linear weights on the CPU (a layout change only): same values, same logits."""
    plain = demo_model(device="cpu", backend="torch")
    module = plain.module
    lin = module.decoder.layers[0].wqkv
    assert not lin.weight.is_contiguous() and lin.weight.t().is_contiguous()
    contiguous = {k: v.contiguous() for k, v in module.state_dict().items()}
    ref = demo_model(device="cpu", backend="torch")
    for m in ref.module.modules():  # undo the layout: every weight back to (out, in) contiguous
        if isinstance(m, torch.nn.Linear):
            m.weight.data = m.weight.data.contiguous()
    assert all(torch.equal(contiguous[k], v) for k, v in ref.module.state_dict().items())
    got = lmmrt.logits(plain, PROMPTS, _images())
    want = lmmrt.logits(ref, PROMPTS, _images())
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-4)


def test_finished_rows_are_dropped_and_the_rest_decode_unchanged(model, monkeypatch):
    """Once half the batch has finished, the eager step keeps only the live rows; the fixed-shape
    step (cuda_graph=True, which drops rows without EagerDecode.select) must give the same tokens for
    every prompt."""
    from lmmrt.runtime.decode_plan import EagerDecode

    full = _tokens(model, PROMPTS, _images(), 12)
    stops = [next(t for t in full[r][1:] if t not in full[2]) for r in (0, 1)]
    selected = []
    select = EagerDecode.select
    monkeypatch.setattr(EagerDecode, "select", lambda self, rows: (selected.append(rows.tolist()), select(self, rows)))
    kw = dict(max_new_tokens=12, stop_token_ids=stops, ignore_eos=True, repetition_penalty=1.3)
    eager = lmmrt.generate(model, PROMPTS, _images(), **kw)
    model.cuda_graph = True
    try:
        fixed = lmmrt.generate(model, PROMPTS, _images(), **kw)
    finally:
        model.cuda_graph = False
    assert selected == [[2]], selected
    assert [r.token_ids for r in eager] == [r.token_ids for r in fixed]
    assert [r.finish_reason for r in eager] == ["stop", "stop", "length"]


def test_load_checks_cuda_graph_before_reading_anything(tmp_path):
    # a path that does not exist: the option's error comes first, before the path is looked at (a bad
    # value used to surface only after every weight was read, and never for CLIP checkpoints)
    with pytest.raises(ValueError, match="cuda_graph must be True, False or 'auto', got 'yes'"):
        lmmrt.load(tmp_path / "absent", device="cpu", cuda_graph="yes")
