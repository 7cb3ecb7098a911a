"""Llama 3.2 Vision (Mllama) prompts: token ids, each token's image span, and the tiled pixels.

- Text: tokenized without the tokenizer's post-processor, then given one BOS where the prompt
  has none, after any leading <|image|> markers: what transformers' MllamaProcessor builds
  (build_string_from_input) when called with add_special_tokens=False, as Meta's chat usage does.
  A prompt from the chat template already starts with <|begin_of_text|> and is left as it is (no
  second BOS, which the processor's default call would add).
- Image spans (transformers' get_cross_attention_token_mask): image i is seen by the tokens from its
  marker up to the next marker; a run of consecutive markers shares the span after the run's last
  marker. Per token: `text_time` = the markers at or before it (the marker itself counts) and
  `text_time_first` = the first image of the run of consecutive markers holding marker text_time;
  the token sees images text_time_first..text_time (1-based), each image's valid tiles only.
- Images: any aspect ratio, tiled by lmmrt.runtime.mllama_image (transformers' MllamaImageProcessor).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


def encode_mllama_prompt(tokenizer, text: str, cfg) -> list[int]:
    """A text prompt -> token ids with exactly the BOS the prompt writes, else one after its leading markers."""
    ids = tokenizer.encode(text, add_special_tokens=False)
    return with_bos(ids, cfg.image_token_id, cfg.bos_token_id)


def with_bos(ids: list[int], marker: int, bos: int | None) -> list[int]:
    """ids with a BOS inserted after the leading markers when they hold none (markers stay first, as
    transformers' processor writes "<|image|><|begin_of_text|>..." for a prompt opening with an image)."""
    if bos is None or bos in ids:
        return ids
    lead = 0
    while lead < len(ids) and ids[lead] == marker:
        lead += 1
    return ids[:lead] + [bos] + ids[lead:]


def image_spans(ids: list[int], marker: int) -> tuple[list[int], list[int]]:
    """(text_time, text_time_first) of each token: the images it sees are text_time_first..text_time
    (1-based; text_time 0: none yet)."""
    text_time, first = [], []
    count, run_start, prev_marker = 0, 0, False
    for t in ids:
        if t == marker:
            count += 1
            if not prev_marker:  # a marker after text opens a new run
                run_start = count
        prev_marker = t == marker
        text_time.append(count)
        first.append(run_start)
    return text_time, first


@dataclass
class MllamaMedia:
    """The batch's images, in batch order: pixels one (max_num_tiles, 3, S, S) tensor each (padding
    tiles zero), aspect_ratio_ids (N,) long, aspect_ratio_mask (N, max_num_tiles) long and media_len
    (N,) int32, the number of cross-attention keys of each image's valid tiles."""

    pixels: list[torch.Tensor]
    aspect_ratio_ids: torch.Tensor
    aspect_ratio_mask: torch.Tensor
    media_len: torch.Tensor


def mllama_media(per_prompt_images: list[list], vcfg, device) -> MllamaMedia:
    """Tile every image of the batch; errors name images[i][j]. Video clips are refused (Mllama
    takes still images only)."""
    from lmmrt.runtime.mllama_image import preprocess_mllama_images

    images, names = [], []
    for i, imgs in enumerate(per_prompt_images):
        for j, img in enumerate(imgs):
            if getattr(img, "frames", None) is not None:
                raise ValueError(f"images[{i}][{j}]: Llama 3.2 Vision takes images, not video clips: pass the "
                                 "frames you want as separate images, one <|image|> marker each")
            images.append(img)
            names.append(f"images[{i}][{j}]")
    if not images:
        tiles = vcfg.max_num_tiles
        return MllamaMedia([], torch.zeros(0, dtype=torch.long, device=device),
                           torch.zeros(0, tiles, dtype=torch.long, device=device),
                           torch.zeros(0, dtype=torch.int32, device=device))
    # one call for the whole batch: on a GPU the images of one size are resized together
    px = preprocess_mllama_images(images, vcfg, device, where=names)
    per_tile = vcfg.tile_tokens  # the keys of one tile: its patches and the class token
    return MllamaMedia(list(px.pixels.unbind(0)), px.aspect_ratio_ids.to(device), px.aspect_ratio_mask.to(device),
                       torch.tensor([n * per_tile for n in px.num_tiles], dtype=torch.int32, device=device))
