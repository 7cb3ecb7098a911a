"""Text <-> token ids, with the checkpoint's tokenizer.json (HF `tokenizers`)."""

from __future__ import annotations

from pathlib import Path


class Tokenizer:
    def __init__(self, tok, *, add_bos: bool = True):
        self._tok = tok
        self.add_bos = add_bos

    @classmethod
    def from_file(cls, path: str | Path) -> Tokenizer:
        from tokenizers import Tokenizer as HFTokenizer

        return cls(HFTokenizer.from_file(str(path)))

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=self.add_bos).ids

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        """Generated text leaves out special tokens (<s>, <image>, ...) unless asked for."""
        return self._tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def token_to_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)

    def save(self, path: str | Path) -> None:
        self._tok.save(str(path))
