"""From generated token ids to text: lmmrt.generate's results and its text stream.

Both come from one definition (_RowText), so stream=True yields exactly the pieces whose
concatenation is the text of stream=False. A row's text is its new tokens detokenized, without
the stop token that ended it (eos, a stop_token_ids entry or a model stop token), cut before the
first stop string. token_ids keep that final stop token.
"""

from __future__ import annotations

from lmmrt.runtime.batch import normalize_prompts
from lmmrt.runtime.generate import GenerationResult, GenerationStats, generate_steps
from lmmrt.runtime.generation_args import GenerationArgs, check_generation_args

# A piece that ends in an incomplete UTF-8 sequence (U+FFFD) waits for up to this many tokens: a
# character is at most 4 bytes, each at most one byte-fallback token.
_MAX_PENDING = 4
# The context kept before the new ids grows over ids that add no text up to this many ids.
_MAX_WINDOW = 8


class _Detok:
    """Incremental detokenization with bounded work per token (the prefix / read offsets of TGI's and
    vLLM's detokenizers). ids[prefix:read] were emitted already; each step decodes ids[prefix:] and
    emits what the new ids add to the decode of ids[prefix:read]. That context makes the new ids
    decode as they do inside the whole sequence (a SentencePiece decode strips the leading space of
    its first token, byte-fallback bytes join into one character), so the pieces add up to the
    full decode while each decode covers at most _MAX_WINDOW + _MAX_PENDING ids."""

    def __init__(self, tokenizer):
        self.tok = tokenizer
        self.ids: list[int] = []
        self.prefix = 0
        self.read = 0

    def push(self, tid: int) -> str:
        self.ids.append(tid)
        return self._advance(force=len(self.ids) - self.read >= _MAX_PENDING)

    def flush(self) -> str:
        return self._advance(force=True) if len(self.ids) > self.read else ""

    def _advance(self, force: bool) -> str:
        done = self.tok.decode(self.ids[self.prefix:self.read])
        text = self.tok.decode(self.ids[self.prefix:])
        # hold back while the new ids end mid-character
        if not force and text.endswith("\ufffd"):
            return ""
        piece = text[len(done):]
        # Ids that add no text (special tokens) do not become the whole context: a decode strips the
        # leading space of its first text, which would then be the next token's space.
        if piece or len(self.ids) - self.prefix >= _MAX_WINDOW:
            self.prefix = self.read
        self.read = len(self.ids)
        return piece


class _RowText:
    """One prompt's output: its token ids, finish reason and text, fed one token at a time. push()
    returns the text that is final (it can no longer become part of a stop string)."""

    def __init__(self, tokenizer, args: GenerationArgs):
        self.detok = _Detok(tokenizer) if tokenizer is not None else None
        self.args = args
        self.keep = max((len(s) - 1 for s in args.stop_strings), default=0)
        self.held = ""  # text that could still be the start of a stop string
        self.token_ids: list[int] = []
        self.reason: str | None = None

    def push(self, tid: int, reason: str | None) -> str:
        """tid: the row's next token; reason: generate_steps' finish reason for it (None: goes on)."""
        self.token_ids.append(tid)
        if self.detok is None:
            self.reason = reason
            return ""
        if not (reason == "stop" and tid in self.args.stop_ids):  # the stop token is not text
            self.held += self.detok.push(tid)
        return self._settle(reason)

    def finish(self) -> str:
        """The rest of the text of a row the steps ended without finishing (no new tokens)."""
        if self.detok is None:
            self.reason = "length"
            return ""
        return self._settle("length")

    def _settle(self, reason: str | None) -> str:
        if reason is not None:
            self.held += self.detok.flush()
        cut = min((self.held.index(s) for s in self.args.stop_strings if s in self.held), default=None)
        if cut is not None:
            # a stop string ends the row, even on its last allowed token
            piece, self.held, self.reason = self.held[:cut], "", "stop"
            return piece
        if reason is not None:
            piece, self.held, self.reason = self.held, "", reason
            return piece
        return self._release()

    def _release(self) -> str:
        """All of `held` but its longest tail that begins a stop string."""
        held = self.held
        cut = len(held)
        for k in range(min(self.keep, len(held)), 0, -1):
            if any(s.startswith(held[-k:]) for s in self.args.stop_strings):
                cut = len(held) - k
                break
        piece, self.held = held[:cut], held[cut:]
        return piece


def _pieces(steps, rows: list[_RowText]):
    """(row, text piece) as generate_steps produces tokens, until every row has finished."""
    try:
        for out, reasons in steps:
            for b, (tid, reason) in enumerate(zip(out, reasons)):
                if tid < 0 or rows[b].reason is not None:
                    continue
                piece = rows[b].push(tid, reason)
                if piece:
                    yield b, piece
            if all(r.reason is not None for r in rows):
                break
        for b, row in enumerate(rows):
            piece = row.finish() if row.reason is None else ""
            if piece:
                yield b, piece
    finally:
        steps.close()


def generate(model, prompts, images=None, *, stream=False, max_new_tokens=64, temperature=0.0, top_k=0,
             top_p=1.0, repetition_penalty=1.0, stop=None, stop_token_ids=None, ignore_eos=False, seed=None,
             media_latents=None, on_step=None):
    """See lmmrt.generate. media_latents, on_step: see generate_steps."""
    args = check_generation_args(model, max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k,
                                 top_p=top_p, repetition_penalty=repetition_penalty, stop=stop,
                                 stop_token_ids=stop_token_ids, ignore_eos=ignore_eos, seed=seed)
    if not isinstance(stream, bool):
        raise TypeError(f"stream must be True or False, got {stream!r}")
    if stream and model.tokenizer is None:
        raise ValueError("stream=True needs a tokenizer; this model has none")
    n = len(normalize_prompts(prompts))
    rows = [_RowText(model.tokenizer, args) for _ in range(n)]
    stats = GenerationStats()
    steps = generate_steps(model, prompts, images, max_new_tokens=max_new_tokens, temperature=temperature,
                           top_k=top_k, top_p=top_p, repetition_penalty=repetition_penalty, stop=stop,
                           stop_token_ids=stop_token_ids, ignore_eos=ignore_eos, seed=seed, stats=stats,
                           media_latents=media_latents, on_step=on_step)
    if stream:
        return _stream(model, _pieces(steps, rows), n, stats)
    texts = [""] * n
    for b, piece in _pieces(steps, rows):
        texts[b] += piece
    model.last_stats = stats
    prompt_tokens = stats.extra.get("prompt_lengths", [0] * n)
    return [GenerationResult(text=texts[b], token_ids=rows[b].token_ids, finish_reason=rows[b].reason,
                             prompt_tokens=prompt_tokens[b]) for b in range(n)]


def _stream(model, pieces, n: int, stats: GenerationStats):
    """Text pieces as they are produced: str for one prompt, (prompt index, str) for several."""
    try:
        for b, piece in pieces:
            yield piece if n == 1 else (b, piece)
    finally:
        pieces.close()
        model.last_stats = stats
