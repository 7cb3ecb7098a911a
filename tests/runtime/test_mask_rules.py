"""The mask rules of flamingo.md §4.1: which media each text token sees.

`media_ordinals` is checked against transformers' IDEFICS processor (reset after EOS) and the
OpenFlamingo cumsum rule; the masked cross-attention op is checked against a dense (T x keys)
mask built straight from the rules, on random inputs."""

from __future__ import annotations

import random

import pytest
import torch

from lmmrt.kernels.masked_cross_attention import masked_cross_attention
from lmmrt.runtime.batch import media_ordinals

IMG, EOS = 7, 2


def _random_ids(rng, n):
    return [rng.choice([IMG, EOS, 3, 4, 5, 6, 8, 9]) for _ in range(n)]


def test_ordinals_match_transformers_idefics_processor():
    from transformers.models.idefics.processing_idefics import image_attention_mask_for_packed_input_ids

    class Tok:
        eos_token_id = EOS

        def convert_tokens_to_ids(self, _):
            return IMG

    rng = random.Random(0)
    for n in (1, 2, 19, 97):
        for _ in range(20):
            ids = _random_ids(rng, n)
            ref, _ = image_attention_mask_for_packed_input_ids(torch.tensor([ids]), Tok(), "pt")
            # the processor's 0-based media index, -1 for none  ==  our 1-based ordinal, 0 for none
            assert media_ordinals(ids, IMG, EOS, reset_after_eos=True) == (ref[0] + 1).tolist(), ids


def test_ordinals_openflamingo_rule_is_marker_cumsum():
    rng = random.Random(1)
    for _ in range(50):
        ids = _random_ids(rng, 40)
        expect = torch.cumsum(torch.tensor([t == IMG for t in ids]), 0).tolist()
        assert media_ordinals(ids, IMG, EOS, reset_after_eos=False) == expect


def test_marker_attends_to_its_own_media_and_eos_keeps_media():
    ids = [1, IMG, 5, EOS, 6, IMG, EOS, 9]
    assert media_ordinals(ids, IMG, EOS, True) == [0, 1, 1, 1, 0, 2, 2, 0]


def _dense_rule_attention(q, k, v, text_time, starts, counts, mode):
    """Dense mask straight from §4.1, one row at a time, float64."""
    B, T, H, D = q.shape
    L = k.shape[1]
    out = torch.zeros(B, T, H, D, dtype=torch.float64)
    for b in range(B):
        keys = k[starts[b]: starts[b] + counts[b]].reshape(-1, H, D).double()
        vals = v[starts[b]: starts[b] + counts[b]].reshape(-1, H, D).double()
        media_of_key = torch.arange(counts[b] * L) // L + 1
        for t in range(T):
            tt = int(text_time[b, t])
            if mode == "immediate":
                allowed = media_of_key == tt
            else:
                allowed = media_of_key <= tt
            if tt == 0:
                if mode == "immediate" or counts[b] == 0:
                    continue  # zero row
                allowed = torch.ones_like(media_of_key, dtype=torch.bool)
                scores = torch.zeros(H, counts[b] * L, dtype=torch.float64)  # uniform (OpenFlamingo)
            else:
                scores = torch.einsum("hd,khd->hk", q[b, t].double(), keys) * D**-0.5
            scores = scores.masked_fill(~allowed[None], float("-inf"))
            out[b, t] = torch.einsum("hk,khd->hd", torch.softmax(scores, -1), vals)
    return out


@pytest.mark.parametrize("mode", ["immediate", "cumulative"])
def test_masked_cross_attention_matches_dense_rule(mode):
    g = torch.Generator().manual_seed(3)
    counts = [3, 0, 1, 2]
    starts = [0, 3, 3, 4]
    B, T, H, D, L = len(counts), 19, 2, 16, 5
    q = torch.randn(B, T, H, D, generator=g)
    k = torch.randn(sum(counts), L, H, D, generator=g)
    v = torch.randn(sum(counts), L, H, D, generator=g)
    tt = torch.stack([torch.randint(0, c + 1, (T,), generator=g) for c in counts]).to(torch.int32)
    got = masked_cross_attention(q, k, v, tt, torch.tensor(starts, dtype=torch.int32),
                                 torch.tensor(counts, dtype=torch.int32), mode=mode, backend="torch")
    ref = _dense_rule_attention(q, k, v, tt, starts, counts, mode)
    torch.testing.assert_close(got.double(), ref, rtol=1e-5, atol=1e-5)
    if mode == "immediate":
        assert (got[tt == 0] == 0).all()
