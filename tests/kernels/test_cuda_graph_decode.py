"""The CUDA extension's cross-attention decode kernel inside a captured CUDA-graph decode step
(GPU only): a tiny bf16 model whose cross-attention has 128-wide heads (the kernel's production
shape), loaded through the public API with cuda_graph=True and backend "cuda".

Greedy tokens of the graph decode are checked against the model's own prompt logits of the whole
generated sequence (a different path: prefill, no graph): each chosen token must be the argmax
there up to bf16 tolerance. That is robust to near-ties, where comparing two token streams is not.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

import lmmrt
from lmmrt.api import Model
from lmmrt.demo import char_tokenizer, demo_config, demo_images
from lmmrt.kernels import backend as _backend
from lmmrt.kernels import masked_cross_attention_cuda as mxa
from lmmrt.models.random_init import random_model
from lmmrt.runtime.tokenizer import Tokenizer

pytestmark = [
    pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU"),
    pytest.mark.skipif(_backend.cuda_extension() is None, reason="needs the CUDA extension (lmmrt._C)"),
]

PROMPTS = ["a<image>b", "<image>c<image>dd e"]
NEW_TOKENS = 10


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    tok = char_tokenizer()
    cfg = demo_config(tok.get_vocab_size())
    cfg = dataclasses.replace(cfg, xattn=dataclasses.replace(cfg.xattn, heads=2, head_dim=128))
    # std 0.2: logits far enough apart that greedy choices are not all near-ties
    module = random_model(cfg, seed=7, device="cpu", dtype=torch.bfloat16, std=0.2)
    path = tmp_path_factory.mktemp("xattn128") / "model"
    Model(module, cfg, Tokenizer(tok), backend="torch", path="").save(path)
    return path


def test_cuda_decode_kernel_runs_inside_captured_step(checkpoint, monkeypatch):
    model = lmmrt.load(checkpoint, device="cuda", dtype=torch.bfloat16, backend="cuda", cuda_graph=True)
    assert model.config.xattn.head_dim == 128 and model.dtype == torch.bfloat16
    captured, eager = [], []
    launch = mxa.launch_decode

    def spy(*args, **kwargs):
        (captured if torch.cuda.is_current_stream_capturing() else eager).append(1)
        return launch(*args, **kwargs)

    monkeypatch.setattr(mxa, "launch_decode", spy)
    images = [[demo_images()[0]], demo_images()]
    # token-id prompts: generate and logits then see the very same ids (text prompts get the
    # image template added, which a token list of prompt + output would not)
    prompt_ids = [model.tokenizer.encode(p) for p in PROMPTS]
    results = lmmrt.generate(model, prompt_ids, images, max_new_tokens=NEW_TOKENS, ignore_eos=True)
    n_xattn = len(model.config.xattn.layers)
    assert len(captured) == n_xattn, (
        f"the CUDA decode kernel was launched {len(captured)} times inside a graph capture "
        f"({len(eager)} times eagerly); expected once per cross-attention layer ({n_xattn})")

    full = lmmrt.logits(model, [ids + r.token_ids for ids, r in zip(prompt_ids, results)], images)
    for b, (ids, r) in enumerate(zip(prompt_ids, results)):
        assert len(r.token_ids) == NEW_TOKENS
        for i, t in enumerate(r.token_ids):
            row = full[b][len(ids) - 1 + i]
            gap = float(row.max() - row[t])
            assert gap <= 0.03 * (1 + float(row.abs().max())), (
                f"prompt {b}, step {i}: graph decode chose token {t}, {gap:.4f} below the argmax "
                f"{int(row.argmax())} of the prefill logits")

    # A second call of the same bucket replays the graph: no new capture.
    lmmrt.generate(model, prompt_ids, images, max_new_tokens=NEW_TOKENS, ignore_eos=True)
    assert len(captured) == n_xattn, "the second call captured the decode step again instead of replaying it"
