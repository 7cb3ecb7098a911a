"""Mllama prompt rules against transformers' MllamaProcessor: which images each token sees
(get_cross_attention_token_mask), and where the BOS goes (build_string_from_input)."""

from __future__ import annotations

import random

import pytest

from lmmrt.runtime.mllama_prompts import image_spans, with_bos

MARKER, BOS = 90, 1


def _hf_visible(ids: list[int]) -> list[set[int]]:
    """transformers' dense cross-attention mask, one tile per image -> per token the 1-based images it sees."""
    from transformers.models.mllama.processing_mllama import (
        convert_sparse_cross_attention_mask_to_dense,
        get_cross_attention_token_mask,
    )

    sparse = get_cross_attention_token_mask(ids, MARKER)
    if not sparse:
        return [set() for _ in ids]
    dense = convert_sparse_cross_attention_mask_to_dense([sparse], [[1] * len(sparse)], 1, len(ids))
    return [{i + 1 for i in range(dense.shape[2]) if dense[0, p, i, 0]} for p in range(len(ids))]


def _ours(ids: list[int]) -> list[set[int]]:
    tt, first = image_spans(ids, MARKER)
    return [set(range(f, t + 1)) if t else set() for t, f in zip(tt, first)]


@pytest.mark.parametrize("ids", [
    [BOS, 5, 6],  # no image
    [MARKER, BOS, 5, 6],  # one image first
    [BOS, 5, MARKER, 6, 7],  # text before the image
    [BOS, MARKER, MARKER, 5, 6],  # two consecutive markers share the text after them
    [BOS, MARKER, 5, MARKER, 6],  # text between two images
    [MARKER, MARKER, 5, MARKER, MARKER, MARKER, 6, MARKER],  # runs, and a marker last
])
def test_image_spans_match_transformers(ids):
    assert _ours(ids) == _hf_visible(ids)


def test_image_spans_match_transformers_on_random_prompts():
    rng = random.Random(0)
    for _ in range(200):
        ids = [MARKER if rng.random() < 0.35 else rng.randrange(3, 80) for _ in range(rng.randrange(1, 17))]
        assert _ours(ids) == _hf_visible(ids), ids


@pytest.mark.parametrize("ids, want", [
    ([5, 6], [BOS, 5, 6]),
    ([MARKER, 5], [MARKER, BOS, 5]),  # "<|image|><|begin_of_text|>..." as the processor writes it
    ([MARKER, MARKER, 5], [MARKER, MARKER, BOS, 5]),
    ([5, MARKER, 6], [BOS, 5, MARKER, 6]),
    ([BOS, MARKER, 5], [BOS, MARKER, 5]),  # a chat-template prompt: its own BOS, no second one
    ([MARKER, BOS, 5], [MARKER, BOS, 5]),
])
def test_bos_placed_as_the_processor_does(ids, want):
    assert with_bos(ids, MARKER, BOS) == want
    assert with_bos(ids, MARKER, None) == ids
