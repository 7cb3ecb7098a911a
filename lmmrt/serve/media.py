"""A request's media in the serving engine: their content keys (at submit) and, at admission, their
encodings from the media cache or the model (vision encoder + perceiver / connector, then each
gated block's K/V), packed the way the request's prefill and decode steps read them."""

from __future__ import annotations

import torch

from lmmrt.serve.media_cache import MediaCache, MediaEntry, media_key


def media_keys(batch, model_tag: str, *, media_time_matters: bool) -> list[str]:
    """The content key of each media item of a one-request batch (see media_cache.media_key):
    what its encoding depends on besides its pixels is its place in the prompt when the perceiver
    has media-time embeddings, and for Mllama the tiles' aspect ratio."""
    keys = []
    for j, px in enumerate(batch.media):
        aspect = "" if batch.aspect_ratio_ids is None else f"aspect {int(batch.aspect_ratio_ids[j])}"
        keys.append(media_key(px, model_tag, f"{j if media_time_matters else 0}|{aspect}"))
    return keys


def attach_media(model, cache: MediaCache, s) -> None:
    """s's media from the cache, the missing ones encoded (one launch per frame count) and kept:
    s.media_kv (per block, packed in prompt order) for cross-attention, s.features (every marker's
    feature row in order) for a splice model. s's pixels are dropped."""
    if not s.media_keys:
        return
    module = model.module
    entries = [cache.get(k) for k in s.media_keys]
    missing = [j for j, e in enumerate(entries) if e is None]
    by_frames: dict[int, list[int]] = {}
    for j in missing:
        by_frames.setdefault(s.batch.media[j].shape[0], []).append(j)
    tiles = s.batch.aspect_ratio_ids is not None  # Mllama: tiled images and their aspect ratios
    for idx in by_frames.values():
        px = torch.stack([s.batch.media[j] for j in idx]).to(model.device)
        kw = dict(aspect_ratio_ids=s.batch.aspect_ratio_ids[idx],
                  aspect_ratio_mask=s.batch.aspect_ratio_mask[idx]) if tiles else {}
        latents = module.encode_media(px, s.batch.media_time[idx], **kw)
        for i, j in enumerate(idx):
            # a slice of a bigger batch would keep the whole batch alive in the cache
            lat = latents[i:i + 1].clone() if len(idx) > 1 else latents
            entries[j] = MediaEntry(latents=lat, kv=module.project_media(lat))
            cache.put(s.media_keys[j], entries[j])
    s.batch.media = []  # the pixels are not needed any more
    if model.config.media_feed == "splice":
        s.features = torch.cat([e.latents for e in entries]).flatten(0, 1)
    elif len(entries) == 1:  # the cache's own tensors, shared read-only
        s.media_kv = list(entries[0].kv)
    else:
        s.media_kv = [(torch.cat([e.kv[j][0] for e in entries]), torch.cat([e.kv[j][1] for e in entries]))
                      for j in range(len(entries[0].kv))]
