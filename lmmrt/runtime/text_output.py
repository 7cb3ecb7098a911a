"""From generated token ids to text: lmmrt.generate's results and its text stream.

Both come from one definition (_RowText), so stream=True yields exactly the pieces whose
concatenation is the text of stream=False. A row's text is its new tokens detokenized, without
the stop token that ended it (eos, a stop_token_ids entry or a model stop token), cut before the
first stop string. token_ids keep that final stop token.
"""

from __future__ import annotations

import weakref

from lmmrt.runtime.batch import normalize_prompts
from lmmrt.runtime.generate import GenerationResult, GenerationStats, generate_steps
from lmmrt.runtime.generation_args import GenerationArgs, check_generation_args


class _TokenKinds:
    """What incremental detokenization must know of a tokenizer's ids, learnt through its public
    decode / token_to_id (cached per tokenizer in _KINDS):
    - byte_ids: byte-fallback tokens (<0xE4>, ...) when the decoder turns them into bytes. Its
      ByteFallback step makes one string of each run of them, valid UTF-8 as a whole or else one
      U+FFFD per byte, so no part of a run's text is known before a non-byte token ends the run.
    - transparent(tid): ids that decode leaves out (special tokens, ids past the vocabulary): they
      add no text and do not separate their neighbours (bytes on either side still join)."""

    def __init__(self, tokenizer):
        self.tok = tokenizer
        found = {}
        for b in range(256):
            for name in {f"<0x{b:02X}>", f"<0x{b:02x}>"}:  # the decoder reads the hex either way
                tid = tokenizer.token_to_id(name)
                if tid is not None:
                    found[tid] = b
        # a vocabulary may spell such tokens without a decoder that converts them (then they are text)
        t, b = next(iter(found.items()), (None, 0))
        converts = t is not None and tokenizer.decode([t]) == bytes([b]).decode("utf-8", "replace")
        self.byte_ids = frozenset(found) if converts else frozenset()
        # an id with text of its own, for the transparency probe: the vocabulary's first such id (a
        # vocabulary starts with a few special tokens at most)
        self._witness = next((t for t in range(1024) if tokenizer.decode([t]) != ""), None)
        self._transparent: dict[int, bool] = {}

    def transparent(self, tid: int) -> bool:
        known = self._transparent.get(tid)
        if known is None:
            known = self._transparent[tid] = self._probe(tid)
        return known

    def _probe(self, tid: int) -> bool:
        if self.tok.decode([tid]) != "":
            return False
        # Empty alone: a special token, or text the decoder strips at the start ("▁" under a
        # leading-space strip). Only the former leaves the text around it unchanged.
        w = self._witness
        return w is not None and self.tok.decode([w, tid, w]) == self.tok.decode([w, w])


_KINDS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _kinds_of(tokenizer) -> _TokenKinds:
    try:
        kinds = _KINDS.get(tokenizer)
    except TypeError:  # an object that takes no weak reference: learnt again for each row
        return _TokenKinds(tokenizer)
    if kinds is None:
        kinds = _KINDS[tokenizer] = _TokenKinds(tokenizer)
    return kinds


class _Detok:
    """Incremental detokenization whose pieces add up to tokenizer.decode(all ids) for any ids, valid
    UTF-8 or not (the prefix / read offsets of TGI's and vLLM's detokenizers, with final text decided
    exactly). ids[:read] were emitted; `read` is a final boundary: no later id changes the text
    before it. Each step decodes ids[prefix:] and emits what it adds to the decode of
    ids[prefix:read]. That context (the ids emitted last) makes the new ids decode as they do
    inside the whole sequence: a SentencePiece decode strips the leading space of its first token,
    which falls in the context, not on a new token.

    Where the text stops being final:
    - a byte-fallback run (see _TokenKinds): the whole run is held until a non-byte token ends it;
      its ids are not decoded while it grows, so each id is decoded a bounded number of times;
    - a lossy byte decode (byte-level BPE): only a trailing U+FFFD can change, when it stands for an
      incomplete character that later bytes complete or extend. A boundary k is final once ids
      after it carry text and decode(ids[prefix:k]) + decode(ids[k:]) equals decode(ids[prefix:]):
      bytes that extended a pending sequence would make that sum longer. A UTF-8 character spans at
      most 4 bytes, so at most a few ids wait."""

    def __init__(self, tokenizer):
        self.tok = tokenizer
        self.kinds = _kinds_of(tokenizer)
        self.ids: list[int] = []
        self.prefix = 0
        self.read = 0

    def push(self, tid: int) -> str:
        if self.kinds.transparent(tid):
            return ""
        self.ids.append(tid)
        if tid in self.kinds.byte_ids:
            return ""
        return self._advance(final=False)

    def flush(self) -> str:
        return self._advance(final=True) if len(self.ids) > self.read else ""

    def _advance(self, final: bool) -> str:
        done = self.tok.decode(self.ids[self.prefix:self.read])
        text = self.tok.decode(self.ids[self.prefix:])
        end = len(self.ids)
        if not final and not self.kinds.byte_ids and text.endswith("\ufffd"):
            end, text = self._last_final_boundary(text, done)
        piece = text[len(done):]
        if end > self.read:
            # after a run-ending token the boundary before it is final too: that one id is context enough
            ends_run = bool(self.kinds.byte_ids) and self.ids[end - 1] not in self.kinds.byte_ids
            self.prefix, self.read = (end - 1 if ends_run else self.read), end
        return piece

    def _last_final_boundary(self, text: str, done: str) -> tuple[int, str]:
        """The last final boundary after `read` and the text before it; (read, done) if none."""
        for k in range(len(self.ids) - 1, self.read, -1):
            head, tail = self.tok.decode(self.ids[self.prefix:k]), self.tok.decode(self.ids[k:])
            if tail and head + tail == text:
                return k, head
        return self.read, done


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
    """(row, text piece) as generate_steps produces tokens, until every row has finished. The rows a
    stop string ended are sent back to generate_steps, which then stops decoding them."""
    try:
        ended = None
        while True:
            try:
                out, reasons = steps.send(ended)
            except StopIteration:
                break
            ended = []
            for b, (tid, reason) in enumerate(zip(out, reasons)):
                if tid < 0 or rows[b].reason is not None:
                    continue
                piece = rows[b].push(tid, reason)
                if reason is None and rows[b].reason is not None:
                    ended.append(b)
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
