"""The prefill steps of the serving engine: whole prompts of several newcomers in one forward, or
one chunk of one request's prompt.

Whole prompts: the newcomers' prompts left-padded into one batch and run as lmmrt.generate runs a
batch's prompts (runtime.decode_plan's prefill context: positions from each row's first token,
padding masked) into a scratch cache, then each row's K/V copied into its slot row from position
0. A chunk: positions [start, end) of a request's row, attending to the row's keys [0, end)
causally, so a long prompt goes in pieces between decode steps. Both run the model's own forward;
a splice model's chunk takes the feature rows of its own markers (embed_with_features), an Mllama
chunk of one token is checked for text before the first image as its forward does for longer ones.
"""

from __future__ import annotations

import torch

from lmmrt.models.mllama_xattn import tokens_before_media
from lmmrt.models.xattn import MediaContext
from lmmrt.runtime.batch import Batch
from lmmrt.runtime.decode_plan import DecodePlan
from lmmrt.runtime.kv_cache import KVCache


def prefill_prompts(model, cache, seqs: list) -> torch.Tensor:
    """The whole prompts of `seqs` (none prefilled yet) in one forward -> logits (len(seqs), V) of
    each prompt's last token; each prompt's K/V end up in positions [0, its length) of its row."""
    module, cfg = model.module, model.config
    dev = seqs[0].tokens.device
    B, T = len(seqs), max(s.prompt_len for s in seqs)
    pad = [T - s.prompt_len for s in seqs]
    tokens = torch.full((B, T), cfg.pad_token_id or 0, dtype=torch.long, device=dev)
    text_time = torch.zeros((B, T), dtype=torch.int32, device=dev)
    mllama = seqs[0].text_time_first is not None
    first = torch.zeros((B, T), dtype=torch.int32, device=dev) if mllama else None
    for b, s in enumerate(seqs):
        tokens[b, pad[b]:] = s.tokens[0]
        text_time[b, pad[b]:] = s.text_time[0]
        if mllama:
            first[b, pad[b]:] = s.text_time_first[0]
    starts, n = [], 0
    for s in seqs:
        starts.append(n)
        n += s.media_count_int
    batch = Batch(tokens=tokens, pad=torch.tensor(pad, device=dev), lengths=[s.prompt_len for s in seqs],
                  text_time=text_time, media=[], media_start=torch.tensor(starts, dtype=torch.int32, device=dev),
                  media_count=torch.tensor([s.media_count_int for s in seqs], dtype=torch.int32, device=dev),
                  media_time=torch.zeros(0, dtype=torch.long, device=dev))
    ctx = DecodePlan(module, batch).prefill_context(T)
    with_media = [s for s in seqs if s.media_kv]
    if cfg.media_feed == "splice":  # the features of every marker, in row-major order
        feats = [s.features for s in seqs if s.features is not None]
        kv = [(torch.cat(feats), torch.cat(feats))] if feats else []
    else:
        kv = [(torch.cat([s.media_kv[j][0] for s in with_media]), torch.cat([s.media_kv[j][1] for s in with_media]))
              for j in range(len(with_media[0].media_kv))] if with_media else []
    media = MediaContext(kv=kv, text_time=text_time, media_start=batch.media_start, media_count=batch.media_count,
                         any_media=bool(kv), text_time_first=first,
                         media_len=torch.cat([s.media_len for s in with_media]) if mllama and with_media else None)
    scratch = KVCache.allocate(cfg.decoder, B, T, model.dtype, dev)
    logits = module(tokens, ctx, scratch, media, logits_for="last")
    for b, s in enumerate(seqs):
        cache.cache.k[:, s.slot, :, :s.prompt_len] = scratch.k[:, b, :, pad[b]:]
        cache.cache.v[:, s.slot, :, :s.prompt_len] = scratch.v[:, b, :, pad[b]:]
    return logits


def prefill_chunk(model, cache, seq, end: int) -> torch.Tensor:
    """Run seq's prompt positions [seq.prefilled, end) in its cache row -> logits (1, V) of the last."""
    module = model.module
    start = seq.prefilled
    dev = seq.tokens.device
    tokens = seq.tokens[:, start:end]
    positions = torch.arange(start, end, device=dev)[None]
    if start == 0:
        ctx = module.decoder.context(positions, 0, end, None, causal=True)
    else:  # the chunk's queries see the row's earlier keys and themselves causally
        mask = torch.arange(end, device=dev)[None, :] <= positions[0, :, None]
        ctx = module.decoder.context(positions, start, end, mask[None, None])
    row = cache.row(seq.slot)
    if seq.features is not None:  # a splice model: this chunk's markers take their feature rows
        marker = model.config.image_token_id
        before = seq.ids[:start].count(marker)
        here = seq.ids[start:end].count(marker)
        x = (module.embed_with_features(tokens, seq.features[before:before + here]) if here
             else module.decoder.embed(tokens))
        media = MediaContext(kv=[], text_time=seq.text_time[:, start:end], media_start=seq.media_start,
                             media_count=seq.media_count, any_media=False)
        return module.run_decoder(x, ctx, row, media, "last")
    first = seq.text_time_first
    media = MediaContext(kv=seq.media_kv, text_time=seq.text_time[:, start:end], media_start=seq.media_start,
                         media_count=seq.media_count, any_media=bool(seq.media_kv),
                         text_time_first=None if first is None else first[:, start:end], media_len=seq.media_len)
    if first is not None:  # Mllama: its forward looks for text before the first image in prompts of 2+
        # tokens only; a chunk of one token may be such text too
        return module.run_decoder(module.decoder.embed(tokens), ctx, row, media, "last",
                                  before_media=tokens_before_media(media))
    return module(tokens, ctx, row, media, logits_for="last")
