"""Turning user inputs (prompts, images) into one model batch: token ids left-padded to a common
length, each token's media ordinal (`text_time`, flamingo.md §4.1), and the media pixels.

Every check on user input happens here, before anything reaches a kernel, and each error names
the prompt and what is wrong.
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass

import numpy as np
import torch

from lmmrt.runtime.mllama_prompts import encode_mllama_prompt, image_spans, mllama_media
from lmmrt.runtime.processor import preprocess_images
from lmmrt.runtime.splice_prompts import encode_prompt


@dataclass
class Batch:
    tokens: torch.Tensor  # (B, T) long, left-padded with pad_id
    pad: torch.Tensor  # (B,) long, left padding of each row
    lengths: list[int]  # prompt length of each row
    text_time: torch.Tensor  # (B, T) int32 media ordinal, 0 = no media
    media: list[torch.Tensor]  # one (F, 3, S, S) pixel tensor per media item, in batch order
    media_start: torch.Tensor  # (B,) int32
    media_count: torch.Tensor  # (B,) int32
    media_time: torch.Tensor  # (N,) 0-based index of each media item in its prompt
    # Mllama only (None for other families): media are (max_num_tiles, 3, S, S) tiled images
    aspect_ratio_ids: torch.Tensor | None = None  # (N,) long, 1-based into supported_aspect_ratios
    aspect_ratio_mask: torch.Tensor | None = None  # (N, max_num_tiles) long, 1 = a real tile
    media_len: torch.Tensor | None = None  # (N,) int32 cross-attention keys of each image's real tiles
    text_time_first: torch.Tensor | None = None  # (B, T) int32 first image each token sees (see mllama_prompts)

    @property
    def size(self) -> int:
        return self.tokens.shape[0]


def media_ordinals(ids: list[int], image_token_id: int, eos_token_id: int | None, reset_after_eos: bool) -> list[int]:
    """text_time of each token: the number of media markers at or before it (the marker itself
    counts). With `reset_after_eos` (IDEFICS) a token after an end-of-sequence token sees no media
    until the next marker; the end-of-sequence token itself still does."""
    out, count, seen_eos = [], 0, False
    for t in ids:
        if t == image_token_id:
            count += 1
            seen_eos = False
        out.append(0 if seen_eos else count)
        if reset_after_eos and eos_token_id is not None and t == eos_token_id:
            seen_eos = True
    return out


def _is_token_id(t) -> bool:
    return isinstance(t, numbers.Integral) and not isinstance(t, bool)


def _token_ids(p, where: str) -> list[int]:
    """A list of token ids (ints, numpy integers) -> Python ints; bools and floats are refused."""
    bad = next((i for i, t in enumerate(p) if not _is_token_id(t)), None)
    if bad is not None:
        t = p[bad]
        raise TypeError(f"{where}[{bad}] must be a token id (an int), got {t!r} ({type(t).__name__})")
    return [int(t) for t in p]


def _integer_dtype(x) -> bool:
    if isinstance(x, torch.Tensor):
        return not (x.is_floating_point() or x.is_complex() or x.dtype == torch.bool)
    return x.dtype.kind in "iu"


def _array_prompt(p, where: str) -> list:
    if p.ndim != 1 or not _integer_dtype(p):
        raise TypeError(f"{where}: a token-id tensor or array in a list of prompts must be 1-D with an integer "
                        f"dtype, got shape {tuple(p.shape)} and dtype {p.dtype}")
    return p.tolist()


def normalize_prompts(prompts) -> list:
    """A string, a list of strings, a list of token ids (one tokenized prompt), a list of token-id
    lists (or 1-D integer tensors / arrays), or a 1-D / 2-D integer tensor or array of token ids.
    Token ids come back as Python ints."""
    if isinstance(prompts, str):
        return [prompts]
    if isinstance(prompts, (torch.Tensor, np.ndarray)):
        if prompts.ndim not in (1, 2) or not _integer_dtype(prompts):
            raise TypeError(f"a token-id tensor or array must be 1-D or 2-D with an integer dtype, got shape "
                            f"{tuple(prompts.shape)} and dtype {prompts.dtype}")
        prompts = prompts.tolist() if prompts.ndim == 2 else [prompts.tolist()]
    if not isinstance(prompts, (list, tuple)):
        raise TypeError(f"prompts must be a string, a list of strings or a list of token-id lists, "
                        f"got {type(prompts).__name__}")
    if len(prompts) == 0:
        raise ValueError("prompts is empty")
    prompts = [_array_prompt(p, f"prompts[{i}]") if isinstance(p, (torch.Tensor, np.ndarray)) and p.ndim else p
               for i, p in enumerate(prompts)]  # a 1-D token-id array or tensor per prompt: a list of ids
    if not isinstance(prompts[0], (str, list, tuple)):  # one tokenized prompt
        return [_token_ids(prompts, "prompts")]
    for i, p in enumerate(prompts):
        if not isinstance(p, (str, list, tuple)):
            raise TypeError(f"prompts[{i}] must be a string or a list of token ids, got {type(p).__name__}")
    return [p if isinstance(p, str) else _token_ids(p, f"prompts[{i}]") for i, p in enumerate(prompts)]


def _nesting_example(markers: list[int]) -> str:
    return "[" + ", ".join("[" + ", ".join(["img"] * k) + "]" for k in markers) + "]"


def normalize_images(images, markers: list[int]) -> list[list]:
    """The media items of each prompt. `markers`: the number of media markers of each prompt (for
    the error message). For one prompt, images may be a list of media items (or one item); for
    several, it must be a list with one list of media items per prompt: no guessing which prompt
    a bare item belongs to."""
    n = len(markers)
    if images is None:
        return [[] for _ in range(n)]
    if not isinstance(images, (list, tuple)):
        images = [images]
    nested = [isinstance(x, (list, tuple)) for x in images]
    if n == 1 and not any(nested):
        return [list(images)]
    if len(images) == n and all(nested):
        return [list(per) for per in images]
    if all(nested):
        got = f"{len(images)} lists"
    elif any(nested):
        got = "a list that mixes lists and media items"
    else:
        got = f"a flat list of {len(images)} media item(s)"
    raise ValueError(f"images must be one list per prompt: {_nesting_example(markers)} for {n} prompt(s) "
                     f"(one list of images per prompt, [] for a prompt without media); got {got}")


def media_item_pixels(item, vision_cfg, device, where: str) -> torch.Tensor:
    """One media item -> (F, 3, S, S). An image gives F = 1; a video clip object (anything with
    a `frames` list, see lmmrt.runtime.video) gives its F frames."""
    frames = getattr(item, "frames", None)
    if frames is not None:
        if len(frames) == 0:
            raise ValueError(f"{where}: the video clip has no frames")
        return preprocess_images(list(frames), vision_cfg, device, where=f"{where} frames")
    return preprocess_images([item], vision_cfg, device, where=where, index=False)


def expand_image_markers(text: str, cfg) -> str:
    """Write each media marker the way the checkpoint was trained to see it, e.g. IDEFICS wraps
    <image> in <fake_token_around_image>, one shared wrapper between adjacent images."""
    tpl = cfg.image_prompt_template
    if tpl == "{image}" or cfg.image_token not in text:
        return text
    pre, post = tpl.split("{image}")
    out = text.replace(cfg.image_token, pre + cfg.image_token + post)
    if pre and pre == post:
        while pre + pre in out:
            out = out.replace(pre + pre, pre)
    return out


def expand_feature_markers(ids: list[int], marker: int, n: int) -> list[int]:
    """A splice model's prompt: each image marker id becomes n of them, one per feature embedding
    the connector makes (what the checkpoint's processor does to the text)."""
    out: list[int] = []
    for t in ids:
        if t == marker:
            out.extend([marker] * n)
        else:
            out.append(t)
    return out


def _expanded_markers_hint(ids: list[int], cfg) -> str:
    """Why a splice prompt may have too many markers: a processor's output, one per feature."""
    run = longest = 0
    for t in ids:
        run = run + 1 if t == cfg.image_token_id else 0
        longest = max(longest, run)
    if longest < 2:
        return ""
    return (f"; {longest} of them stand in a row, as markers a processor has already expanded do: write one "
            f"marker per image (lmmrt expands each to the {cfg.media_tokens} feature positions itself)")


def encode_text_prompt(model, text: str) -> list[int]:
    """A text prompt's token ids as the family writes it: media markers expanded by the checkpoint's
    template (IDEFICS' wrappers), Mllama's BOS rule, a splice family's marker encoding. A splice
    model's markers are expanded to feature positions later (expand_feature_markers)."""
    cfg = model.config
    if cfg.family == "mllama":
        return encode_mllama_prompt(model.tokenizer, text, cfg)
    return encode_prompt(model.tokenizer, expand_image_markers(text, cfg), cfg)


def build_batch(model, prompts, images, *, max_new_tokens: int = 0) -> Batch:
    cfg = model.config
    prompts = normalize_prompts(prompts)
    ids_list: list[list[int]] = []
    for i, p in enumerate(prompts):
        if isinstance(p, str):
            if model.tokenizer is None:
                raise ValueError("this model has no tokenizer (no tokenizer.json in its directory): put the "
                                 "checkpoint's tokenizer.json there, or pass prompts as lists of token ids "
                                 "(Python API)")
            ids = encode_text_prompt(model, p)
        else:
            ids = p
        if len(ids) == 0:
            raise ValueError(f"prompt {i} is empty")
        vocab = cfg.decoder.vocab_size
        bad = [t for t in ids if not 0 <= t < vocab]
        if bad:
            raise ValueError(f"prompt {i} has token ids outside the vocabulary [0, {vocab}): {bad[:5]}")
        ids_list.append(ids)

    # one marker per image as written; a splice model's markers then become feature positions
    markers = [ids.count(cfg.image_token_id) for ids in ids_list]
    splice = cfg.media_feed == "splice"
    # the marker count is checked before the context: processor-expanded markers are named as such,
    # not reported as a prompt too long
    per_prompt_images = normalize_images(images, markers)
    for i, (ids, imgs) in enumerate(zip(ids_list, per_prompt_images)):
        if markers[i] != len(imgs):
            raise ValueError(f"prompt {i} has {markers[i]} media marker(s) ({cfg.image_token!r}, id "
                             f"{cfg.image_token_id}) but {len(imgs)} image(s) were given for it"
                             f"{_expanded_markers_hint(ids, cfg) if splice else ''}")
    if splice:
        ids_list = [expand_feature_markers(ids, cfg.image_token_id, cfg.media_tokens) for ids in ids_list]
    limit = cfg.decoder.max_seq_len
    for i, ids in enumerate(ids_list):
        if len(ids) + max_new_tokens > limit:
            each = f" (each image counting {cfg.media_tokens})" if splice and markers[i] else ""
            raise ValueError(f"prompt {i} has {len(ids)} tokens{each}; with max_new_tokens={max_new_tokens} that is "
                             f"{len(ids) + max_new_tokens}, beyond the model's context of {limit} tokens")

    mllama = mllama_media(per_prompt_images, cfg.vision, model.device) if cfg.family == "mllama" else None
    media: list[torch.Tensor] = [] if mllama is None else mllama.pixels
    media_time: list[int] = []
    starts, counts, text_times, firsts = [], [], [], []
    for i, (ids, imgs) in enumerate(zip(ids_list, per_prompt_images)):
        starts.append(sum(counts))
        counts.append(len(imgs))
        for j, img in enumerate(imgs):
            if mllama is None:
                media.append(media_item_pixels(img, cfg.vision, model.device, where=f"images[{i}][{j}]"))
            media_time.append(j)
        if mllama is not None:  # each token's span of images (lmmrt.runtime.mllama_prompts)
            tt, first = image_spans(ids, cfg.image_token_id)
            text_times.append(tt)
            firsts.append(first)
        else:  # media ordinals drive cross-attention masks; a splice model has none
            text_times.append([0] * len(ids) if splice else
                              media_ordinals(ids, cfg.image_token_id, cfg.eos_token_id, cfg.reset_media_after_eos))

    B, T = len(ids_list), max(len(x) for x in ids_list)
    pad_id = cfg.pad_token_id if cfg.pad_token_id is not None else 0
    tokens = torch.full((B, T), pad_id, dtype=torch.long)
    tt = torch.zeros((B, T), dtype=torch.int32)
    pad = torch.zeros(B, dtype=torch.long)
    first = torch.zeros((B, T), dtype=torch.int32) if mllama is not None else None
    for b, (ids, t) in enumerate(zip(ids_list, text_times)):
        p = T - len(ids)
        pad[b] = p
        tokens[b, p:] = torch.tensor(ids)
        tt[b, p:] = torch.tensor(t, dtype=torch.int32)
        if first is not None:
            first[b, p:] = torch.tensor(firsts[b], dtype=torch.int32)
    dev = model.device
    batch = Batch(
        tokens=tokens.to(dev), pad=pad.to(dev), lengths=[len(x) for x in ids_list], text_time=tt.to(dev),
        media=media, media_start=torch.tensor(starts, dtype=torch.int32, device=dev),
        media_count=torch.tensor(counts, dtype=torch.int32, device=dev),
        media_time=torch.tensor(media_time, dtype=torch.long, device=dev),
    )
    if mllama is not None:
        batch.aspect_ratio_ids, batch.aspect_ratio_mask = mllama.aspect_ratio_ids, mllama.aspect_ratio_mask
        batch.media_len, batch.text_time_first = mllama.media_len, first.to(dev)
    return batch
