"""How many requests' decoded images the server holds at once, and that a request the engine would refuse
decodes none: the HTTP app in process (httpx's ASGI transport) in front of a fake engine whose submit the
test holds, counting the images decoded and not yet handed to the engine."""

from __future__ import annotations

import asyncio
import base64
import io
import threading

import pytest

httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")

from PIL import Image  # noqa: E402

from lmmrt.serve import images as serve_images  # noqa: E402
from lmmrt.serve.app import IMAGE_DECODE_SLOTS, ServeOptions, build_app  # noqa: E402
from lmmrt.serve.requests import Finished, QueueFull  # noqa: E402

REQUESTS, IMAGES = 6, 2


class FakeHandle:
    id, prompt_tokens = "req-fake", 1

    async def events(self):
        yield Finished("stop", 1, 0)

    def cancel(self):
        pass


class FakeEngine:
    """submit waits for `release`, then takes the request's images (as the engine turns them into tensors)."""

    max_context = 64

    def __init__(self, *, full: bool = False):
        self.full, self.release = full, threading.Event()
        self.lock, self.pending, self.most_pending, self.decoded = threading.Lock(), 0, 0, 0

    def decoded_one(self):
        with self.lock:
            self.decoded += 1
            self.pending += 1
            self.most_pending = max(self.most_pending, self.pending)

    def check_room(self):
        if self.full:
            raise QueueFull("the request queue is full", retry_after=3)

    def submit(self, req):
        self.check_room()
        assert self.release.wait(30)
        with self.lock:
            self.pending -= len(req.images)
        return FakeHandle()


@pytest.fixture
def engine(monkeypatch):
    engine = FakeEngine()
    decode = serve_images._decode

    def counting_decode(im, where):
        image = decode(im, where)
        engine.decoded_one()
        return image

    monkeypatch.setattr(serve_images, "_decode", counting_decode)
    return engine


def body(width: int = 7, height: int = 5) -> dict:
    buf = io.BytesIO()
    Image.new("RGB", (width, height), (3, 4, 5)).save(buf, format="PNG")
    url = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
    return {"model": "m", "prompt": "<image>" * IMAGES + "hi", "images": [url] * IMAGES, "max_tokens": 2}


async def post_all(engine, n: int) -> list:
    app = build_app(engine, None, ServeOptions(model_name="m"), None)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as client:
        posts = [asyncio.create_task(client.post("/v1/completions", json=body())) for _ in range(n)]
        for _ in range(200):  # until every request that may decode has (bounded: 10 s)
            await asyncio.sleep(0.05)
            if engine.decoded >= min(n, IMAGE_DECODE_SLOTS) * IMAGES or all(p.done() for p in posts):
                break
        await asyncio.sleep(0.3)  # room for any other request to decode: none may
        held = engine.most_pending
        engine.release.set()
        return held, await asyncio.gather(*posts)


def test_decoded_images_wait_for_the_engine_inside_the_decode_slots(engine):
    """Each request's slot was released when its images were decoded: 8 requests of four 4096^2 images
    then held all their pixels while waiting for the one submit thread (RSS 0.6 -> 4.3 GB)."""
    held, answers = asyncio.run(post_all(engine, REQUESTS))
    assert [r.status_code for r in answers] == [200] * REQUESTS
    assert held == IMAGE_DECODE_SLOTS * IMAGES, held
    assert engine.decoded == REQUESTS * IMAGES and engine.pending == 0


def test_image_limits_are_checked_without_waiting_for_a_decode_slot(engine):
    async def run():
        app = build_app(engine, None, ServeOptions(model_name="m", max_image_pixels=34), None)
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as client:
            posts = [asyncio.create_task(client.post("/v1/completions", json=body(5, 4)))
                     for _ in range(IMAGE_DECODE_SLOTS)]
            while engine.decoded < IMAGE_DECODE_SLOTS * IMAGES:  # every slot is held (the engine waits)
                await asyncio.sleep(0.05)
            refused = await asyncio.wait_for(client.post("/v1/completions", json=body()), 10)
            engine.release.set()
            return refused, await asyncio.gather(*posts)

    refused, answers = asyncio.run(asyncio.wait_for(run(), 30))
    assert refused.status_code == 400 and "--max-image-pixels" in refused.json()["error"]["message"]
    assert [r.status_code for r in answers] == [200] * IMAGE_DECODE_SLOTS


def test_a_request_refused_for_a_full_queue_decodes_nothing(engine):
    engine.full = True
    engine.release.set()
    _, answers = asyncio.run(post_all(engine, 1))
    assert answers[0].status_code == 503 and answers[0].headers["retry-after"] == "3"
    assert engine.decoded == 0
