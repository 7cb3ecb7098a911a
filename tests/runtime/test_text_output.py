"""Generated text: one definition for stream=True and stream=False, incremental detokenization,
stop strings and finish reasons."""

from __future__ import annotations

import random
from types import SimpleNamespace

import pytest
from tokenizer_util import byte_fallback_tokenizer

import lmmrt
from lmmrt.demo import demo_model
from lmmrt.runtime import text_output
from lmmrt.runtime.generation_args import check_generation_args
from lmmrt.runtime.text_output import _Detok
from lmmrt.runtime.tokenizer import Tokenizer

# Multi-byte characters written as byte-fallback tokens, one byte per token.
CHARS = ["é", "€", "😀", "ß"]


@pytest.fixture(scope="module")
def model():
    return demo_model(device="cpu", backend="torch")


@pytest.fixture(scope="module")
def sp_tokenizer():
    return byte_fallback_tokenizer()


PIECES = ["▁", "▁a", "a", "b", "▁the", "ne", "x", "▁€", "y", "▁S", "</s>"]


def _random_units(tok: Tokenizer, rng: random.Random, n: int, leave_out=()) -> list[list[int]]:
    """Valid text as tokens: pieces, special tokens, and multi-byte characters split into bytes
    (one unit each)."""
    pieces = [t for t in (tok.token_to_id(p) for p in PIECES) if t not in leave_out]
    units: list[list[int]] = []
    while sum(map(len, units)) < n:
        units.append([3 + b for b in rng.choice(CHARS).encode()] if rng.random() < 0.3 else [rng.choice(pieces)])
    return units


def _flat(units: list[list[int]], boundary: int, pad: int) -> list[int]:
    """The units' ids, with `pad` tokens put in where a character would straddle `boundary`."""
    ids: list[int] = []
    for u in units:
        if len(ids) < boundary < len(ids) + len(u):
            ids += [pad] * (boundary - len(ids))
        ids += u
    return ids


def test_incremental_detok_equals_full_decode(sp_tokenizer):
    rng = random.Random(0)
    for _ in range(200):
        ids = sum(_random_units(sp_tokenizer, rng, rng.randint(1, 40)), [])
        d = _Detok(sp_tokenizer)
        pieces = [d.push(t) for t in ids] + [d.flush()]
        assert "".join(pieces) == sp_tokenizer.decode(ids), ids
        assert all("\ufffd" not in p for p in pieces)  # a split character is never emitted half-done


def test_detok_work_per_token_is_bounded(model, monkeypatch):
    """Each token decodes a window of a few ids, not the whole output (O(n), not O(n^2))."""
    lengths = []
    decode = model.tokenizer.decode
    monkeypatch.setattr(model.tokenizer, "decode", lambda ids, **kw: lengths.append(len(ids)) or decode(ids, **kw))
    n = 60
    text = "".join(lmmrt.generate(model, "hello", max_new_tokens=n, ignore_eos=True, temperature=1.0, seed=1,
                                  stream=True))
    monkeypatch.undo()
    assert len(text) > 0 and len(lengths) >= n
    # a character-level tokenizer: one id of context and the new one (3 for a probe of a special token)
    assert max(lengths) <= 3 and sum(lengths) <= 6 * n


def _fake_model(tokenizer, eos: int):
    cfg = SimpleNamespace(decoder=SimpleNamespace(vocab_size=300), eos_token_id=eos, stop_token_ids=[])
    return SimpleNamespace(config=cfg, tokenizer=tokenizer, last_stats=None)


def _scripted_steps(rows: list[list[int]]):
    """generate_steps' contract on scripted tokens: a row finishes at a stop token ("stop") or on
    its last allowed token ("length"); finished rows read -1."""
    def steps(model, prompts, images, *, max_new_tokens, stats, **kw):
        args = check_generation_args(model, max_new_tokens=max_new_tokens, **{
            k: kw[k] for k in ("stop", "stop_token_ids", "ignore_eos")})
        finished = [False] * len(rows)
        for step in range(max_new_tokens):
            out, reasons = [], []
            for b, row in enumerate(rows):
                if finished[b]:
                    out.append(-1)
                    reasons.append(None)
                    continue
                t = row[step]
                out.append(t)
                reason = "stop" if t in args.stop_ids else "length" if step == max_new_tokens - 1 else None
                finished[b] = reason is not None
                reasons.append(reason)
            yield out, reasons
            if all(finished):
                return
    return steps


def _reference(tok, row, max_new, stop_ids, stop_strings):
    """The definition: tokens up to the stop token (kept in token_ids, not in the text), decoded
    in full, cut before the first stop string."""
    ids = row[:max_new]
    reason = "length"
    for i, t in enumerate(ids):
        if t in stop_ids:
            ids, reason = ids[:i + 1], "stop"
            break
    text = tok.decode(ids[:-1] if reason == "stop" else ids)
    cuts = [text.index(s) for s in stop_strings if s in text]
    if cuts:
        text, reason = text[:min(cuts)], "stop"
    return text, reason


@pytest.mark.parametrize("case", ["eos", "stop_token", "stop_string", "stop_string_on_last_token", "length"])
def test_stream_and_results_agree(sp_tokenizer, monkeypatch, case):
    tok, rng = sp_tokenizer, random.Random(case)
    eos, x, a = tok.token_to_id("</s>"), tok.token_to_id("x"), tok.token_to_id("a")
    units = [_random_units(tok, rng, 24, leave_out=(eos, x)) for _ in range(3)]
    kw = {"max_new_tokens": 20}
    if case == "eos":
        units[0].insert(5, [eos])
        units[2].insert(2, [eos])
    elif case == "stop_token":
        units[1].insert(4, [x])
        kw["stop_token_ids"] = [x]
    elif case == "stop_string":
        kw["stop"] = ["€", "zz"]
        units[0].insert(3, [3 + b for b in "€".encode()])  # the stop string split over three tokens
    rows = [_flat(u, 20, a) for u in units]  # valid UTF-8 up to the length limit
    if case == "stop_string_on_last_token":
        kw["stop"] = tok.decode(rows[1][:20])
    model = _fake_model(tok, eos)
    monkeypatch.setattr(text_output, "generate_steps", _scripted_steps(rows))
    results = text_output.generate(model, [[1]] * 3, **kw)
    streamed = ["", "", ""]
    for b, piece in text_output.generate(model, [[1]] * 3, stream=True, **kw):
        streamed[b] += piece
    stops = kw.get("stop") or []
    for b, row in enumerate(rows):
        text, reason = _reference(tok, row, 20, {eos} | set(kw.get("stop_token_ids", [])),
                                  [stops] if isinstance(stops, str) else stops)
        assert results[b].text == streamed[b] == text
        assert results[b].finish_reason == reason
    if case == "stop_string_on_last_token":
        assert results[1].finish_reason == "stop" and len(results[1].token_ids) == 20


def test_stream_leaves_out_a_stop_token(model):
    ref = lmmrt.generate(model, "hello", max_new_tokens=16, ignore_eos=True)[0]
    stop_at = ref.token_ids[2]
    out = lmmrt.generate(model, "hello", max_new_tokens=16, stop_token_ids=[stop_at])[0]
    streamed = "".join(lmmrt.generate(model, "hello", max_new_tokens=16, stop_token_ids=[stop_at], stream=True))
    assert out.finish_reason == "stop" and out.token_ids[-1] == stop_at
    assert streamed == out.text == model.tokenizer.decode(out.token_ids[:-1])


def test_stop_string_on_the_last_allowed_token_is_a_stop(model):
    ref = lmmrt.generate(model, "hello", max_new_tokens=10, ignore_eos=True)[0]
    assert ref.finish_reason == "length" and ref.text
    out = lmmrt.generate(model, "hello", max_new_tokens=10, ignore_eos=True, stop=ref.text)[0]
    assert out.text == "" and out.finish_reason == "stop" and out.token_ids == ref.token_ids
