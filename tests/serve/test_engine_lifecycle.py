"""The serving engine's admission and lifecycle: bad requests refused at submit without touching
running ones, the bounded queue, cancellation freeing a slot at once, shutdown, the media cache's
LRU budget. Every loop is bounded in steps, every wait in time."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from serve_util import images, tiny_model

import lmmrt
from lmmrt.serve import Engine, EngineClosed, EngineRequest, QueueFull
from lmmrt.serve.media_cache import MediaCache, MediaEntry

TIMEOUT = 120


@pytest.fixture(scope="module")
def model():
    return tiny_model("idefics")


def _steps(engine: Engine, handles, n: int = 200) -> None:
    for _ in range(n):
        if all(h.done for h in handles):
            return
        engine.step()


def _bad_requests():
    from PIL import Image

    corrupt = Image.open(io.BytesIO(_png_bytes()[:60]))  # a truncated PNG: opens, cannot decode
    return [
        (EngineRequest("two <image> markers <image>", images(1, 0)), ValueError, "2 media marker"),
        (EngineRequest("no marker", images(1, 0)), ValueError, "0 media marker"),
        (EngineRequest("<image>", [corrupt]), ValueError, "cannot be decoded"),
        (EngineRequest("<image>", [np.zeros((4, 4), dtype=np.float64)]), TypeError, "uint8"),
        (EngineRequest("x" * 300, []), ValueError, "context"),
        (EngineRequest("hi", [], temperature=-1.0), ValueError, "temperature"),
        (EngineRequest("hi", [], top_p=0.0), ValueError, "top_p"),
        (EngineRequest("hi", [], max_tokens=0), ValueError, "max_tokens"),
        (EngineRequest("hi", [], stop=[""]), ValueError, "stop"),
        (EngineRequest([], []), ValueError, "empty"),
        (EngineRequest([1, 10**6], []), ValueError, "vocabulary"),
        ("hi", TypeError, "EngineRequest"),
    ]


def _png_bytes() -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(images(1, 1)[0]).save(buf, format="PNG")
    return buf.getvalue()


def test_bad_requests_raise_at_submit_and_running_ones_are_undisturbed(model):
    good = EngineRequest("User: a <image> b\nAssistant:", images(1, 2), max_tokens=10)
    ref = lmmrt.generate(model, good.prompt, good.images, max_new_tokens=10)[0]
    with Engine(model, max_batch=2) as engine:
        running = engine.submit(good)
        for req, error, words in _bad_requests():
            with pytest.raises(error, match=words):
                engine.submit(req)
        assert running.result(timeout=TIMEOUT)[1] == ref.token_ids
        stats = engine.metrics()
    assert (stats["requests_finished"], stats["requests_failed"], stats["queue_len"]) == (1, 0, 0)


def test_full_queue_refuses_with_retry_after_and_shutdown_cancels_the_waiting(model):
    """Room is the free slot rows plus the queue: with 2 rows and a queue of 2, the engine (not started, so
    nothing leaves the queue) takes 4 requests, not 2 (a burst onto free rows was refused)."""
    engine = Engine(model, max_batch=2, max_queue=2)
    waiting = [engine.submit(EngineRequest("q", [], max_tokens=3)) for _ in range(4)]
    with pytest.raises(QueueFull, match="queue is full") as refused:
        engine.submit(EngineRequest("one more", [], max_tokens=3))
    assert refused.value.retry_after >= 1
    assert engine.metrics()["queue_len"] == 4
    engine.shutdown(grace_s=0)
    assert [h.result(timeout=0)[2] for h in waiting] == ["cancelled"] * 4
    with pytest.raises(EngineClosed):
        engine.submit(EngineRequest("late", [], max_tokens=3))


def test_cancel_frees_the_slot_for_the_next_request(model):
    engine = Engine(model, max_batch=1)
    long = engine.submit(EngineRequest("long one", [], max_tokens=200, ignore_eos=True))
    engine.step()
    queued = engine.submit(EngineRequest("next <image>", images(1, 4), max_tokens=4))
    engine.step()
    assert (engine.metrics()["kv_used"], engine.metrics()["queue_len"]) == (1, 1)  # no free slot
    long.cancel()
    engine.step()  # the cancelled row leaves, the queued request takes its slot in the same step
    text, ids, reason, usage = long.result(timeout=0)
    assert reason == "cancelled" and 0 < len(ids) < 200 and usage["completion_tokens"] == len(ids)
    assert engine.metrics()["queue_len"] == 0 and len(queued.token_ids) > 0
    _steps(engine, [queued])
    assert queued.result(timeout=0)[1] == lmmrt.generate(model, "next <image>", images(1, 4),
                                                         max_new_tokens=4)[0].token_ids
    assert engine.metrics()["kv_used"] == 0


def test_cancel_of_a_queued_request_and_a_finished_one(model):
    engine = Engine(model, max_batch=1)
    a = engine.submit(EngineRequest("a", [], max_tokens=2))
    b = engine.submit(EngineRequest("b", [], max_tokens=2))
    b.cancel()
    _steps(engine, [a, b])
    assert b.result(timeout=0)[2] == "cancelled" and b.token_ids == []
    reason = a.result(timeout=0)[2]
    a.cancel()  # after the end: nothing changes
    engine.step()
    assert a.result(timeout=0)[2] == reason
    assert engine.metrics()["requests_cancelled"] == 1


def test_shutdown_cancels_running_requests_after_the_grace_period(model):
    engine = Engine(model, max_batch=2)
    engine.start()
    h = engine.submit(EngineRequest("go on", [], max_tokens=250, ignore_eos=True))
    for _ in range(200):  # wait (bounded) until it runs
        if h.token_ids:
            break
        h._done.wait(0.05)
    engine.shutdown(grace_s=0.0)
    assert not engine.alive
    assert h.result(timeout=TIMEOUT)[2] in ("cancelled", "length")
    assert engine.metrics()["kv_used"] == 0


def test_shutdown_lets_running_requests_finish_within_the_grace_period(model):
    engine = Engine(model, max_batch=2)
    engine.start()
    hs = [engine.submit(EngineRequest(p, [], max_tokens=5)) for p in ("one", "two", "three")]
    engine.shutdown(grace_s=TIMEOUT)
    assert all(h.result(timeout=0)[2] in ("stop", "length") for h in hs)


def _entry(nbytes: int) -> MediaEntry:
    t = torch.zeros(nbytes // 4)
    return MediaEntry(latents=t, kv=[(t, t)])


def test_media_cache_evicts_least_recently_used_within_its_budget():
    cache = MediaCache(1000)
    cache.put("a", _entry(400))
    cache.put("b", _entry(400))
    assert cache.get("a") is not None  # a is now the most recent: b goes first
    cache.put("c", _entry(400))
    assert cache.get("b") is None and cache.get("a") is not None and cache.get("c") is not None
    cache.put("huge", _entry(2000))  # bigger than the whole budget: not kept, nothing evicted
    stats = cache.stats()
    assert (stats["media_cache_bytes"], stats["media_cache_entries"], stats["media_cache_evictions"]) == (800, 2, 1)
    assert (stats["media_cache_hits"], stats["media_cache_misses"]) == (3, 1)
    with pytest.raises(ValueError, match="media_cache_bytes"):
        MediaCache(-1)


def test_engine_options_are_checked(model):
    for kw, words in [(dict(max_batch=0), "max_batch"), (dict(max_queue=-1), "max_queue"),
                      (dict(token_budget=0), "token_budget"), (dict(memory_fraction=1.5), "memory_fraction"),
                      (dict(max_context=10**6), "beyond the model's context"), (dict(max_memory=0), "max_memory")]:
        with pytest.raises(ValueError, match=words):
            Engine(model, **kw)
    with pytest.raises(TypeError, match="generative"):
        Engine(object())


def test_a_row_left_with_nan_is_cleared_before_the_next_request_uses_it():
    """A request whose K/V turn NaN fails; the next request in its row, decoding beside a longer
    row (so its masked keys reach over the stale positions), gets generate's tokens."""
    model = tiny_model("idefics")  # its own: an embedding row is broken for a while
    embed = model.module.decoder.embed.weight
    qid = model.tokenizer.encode("Q")[-1]
    saved = embed[qid].clone()
    engine = Engine(model, max_batch=2, fixed_step=False)
    long = engine.submit(EngineRequest("a long request that keeps the batch wide " * 2, [], max_tokens=40,
                                       ignore_eos=True))
    engine.step()
    with torch.no_grad():
        embed[qid] = float("nan")
    poisoned = engine.submit(EngineRequest("Q" * 30, [], max_tokens=4))
    engine.step()
    assert poisoned.result(timeout=0)[2] == "error"
    with torch.no_grad():
        embed[qid] = saved
    short = engine.submit(EngineRequest("hi", [], max_tokens=8, ignore_eos=True))
    _steps(engine, [long, short])
    assert short.result(timeout=0)[1] == lmmrt.generate(model, "hi", max_new_tokens=8, ignore_eos=True)[0].token_ids
    assert long.result(timeout=0)[2] == "length"


def test_events_start_from_the_first_whenever_the_reader_comes():
    """A reader that starts after some or all of the events gets every one once, in order."""
    import asyncio

    from lmmrt.serve import Delta, Finished

    engine = Engine(tiny_model("llava"), max_batch=1)
    h = engine.submit(EngineRequest("tell <image>", images(1, 8), max_tokens=9, ignore_eos=True))

    async def read_while_stepping():
        out = []
        async for ev in h.events():
            out.append(ev)
            if len(out) == 3:  # the rest arrives while this reader waits
                for _ in range(20):
                    engine.step()
        return out

    engine.step()
    engine.step()  # 3 tokens before anyone reads
    early = asyncio.run(asyncio.wait_for(read_while_stepping(), TIMEOUT))
    late = asyncio.run(asyncio.wait_for(_collect(h), TIMEOUT))
    assert early == late
    assert [type(e) for e in early] == [Delta] * 9 + [Finished]
    assert [t for e in early[:-1] for t in e.token_ids] == h.result(timeout=0)[1]


async def _collect(handle):
    return [ev async for ev in handle.events()]
