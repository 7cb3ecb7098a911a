"""A Llama-style test tokenizer: SentencePiece '▁' spaces, byte fallback, a leading-space strip."""

from __future__ import annotations

from lmmrt.runtime.tokenizer import Tokenizer

WORD_PIECES = ["▁", "▁a", "a", "b", "▁the", "ne", "x", "▁€", "y", "▁S"]
SPECIAL_IDS = [0, 1, 2]  # <unk>, <s>, </s>
BYTE_IDS = [3 + b for b in range(256)]  # <0x00> .. <0xFF>


def byte_fallback_tokenizer() -> Tokenizer:
    """Ids: SPECIAL_IDS, then BYTE_IDS, then WORD_PIECES in order."""
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    vocab.update({f"<0x{b:02X}>": 3 + b for b in range(256)})
    for piece in WORD_PIECES:
        vocab[piece] = len(vocab)
    tok = HFTokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>", byte_fallback=True))
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    tok.add_special_tokens(["<unk>", "<s>", "</s>"])
    return Tokenizer(tok)
