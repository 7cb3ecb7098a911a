"""Text prompt -> token ids for the splice families whose processors place images their own way;
one marker id per image, which the batch builder then expands to the connector's feature count.

- blip2: transformers' Blip2Processor puts the image's query tokens before the tokenized text,
  BOS included. A prompt written "<image>Question: ..." tokenizes as [BOS, <image>, ...]: the
  markers right after BOS move before it.
- minigpt4: MiniGPT-4's get_context_emb splits the prompt at "<ImageHere>", tokenizes each piece
  on its own, with BOS on the first piece only, and puts one image between consecutive pieces.
Other families tokenize the prompt as it is.
"""

from __future__ import annotations


def _markers_before_bos(ids: list[int], marker: int, bos: int | None) -> list[int]:
    if bos is None or not ids or ids[0] != bos:
        return ids
    n = 0
    while 1 + n < len(ids) and ids[1 + n] == marker:
        n += 1
    return [marker] * n + [bos] + ids[1 + n:] if n else ids


def _pieces(tokenizer, text: str, marker_text: str, marker: int) -> list[int]:
    ids: list[int] = []
    pieces = text.split(marker_text)
    for i, piece in enumerate(pieces):
        ids += tokenizer.encode(piece, add_special_tokens=i == 0)
        if i < len(pieces) - 1:
            ids.append(marker)
    return ids


def encode_prompt(tokenizer, text: str, cfg) -> list[int]:
    """A text prompt (image markers already in the checkpoint's form) -> token ids."""
    if cfg.family == "minigpt4":
        return _pieces(tokenizer, text, cfg.image_token, cfg.image_token_id)
    ids = tokenizer.encode(text)
    if cfg.family == "blip2":
        return _markers_before_bos(ids, cfg.image_token_id, cfg.bos_token_id)
    return ids
