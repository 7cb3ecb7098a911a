"""The serving engine's results: many concurrent requests get what each gets alone and what
lmmrt.generate gives; requests joining mid-flight, chunked prefill, the fixed-shape decode step,
the media cache and per-request sampling change nothing."""

from __future__ import annotations

import asyncio

import pytest
import torch
from serve_util import FAMILIES, images, mixed_requests, tiny_model

import lmmrt
from lmmrt.serve import Delta, Engine, EngineRequest, Finished

TIMEOUT = 120  # seconds any one request may take here (a few on a free CPU)


@pytest.fixture(scope="module", params=FAMILIES)
def model(request):
    return tiny_model(request.param)


def _requests(n: int, seed: int = 0) -> list[EngineRequest]:
    return [EngineRequest(p, imgs, max_tokens=k) for p, imgs, k in mixed_requests(n, seed=seed)]


def _alone(model, req: EngineRequest, **kw) -> tuple:
    """req on an engine of its own, driven step by step (no thread)."""
    engine = Engine(model, max_batch=1, **kw)
    handle = engine.submit(req)
    for _ in range(req.max_tokens + 64):
        if handle.done:
            break
        engine.step()
    return handle.result(timeout=0)


def _run_all(engine: Engine, reqs: list[EngineRequest], *, max_steps: int = 2000) -> list[tuple]:
    handles = [engine.submit(r) for r in reqs]
    for _ in range(max_steps):
        if all(h.done for h in handles):
            break
        engine.step()
    return [h.result(timeout=0) for h in handles]


def test_sixteen_concurrent_greedy_requests_equal_each_alone_and_generate(model):
    """16 requests of mixed prompt lengths, image counts and max_tokens through the scheduler thread,
    8 slots (so half of them queue and join as others leave): each gets exactly what lmmrt.generate
    gives it alone (the engine alone: see the other tests)."""
    reqs = _requests(16)
    with Engine(model, max_batch=8, token_budget=64) as engine:
        handles = [engine.submit(r) for r in reqs]
        together = [h.result(timeout=TIMEOUT) for h in handles]
        stats = engine.metrics()
        assert stats["requests_finished"] == 16, stats
    ids = {h.id for h in handles}
    assert len(ids) == 16
    for r, got in zip(reqs, together):
        ref = lmmrt.generate(model, r.prompt, r.images, max_new_tokens=r.max_tokens)[0]  # alone
        assert got[1] == ref.token_ids, r.prompt
        assert got[0] == ref.text
        assert got[2] == ref.finish_reason
        assert got[3]["completion_tokens"] == len(ref.token_ids)
        assert got[3]["prompt_tokens"] == ref.prompt_tokens


def test_fixed_shape_decode_step_equals_the_eager_one(model):
    """The CUDA-graph step (bucketed rows, key ranges, media pool), run eagerly on the CPU, gives
    the eager step's tokens for a mixed batch with requests joining and leaving."""
    reqs = _requests(7, seed=1)
    eager = _run_all(Engine(model, max_batch=5, fixed_step=False), reqs)
    fixed = _run_all(Engine(model, max_batch=5, fixed_step=True), reqs)
    assert [r[1] for r in fixed] == [r[1] for r in eager]


@pytest.mark.parametrize("family", ["idefics", "openflamingo"])
def test_fixed_step_on_the_kernels_equals_the_eager_torch_step(family):
    """The fixed-shape step as a GPU runs it: decode_attention's and the masked cross-attention's
    Triton kernels (the CPU interpreter here) over per-row key ranges, ALiBi, the media pool; the
    tokens are those of the eager torch step."""
    model = tiny_model(family)  # its own: the backend changes
    reqs = [EngineRequest(p, imgs, max_tokens=min(k, 5)) for p, imgs, k in mixed_requests(4, seed=2)]
    eager = _run_all(Engine(model, max_batch=4, max_context=64, fixed_step=False), reqs)
    model.backend = "triton"
    model.module.set_backend("triton")
    fixed = _run_all(Engine(model, max_batch=4, max_context=64, fixed_step=True), reqs)
    assert [r[1] for r in fixed] == [r[1] for r in eager]


def test_a_request_joining_mid_flight_changes_nothing(model):
    engine = Engine(model, max_batch=4)
    first, second = _requests(2, seed=2)
    first.max_tokens, second.max_tokens = 12, 6
    a = engine.submit(first)
    for _ in range(4):
        engine.step()
    assert len(a.token_ids) == 5 and not a.done  # a step: the prefill's token, then a decode step's
    b = engine.submit(second)
    engine.step()
    assert (len(a.token_ids), len(b.token_ids)) == (6, 2)  # b joined a's decode step at once
    for _ in range(40):
        if a.done and b.done:
            break
        engine.step()
    assert a.result(timeout=0)[1] == _alone(model, first)[1]
    assert b.result(timeout=0)[1] == _alone(model, second)[1]


@pytest.mark.parametrize("budget", [1, 5])
def test_chunked_prefill_equals_unchunked(model, budget):
    """A token budget far below the prompt lengths: prompts go in chunks (markers, a splice
    model's feature positions and media ordinals crossing chunk boundaries), interleaved with
    other rows' decode steps; the tokens are those of the three whole prompts prefilled in one
    left-padded forward, and of each alone."""
    pics = images(2, 5)
    reqs = [EngineRequest("a long preamble, then" + "<image> and more text" * 2 + " end", pics, max_tokens=8),
            EngineRequest("short <image>", pics[1:], max_tokens=10),
            EngineRequest("text only, of some length to chunk", [], max_tokens=5)]
    chunked_engine, whole_engine = Engine(model, max_batch=3, token_budget=budget), Engine(model, max_batch=3)
    chunked, whole = _run_all(chunked_engine, reqs), _run_all(whole_engine, reqs)
    assert chunked_engine.metrics()["prefill_chunks"] > 3 + 20 // budget
    assert (whole_engine.metrics()["prefill_batches"], whole_engine.metrics()["prefill_chunks"]) == (1, 0)
    assert [r[1] for r in chunked] == [r[1] for r in whole]
    assert [r[1] for r in whole] == [_alone(model, r)[1] for r in reqs]


def test_media_cache_hit_shares_the_entry_and_gives_the_same_output(model):
    pic = images(1, 9)
    req_a = EngineRequest("first <image> question", pic, max_tokens=6)
    req_b = EngineRequest("another question about <image>", pic, max_tokens=6)
    engine = Engine(model, max_batch=2, token_budget=4)  # small budget: b stays prefilling for a few steps
    got_a = _run_all(engine, [req_a])[0]
    hb = engine.submit(req_b)
    engine.step()
    stats = engine.metrics()
    assert (stats["media_cache_hits"], stats["media_cache_misses"], stats["media_cache_entries"]) == (1, 1, 1)
    (entry,) = engine.media_cache._entries.values()
    (seq,) = engine._prefilling
    if seq.features is None:  # cross-attention: the request reads the cached media K/V themselves
        assert seq.media_kv[0][0].data_ptr() == entry.kv[0][0].data_ptr()
    for _ in range(60):
        if hb.done:
            break
        engine.step()
    uncached = Engine(model, max_batch=2, media_cache_bytes=0)
    assert got_a[1] == _alone(model, req_a, media_cache_bytes=0)[1]
    assert hb.result(timeout=0)[1] == _run_all(uncached, [req_b])[0][1]
    assert uncached.metrics()["media_cache_entries"] == 0


def test_seeded_sampling_is_per_request(model):
    """A seeded sampled request draws the same tokens alone and beside greedy and other sampled
    requests (a generator per request); another seed draws others."""
    sampled = EngineRequest("sample <image> this", images(1, 3), max_tokens=12, temperature=1.3, top_k=20,
                            top_p=0.95, seed=11, ignore_eos=True)
    others = _requests(5, seed=4) + [EngineRequest("x", [], max_tokens=9, temperature=0.7, seed=1)]
    together = _run_all(Engine(model, max_batch=8), others[:3] + [sampled] + others[3:])[3]
    assert together[1] == _alone(model, sampled)[1]
    sampled.seed = 12
    assert _alone(model, sampled)[1] != together[1]


def test_stop_string_and_streamed_deltas_match_generate(model):
    """Deltas are read through the async iterator while the scheduler thread runs; their texts add
    up to the final text, which is cut before the stop string as lmmrt.generate cuts it."""
    base = EngineRequest("stream <image> me", images(1, 6), max_tokens=16, ignore_eos=True)
    full = lmmrt.generate(model, base.prompt, base.images, max_new_tokens=16, ignore_eos=True)[0].text
    stop = full[5:7]
    req = EngineRequest(base.prompt, base.images, max_tokens=16, ignore_eos=True, stop=[stop])
    ref = lmmrt.generate(model, req.prompt, req.images, max_new_tokens=16, ignore_eos=True, stop=stop)[0]

    async def consume(handle):
        out = []
        async for ev in handle.events():
            out.append(ev)
        return out

    with Engine(model, max_batch=2) as engine:
        handle = engine.submit(req)
        events = asyncio.run(asyncio.wait_for(consume(handle), TIMEOUT))
    assert all(isinstance(e, Delta) for e in events[:-1]) and isinstance(events[-1], Finished)
    text = "".join(e.text for e in events[:-1])
    assert text == ref.text == handle.result(timeout=0)[0]
    assert stop not in text and events[-1].finish_reason == "stop" == ref.finish_reason
    assert events[-1].completion_tokens == len(ref.token_ids)


def test_kv_slots_follow_the_memory_budget(model):
    from lmmrt.serve.kv_slots import slot_bytes

    per_row = slot_bytes(model.config.decoder, 64, model.dtype)
    engine = Engine(model, max_batch=8, max_context=64, max_memory=3 * per_row + 1)
    assert engine.metrics()["kv_total"] == 3
    with pytest.raises(ValueError, match="holds no request"):
        Engine(model, max_context=64, max_memory=per_row - 1)
    with pytest.raises(ValueError, match="context of 64"):
        engine.submit(EngineRequest("x" * 40, [], max_tokens=30))


def test_nan_logits_end_requests_with_an_error_and_free_their_slots():
    model = tiny_model("idefics")
    engine = Engine(model, max_batch=2)
    running = engine.submit(EngineRequest("fine", [], max_tokens=6))
    engine.step()
    with torch.no_grad():
        model.module.decoder.lm_head.weight[5].fill_(float("nan"))
    newcomer = engine.submit(EngineRequest("broken", [], max_tokens=6))
    for _ in range(10):
        engine.step()
    for h in (running, newcomer):
        assert h.result(timeout=0)[2] == "error" and "NaN" in h.finished.error
    stats = engine.metrics()
    assert (stats["kv_used"], stats["requests_failed"]) == (0, 2)
