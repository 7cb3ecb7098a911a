"""Streamed text equals the full decode for ANY token ids, valid UTF-8 or not: seeded fuzzing of the
incremental detokenizer over a byte-fallback (SentencePiece / Llama) and a byte-level (GPT-2) BPE
tokenizer, its work per token, and stream=True against stream=False on such ids."""

from __future__ import annotations

import random
from types import SimpleNamespace

import pytest
from tokenizer_util import BYTE_IDS, SPECIAL_IDS, WORD_PIECES, byte_fallback_tokenizer

from lmmrt.runtime import text_output
from lmmrt.runtime.text_output import _Detok
from lmmrt.runtime.tokenizer import Tokenizer

OOV = 5000  # an id past both vocabularies: decode leaves it out, as it does special tokens


def _byte_fallback():
    tok = byte_fallback_tokenizer()
    return SimpleNamespace(name="byte_fallback", tok=tok, byte=BYTE_IDS,
                           word=list(range(3 + len(BYTE_IDS), 3 + len(BYTE_IDS) + len(WORD_PIECES))),
                           special=SPECIAL_IDS)


def _gpt2_byte_chars() -> list[str]:
    """GPT-2's byte-to-character table (the ByteLevel alphabet, in byte order)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = {b: chr(b) for b in printable}, 0
    for b in range(256):
        if b not in chars:
            chars[b], extra = chr(256 + extra), extra + 1
    return [chars[b] for b in range(256)]


def _byte_level():
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, pre_tokenizers

    vocab = {c: i for i, c in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    assert set(vocab) == set(_gpt2_byte_chars())
    for word in ["Ġthe", "Ġa", "he", "Ġ", "<|endoftext|>"]:
        vocab[word] = len(vocab)
    tok = HFTokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(["<|endoftext|>"])
    return SimpleNamespace(name="byte_level", tok=Tokenizer(tok), byte=[vocab[c] for c in _gpt2_byte_chars()],
                           word=list(range(256, 260)), special=[260])


@pytest.fixture(scope="module", params=["byte_fallback", "byte_level"])
def tokenizer(request):
    return {"byte_fallback": _byte_fallback, "byte_level": _byte_level}[request.param]()


def _random_ids(kinds, rng: random.Random, n: int) -> list[int]:
    """Mostly bytes, lead and continuation bytes of multi-byte characters overrepresented, among words,
    special tokens and an id past the vocabulary."""
    byte = kinds.byte
    awkward = [byte[b] for b in (0x80, 0xBF, 0xC3, 0xE4, 0xED, 0xF0, 0xF4, 0xB8, 0x9F, 0xA9)]
    pools = [byte, awkward, kinds.word, kinds.special + [OOV]]
    return [rng.choice(rng.choices(pools, weights=[4, 3, 2, 1])[0]) for _ in range(n)]


def _streamed(tok, ids) -> list[str]:
    d = _Detok(tok)
    return [d.push(t) for t in ids] + [d.flush()]


def test_fuzz_pieces_add_up_to_the_full_decode(tokenizer):
    tok, kinds = tokenizer.tok, tokenizer
    rng = random.Random(10)
    for _ in range(300):
        ids = _random_ids(kinds, rng, rng.randint(1, 24))
        assert "".join(_streamed(tok, ids)) == tok.decode(ids), ids


def test_bytes_completing_a_character_after_invalid_ones():
    """D7 CA E5 99 AA: two invalid bytes, then 噪 over three tokens (streamed it lost 噪)."""
    kinds = _byte_level()
    tok = kinds.tok
    ids = [kinds.byte[b] for b in bytes.fromhex("D7CAE599AA")]
    assert tok.decode(ids) == "\ufffd\ufffd噪"
    assert "".join(_streamed(tok, ids)) == "\ufffd\ufffd噪"


def test_a_byte_fallback_run_is_one_string():
    """SentencePiece's byte fallback decodes a run of byte tokens as a whole: one invalid byte makes every
    byte of the run U+FFFD, so 'm' as a byte token is not final until the run ends."""
    kinds = _byte_fallback()
    tok = kinds.tok
    ids = [kinds.byte[0x6D], kinds.byte[0x98], kinds.word[2]]
    assert "".join(_streamed(tok, ids)) == tok.decode(ids) == "\ufffd\ufffda"


class _CountingTokenizer:
    """The tokenizer, recording how many ids each decode covers."""

    def __init__(self, tok):
        self.tok, self.lengths = tok, []

    def token_to_id(self, token):
        return self.tok.token_to_id(token)

    def decode(self, ids, skip_special_tokens=True):
        self.lengths.append(len(ids))
        return self.tok.decode(ids, skip_special_tokens=skip_special_tokens)


def test_work_per_token_is_bounded(tokenizer):
    """Each decode covers a few ids (a byte-fallback run, held until it ends, at most twice over), never
    the whole output: O(n) in all."""
    tok, kinds = tokenizer.tok, tokenizer
    rng = random.Random(11)
    ids = _random_ids(kinds, rng, 2000)
    counting = _CountingTokenizer(tok)
    assert "".join(_streamed(counting, ids)) == tok.decode(ids)
    longest_run, run = 0, 0
    for t in ids:
        if t in kinds.byte or t in kinds.special or t == OOV:
            run += t in kinds.byte
        else:
            run = 0
        longest_run = max(longest_run, run)
    # byte-level: a character's bytes as context and as pending ids; byte fallback: one token of context,
    # the run and the token that ends it (measured 7 and 31 = longest run + 2 here)
    assert max(counting.lengths) <= (10 if tokenizer.name == "byte_level" else longest_run + 2)
    assert sum(counting.lengths) <= 8 * len(ids)  # measured 5.0 and 1.4 per token


def _scripted_steps(rows: list[list[int]]):
    """generate_steps' contract for rows that all run to max_new_tokens (no stop token)."""
    def steps(model, prompts, images, *, max_new_tokens, **kw):
        for step in range(max_new_tokens):
            yield [row[step] for row in rows], ["length" if step == max_new_tokens - 1 else None] * len(rows)
    return steps


def test_stream_and_results_agree_on_any_ids(tokenizer, monkeypatch):
    rng = random.Random(12)
    n = 24
    rows = [_random_ids(tokenizer, rng, n) for _ in range(6)]
    cfg = SimpleNamespace(decoder=SimpleNamespace(vocab_size=OOV + 1), eos_token_id=tokenizer.special[-1],
                          stop_token_ids=[])
    model = SimpleNamespace(config=cfg, tokenizer=tokenizer.tok, last_stats=None)
    monkeypatch.setattr(text_output, "generate_steps", _scripted_steps(rows))
    kw = dict(max_new_tokens=n, ignore_eos=True)
    results = text_output.generate(model, [[1]] * len(rows), **kw)
    streamed = [""] * len(rows)
    for b, piece in text_output.generate(model, [[1]] * len(rows), stream=True, **kw):
        streamed[b] += piece
    for b, row in enumerate(rows):
        assert results[b].text == streamed[b] == tokenizer.tok.decode(row), row


def test_a_tokenizer_without_weak_references_still_streams():
    """The per-tokenizer cache is weak; an object it cannot hold (a SimpleNamespace) is learnt per row."""
    kinds = _byte_fallback()
    tok = SimpleNamespace(decode=kinds.tok.decode, token_to_id=kinds.tok.token_to_id)
    ids = [kinds.byte[0xC3], kinds.special[1], kinds.byte[0xA9], kinds.word[1]]  # é split by <s>, then ▁a
    assert "".join(_streamed(tok, ids)) == kinds.tok.decode(ids) == "é a"
