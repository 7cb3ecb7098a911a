"""The serving engine on Llama 3.2 Vision (Mllama): tiled images with their aspect ratios, text
before the first image, consecutive markers, each request at its own position: greedy tokens of
concurrent, chunked requests equal lmmrt.generate of each alone, in the eager and the fixed-shape
decode step."""

from __future__ import annotations

import numpy as np
import pytest
from mllama_tokenizer import mllama_tokenizer
from mllama_util import BOS, IMAGE_ID, tiny_mllama

import lmmrt
from lmmrt.convert.mllama_files import convert_mllama
from lmmrt.serve import Engine, EngineRequest

I = IMAGE_ID  # noqa: E741 - the marker, short so prompts read as written
PROMPTS = [[BOS, 5, 6, I, 7, 8, 9], [BOS, 10, 11, 12], [I, BOS, 13, 14, I, 15, 16, 17], [BOS, I, I, 20, 21, 22]]
SIZES = [[(20, 50)], [], [(45, 19), (21, 60)], [(33, 30), (16, 40)]]  # 1x2, 2x1 and 1x1 tile grids


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    d = tmp_path_factory.mktemp("mllama")
    tiny_mllama(seed=3).save_pretrained(d / "src")
    mllama_tokenizer().save(str(d / "src" / "tokenizer.json"))
    convert_mllama(d / "src", d / "out", progress=False)
    return lmmrt.load(d / "out", device="cpu", backend="torch", cuda_graph=False)


@pytest.mark.parametrize("fixed_step", [False, True])
def test_concurrent_chunked_mllama_requests_equal_generate(model, fixed_step):
    rng = np.random.default_rng(7)
    pics = [[(rng.random((h, w, 3)) * 255).astype(np.uint8) for h, w in sizes] for sizes in SIZES]
    reqs = [EngineRequest(p, imgs, max_tokens=6 + i) for i, (p, imgs) in enumerate(zip(PROMPTS, pics))]
    engine = Engine(model, max_batch=3, token_budget=3, fixed_step=fixed_step)  # chunks of 1-3 tokens
    handles = [engine.submit(r) for r in reqs + reqs[2:3]]  # the repeated request hits the media cache
    for _ in range(300):
        if all(h.done for h in handles):
            break
        engine.step()
    for r, h in zip(reqs + reqs[2:3], handles):
        ref = lmmrt.generate(model, [r.prompt], [r.images], max_new_tokens=r.max_tokens)[0]
        assert h.result(timeout=0)[1] == ref.token_ids
    assert engine.metrics()["media_cache_hits"] >= 2
