"""Text prompt -> token ids for the splice families whose processors place images their own way;
one marker id per image, which the batch builder then expands to the connector's feature count.

- blip2: transformers' Blip2Processor puts the image's query tokens before the tokenized text,
  BOS included. A prompt written "<image>Question: ..." tokenizes as [BOS, <image>, ...]: the
  markers right after BOS move before it.
- minigpt4: MiniGPT-4's get_context_emb splits the prompt at "<ImageHere>", tokenizes each piece
  on its own, with BOS on the first piece only, and puts one image between consecutive pieces.
  Its marker id is the tokenizer's <unk>, so text that itself tokenizes to <unk> (an unknown word,
  a literal "<unk>") cannot be told from an image slot: such a prompt is refused, naming the text.
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
        piece_ids = tokenizer.encode(piece, add_special_tokens=i == 0)
        if marker in piece_ids:
            raise ValueError(f"the prompt text {piece.strip()!r} has a token the tokenizer reads as its image "
                             f"marker id {marker} (unknown to the vocabulary, or the marker token itself); "
                             f"only {marker_text!r} may stand for an image: reword it")
        ids += piece_ids
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
