"""Model.release_caches: the pooled KV / media caches kept between calls are freed on request."""

from __future__ import annotations

import pytest

import lmmrt
from lmmrt.demo import demo_images, demo_model

PROMPT = "Look:<image> and<image> then"


@pytest.mark.parametrize("cuda_graph", [False, True])
def test_release_frees_the_pools_and_later_calls_give_the_same_tokens(cuda_graph):
    model = demo_model(device="cpu", backend="torch")
    model.cuda_graph = cuda_graph
    first = lmmrt.generate(model, PROMPT, demo_images(), max_new_tokens=6, ignore_eos=True)[0].token_ids
    state = model.decode_state
    kv = state.kv.buffer
    expected = kv.nbytes + sum(t.numel() * t.element_size() for pair in state.media_kv for t in pair)
    assert kv is not None and expected > 0  # (the media pool fills on the CUDA-graph path only)

    assert model.release_caches() == expected
    assert model.decode_state.kv.buffer is None and model.decode_state.media_kv == []
    assert model.release_caches() == 0  # nothing left to free

    again = lmmrt.generate(model, PROMPT, demo_images(), max_new_tokens=6, ignore_eos=True)[0].token_ids
    assert again == first and model.decode_state.kv.buffer is not None


def test_release_is_refused_while_a_stream_is_running():
    model = demo_model(device="cpu", backend="torch")
    stream = lmmrt.generate(model, PROMPT, demo_images(), max_new_tokens=4, ignore_eos=True, stream=True)
    next(iter(stream))
    with pytest.raises(RuntimeError, match="still running"):
        model.release_caches()
    for _ in stream:  # read to its end: the pool is free again
        pass
    assert model.release_caches() > 0
