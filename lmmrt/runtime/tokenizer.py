"""Text <-> token ids, with the checkpoint's tokenizer.json (HF `tokenizers`)."""

from __future__ import annotations

from pathlib import Path

from lmmrt.errors import CheckpointError
from lmmrt.runtime.safetensors_file import why_missing


class Tokenizer:
    def __init__(self, tok, *, add_bos: bool = True):
        self._tok = tok
        self.add_bos = add_bos

    @classmethod
    def from_file(cls, path: str | Path) -> Tokenizer:
        """A tokenizer.json; a missing, empty, unreadable or malformed file is one CheckpointError
        naming it (the tokenizers library's own message names no file)."""
        from tokenizers import Tokenizer as HFTokenizer

        path = Path(path)
        reason = why_missing(path)
        if reason is not None:
            raise CheckpointError(f"cannot read the tokenizer: {reason}")
        if path.is_dir():
            raise CheckpointError(f"{path} is a directory, not a tokenizer.json file")
        try:
            data = path.read_bytes()
        except OSError as e:
            raise CheckpointError(f"cannot read {path}: {e.strerror or e}") from None
        if not data.strip():
            raise CheckpointError(f"{path} is empty (expected a Hugging Face tokenizers JSON file)")
        try:
            return cls(HFTokenizer.from_str(data.decode("utf-8")))
        except Exception as e:  # tokenizers raises a bare Exception for malformed JSON or a bad model
            raise CheckpointError(f"{path} is not a valid tokenizer.json (Hugging Face tokenizers format): "
                                  f"{e}") from None

    def encode(self, text: str, *, add_special_tokens: bool | None = None) -> list[int]:
        """add_special_tokens: apply the post-processor (BOS, ...); default: the tokenizer's add_bos."""
        special = self.add_bos if add_special_tokens is None else add_special_tokens
        return self._tok.encode(text, add_special_tokens=special).ids

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        """Generated text leaves out special tokens (<s>, <image>, ...) unless asked for."""
        return self._tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def token_to_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)

    def save(self, path: str | Path) -> None:
        self._tok.save(str(path))


def check_image_token(tok: Tokenizer, cfg, *, tokenizer_path, config_path) -> None:
    """The config's image marker id must be the token the tokenizer makes of the marker text: else every
    prompt written with the marker holds no image position, found only at generate ("0 media markers").
    MiniGPT-4 is the exception: its prompts are split at the marker text, whose id is the tokenizer's <unk>
    (lmmrt.runtime.splice_prompts)."""
    if cfg.family == "minigpt4":
        return
    tid = tok.token_to_id(cfg.image_token)
    if tid is None:
        raise CheckpointError(f"{config_path} image_token_id {cfg.image_token_id}, but {tokenizer_path} has no "
                              f"{cfg.image_token!r} token")
    if tid != cfg.image_token_id:
        raise CheckpointError(f"{config_path} image_token_id {cfg.image_token_id}, but {tokenizer_path} maps "
                              f"{cfg.image_token!r} to {tid}")
