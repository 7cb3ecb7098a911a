"""The decode path that gathers each row's media keys once per batch (gather_media / GatheredMedia)
with Mllama's options: the "range" rule, media_len (valid keys per media item) and grouped-query K/V,
against the masked cross-attention reference; MediaContext.select keeps the new fields."""

from __future__ import annotations

import pytest
import torch

from lmmrt.kernels.masked_cross_attention import masked_cross_attention_reference
from lmmrt.models.xattn import MediaContext
from lmmrt.runtime.decode_plan import gather_media


def _module(mode: str):
    class _Module:
        xattn = [None]

        class cfg:
            class xattn:
                mask_mode = mode

    return _Module


def _media(H_kv: int, dh: int, L: int, *, mllama: bool, seed: int = 0):
    """Rows: a run of 2 images then text; text after the 3rd of 3 separate images; no image; a
    decode token whose last image has all keys but one cut by media_len; a run whose images all
    have media_len 0 (sees no key)."""
    g = torch.Generator().manual_seed(seed)
    counts, times, firsts = [2, 3, 0, 1, 2], [2, 3, 0, 1, 2], [1, 3, 0, 1, 1]
    starts = [sum(counts[:b]) for b in range(len(counts))]
    N = sum(counts)
    lens = [L, 3, L, 1, 2, 1, 0, 0]
    kv = [(torch.randn(N, L, H_kv, dh, generator=g), torch.randn(N, L, H_kv, dh, generator=g)) for _ in range(2)]
    extra = dict(text_time_first=torch.tensor(firsts, dtype=torch.int32)[:, None],
                 media_len=torch.tensor(lens, dtype=torch.int32)) if mllama else {}
    return MediaContext(kv=kv, text_time=torch.tensor(times, dtype=torch.int32)[:, None],
                        media_start=torch.tensor(starts, dtype=torch.int32),
                        media_count=torch.tensor(counts, dtype=torch.int32), any_media=True, **extra)


@pytest.mark.parametrize("heads,kv_heads", [(4, 4), (4, 2), (4, 1)], ids=["mha", "gqa2", "gqa4"])
@pytest.mark.parametrize("mode", ["range", "immediate", "cumulative"])
def test_gathered_media_matches_the_masked_reference(mode, heads, kv_heads):
    dh, L = 8, 5
    media = _media(kv_heads, dh, L, mllama=True)
    if mode != "range":  # the other rules, still with media_len and grouped K/V
        media.text_time_first = None
    g = gather_media(_module(mode), media, "torch")
    q = torch.randn(len(media.text_time), 1, heads, dh, generator=torch.Generator().manual_seed(1))
    for j, (k, v) in enumerate(media.kv):
        ref = masked_cross_attention_reference(q.double(), k.double(), v.double(), media.text_time,
                                               media.media_start, media.media_count, mode=mode,
                                               text_time_first=media.text_time_first, media_len=media.media_len)
        got = g.attend(q, j)
        assert not torch.isnan(got).any()
        torch.testing.assert_close(got.double(), ref, rtol=1e-5, atol=1e-5)
    if mode == "range":
        assert (g.attend(q, 0)[[2, 4]] == 0).all()  # no image; images of no valid key


def test_context_with_text_time_first_uses_the_range_rule():
    # The model's mask_mode is not consulted when the context carries text_time_first (Mllama).
    media = _media(2, 8, 5, mllama=True)
    q = torch.randn(5, 1, 4, 8, generator=torch.Generator().manual_seed(2))
    k, v = media.kv[0]
    ref = masked_cross_attention_reference(q, k, v, media.text_time, media.media_start, media.media_count,
                                           mode="range", text_time_first=media.text_time_first,
                                           media_len=media.media_len)
    torch.testing.assert_close(gather_media(_module("immediate"), media, "torch").attend(q, 0), ref,
                               rtol=1e-5, atol=1e-5)


def test_select_keeps_the_mllama_fields():
    media = _media(2, 8, 5, mllama=True)
    media.gathered = gather_media(_module("range"), media, "torch")
    rows = torch.tensor([3, 0])
    part = media.select(rows)
    assert part.text_time_first.tolist() == [[1], [1]] and part.media_len is media.media_len
    q = torch.randn(2, 1, 4, 8, generator=torch.Generator().manual_seed(3))
    k, v = media.kv[1]
    ref = masked_cross_attention_reference(q, k, v, part.text_time, part.media_start, part.media_count,
                                           mode="range", text_time_first=part.text_time_first,
                                           media_len=part.media_len)
    torch.testing.assert_close(part.gathered.attend(q, 1), ref, rtol=1e-5, atol=1e-5)
