"""The fixed-shape decode step (the one captured as a CUDA graph on a GPU) computes exactly what
the eager decode does: on the CPU it runs eagerly, so the tokens must be identical."""

from __future__ import annotations

import pytest
import torch

import lmmrt
from lmmrt.demo import demo_images, demo_model


@pytest.fixture(scope="module")
def model():
    return demo_model(device="cpu", backend="torch")


def _run(model, graph, **kw):
    model.cuda_graph = graph
    try:
        return lmmrt.generate(model, ["a<image>b", "<image>c<image>dd e", "no image"],
                              [[demo_images()[0]], demo_images(), []], max_new_tokens=12, ignore_eos=True, **kw)
    finally:
        model.cuda_graph = False


@pytest.mark.parametrize("kw", [{}, {"temperature": 0.8, "seed": 3}])
def test_static_step_matches_eager_decode(model, kw):
    eager = _run(model, False, **kw)
    static = _run(model, True, **kw)
    assert [r.token_ids for r in eager] == [r.token_ids for r in static]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_cuda_graph_decode_matches_eager_on_gpu():
    from lmmrt.runtime.static_decode import graph_capturable

    m = demo_model(device="cuda", backend="auto")
    assert graph_capturable(m), "the cross-attention op must resolve to a kernel on CUDA"
    eager = _run(m, False)
    graph = _run(m, True)
    assert [r.token_ids for r in eager] == [r.token_ids for r in graph]
