"""Finished rows dropped from the running batch (compaction) on every decode path: the eager step, the
fixed-shape step without a graph (cuda_graph=True on the CPU), the graph path (DecodeState.graph_step
over the KV pool; on the CPU its step runs eagerly) and the overlapped loop of CUDA. Dropping rows
must change no row's tokens, texts or errors, only the batch the step runs on."""

from __future__ import annotations

import pytest

import lmmrt
import lmmrt.runtime.generate as gen
from lmmrt.demo import demo_images, demo_model
from lmmrt.runtime import static_decode
from lmmrt.runtime.decode_plan import EagerDecode
from lmmrt.runtime.static_decode import GRAPH_COMPACT_MIN_STEPS, StaticDecodeStep

PROMPTS = ["a<image>b", "<image>c<image>dd e", "no image", "x y<image>", "qq"]
LONG_ROW = 2  # the row no stop token ends: it runs to max_new_tokens
N_NEW = 20
PATHS = ["eager", "fixed", "graph"]


def _images():
    im = demo_images()
    return [[im[0]], im, [], [im[1]], []]


@pytest.fixture(scope="module")
def model():
    return demo_model(device="cpu", backend="torch")


@pytest.fixture
def on_path(model, monkeypatch):
    """Sets up one decode path (and the overlapped loop or not); yields the batch size of each
    decode step the path runs."""
    sizes = []

    def setup(path: str, overlap: bool) -> list[int]:
        model.cuda_graph = path != "eager"
        if path == "graph":  # graph_step's pooled KV and media; its step still runs eagerly here
            monkeypatch.setattr(gen, "graph_capturable", lambda m: True)
        if overlap:
            loop = gen._decode_loop
            monkeypatch.setattr(gen, "_decode_loop", lambda *a, **kw: loop(*a, **{**kw, "overlap": True}))
        cls = EagerDecode if path == "eager" else StaticDecodeStep
        call = cls.__call__
        monkeypatch.setattr(cls, "__call__", lambda self, tokens, slot: (sizes.append(tokens.shape[0]),
                                                                         call(self, tokens, slot))[1])
        return sizes

    yield setup
    model.cuda_graph = False


def _no_compaction(monkeypatch):
    monkeypatch.setattr(gen, "COMPACT_LIVE_FRACTION", -1.0)


SAMPLING = {"greedy": {}, "penalty": dict(repetition_penalty=1.3), "seeded": dict(temperature=1.0, top_p=0.9, seed=7)}


def _stop_ids(full: list[list[int]]) -> list[int]:
    """Stop tokens ending the rows but LONG_ROW at different steps: for each in turn, its first token
    from step 2 * turn on that LONG_ROW never makes and no row left to place makes earlier."""
    banned = set(full[LONG_ROW])
    stops: list[int] = []
    short = [r for r in range(len(full)) if r != LONG_ROW]
    for turn, r in enumerate(short):
        later = [set(full[o][:2 * (turn + 1)]) for o in short[turn + 1:]]
        stops.append(next(t for t in full[r][2 * turn:] if t not in banned and not any(t in s for s in later)))
    return stops


def _stop_steps(full: list[list[int]], stops: list[int]) -> list[int | None]:
    return [next((s for s, t in enumerate(row) if t in stops), None) for row in full]


def _run(model, **kw):
    return lmmrt.generate(model, PROMPTS, _images(), max_new_tokens=N_NEW, ignore_eos=True, **kw)


@pytest.fixture(scope="module")
def baseline(model):
    """Per sampling mode, from uncompacted runs: (tokens without stops, stop tokens chosen from them,
    the step each row stops at, the results with those stop tokens)."""
    out = {}
    with pytest.MonkeyPatch.context() as m:
        _no_compaction(m)
        for name, kw in SAMPLING.items():
            full = [r.token_ids for r in _run(model, **kw)]
            stops = _stop_ids(full)
            steps = _stop_steps(full, stops)
            # what the tests need: the long row runs to the end; three rows stop (5 -> 2 rows) early
            # enough for the graph path, then a fourth later (2 -> 1)
            assert steps[LONG_ROW] is None, (full, stops)
            ended = sorted(s for s in steps if s is not None)
            assert len(ended) == 4 and ended[2] < ended[3], (full, steps)
            assert N_NEW - 2 - ended[3] >= GRAPH_COMPACT_MIN_STEPS, (full, steps)
            out[name] = full, stops, steps, _run(model, stop_token_ids=stops, **kw)
    return out


def _expected_sizes(steps: list[int | None], overlap: bool) -> list[int]:
    """The batch of each decode call: 5 rows until three have stopped, then 2, then 1."""
    ended = sorted(s for s in steps if s is not None)
    sizes = []
    for call in range(N_NEW - 1):  # decode call k computes the logits of step k + 1
        known = call - 1 if overlap else call  # the last step whose tokens the host has seen
        done = sum(1 for s in ended if s <= known)
        sizes.append(5 if done < 3 else 2 if done < 4 else 1)
    return sizes


@pytest.mark.parametrize("overlap", [False, True])
@pytest.mark.parametrize("path", PATHS)
def test_compacted_rows_decode_what_they_decode_alone(model, baseline, on_path, path, overlap):
    full, stops, steps, _ = baseline["greedy"]
    sizes = on_path(path, overlap)
    got = _run(model, stop_token_ids=stops)
    assert sizes == _expected_sizes(steps, overlap), (sizes, steps)
    alone = _alone(model, tuple(stops))
    for r, res in enumerate(got):
        want = full[r] if steps[r] is None else full[r][:steps[r] + 1]
        assert res.token_ids == want == alone[r], (r, res.token_ids, want, alone[r])
        assert res.finish_reason == ("length" if steps[r] is None else "stop")


_ALONE: dict = {}


def _alone(model, stops: tuple[int, ...]) -> list[list[int]]:
    """Each prompt generated on its own (eager step, nothing to drop), computed once."""
    if stops not in _ALONE:
        _ALONE[stops] = [lmmrt.generate(model, p, im, max_new_tokens=N_NEW, ignore_eos=True,
                                        stop_token_ids=list(stops))[0].token_ids for p, im in zip(PROMPTS, _images())]
    return _ALONE[stops]


@pytest.mark.parametrize("overlap", [False, True])
@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("mode", ["penalty", "seeded"])
def test_compaction_keeps_penalised_and_seeded_tokens(model, baseline, on_path, path, overlap, mode):
    """A seeded sampler draws noise for the whole batch: compaction must not shift any row's draws."""
    full, stops, steps, want = baseline[mode]
    sizes = on_path(path, overlap)
    got = _run(model, stop_token_ids=stops, **SAMPLING[mode])
    assert sizes == _expected_sizes(steps, overlap)
    assert [r.token_ids for r in got] == [r.token_ids for r in want]
    assert [r.token_ids for r in got] == [f if s is None else f[:s + 1] for f, s in zip(full, steps)]


@pytest.mark.parametrize("path", ["fixed", "graph"])
def test_graph_path_keeps_its_batch_when_too_few_steps_remain(model, monkeypatch, baseline, on_path, path):
    """A new graph is captured only when enough steps remain to pay for it; the graph-free step
    always drops its finished rows."""
    full, stops, steps, want = baseline["greedy"]
    monkeypatch.setattr(static_decode, "GRAPH_COMPACT_MIN_STEPS", N_NEW)
    sizes = on_path(path, False)
    got = _run(model, stop_token_ids=stops)
    assert sizes == ([5] * (N_NEW - 1) if path == "graph" else _expected_sizes(steps, False))
    assert [r.token_ids for r in got] == [r.token_ids for r in want]


@pytest.mark.parametrize("path", ["fixed", "graph"])
def test_compaction_keeps_streamed_text_and_stop_strings(model, monkeypatch, baseline, on_path, path):
    _, stops, _, plain = baseline["greedy"]
    with monkeypatch.context() as m:
        _no_compaction(m)
        piece = plain[LONG_ROW].text[-3:-1]  # ends the long row's text a little early
        want = _run(model, stop_token_ids=stops, stop=[piece])
    assert want[LONG_ROW].finish_reason == "stop" and want[LONG_ROW].text != plain[LONG_ROW].text
    sizes = on_path(path, False)
    got = _run(model, stop_token_ids=stops, stop=[piece])
    streamed = [""] * len(PROMPTS)
    for r, text in _run(model, stop_token_ids=stops, stop=[piece], stream=True):
        streamed[r] += text
    assert min(sizes) == 1
    assert [r.text for r in got] == [r.text for r in want] == streamed
    assert [r.finish_reason for r in got] == [r.finish_reason for r in want]


@pytest.mark.parametrize("overlap", [False, True])
@pytest.mark.parametrize("path", PATHS)
def test_nan_after_compaction_names_its_prompt(model, monkeypatch, baseline, on_path, path, overlap):
    """NaN logits in a row of the compacted batch name that row's prompt, not its new index."""
    _, stops, steps, _ = baseline["greedy"]
    sizes = on_path(path, overlap)
    live = [r for r, s in enumerate(steps) if s is None or s > sorted(x for x in steps if x is not None)[2]]
    poisoned = live[-1]  # row 1 of the 2-row batch
    cls = EagerDecode if path == "eager" else StaticDecodeStep
    spied = cls.__call__

    def poison(self, tokens, slot):
        logits = spied(self, tokens, slot)
        if tokens.shape[0] == 2:
            logits = logits.clone()
            logits[1, 3] = float("nan")
        return logits

    monkeypatch.setattr(cls, "__call__", poison)
    compacted_at = sorted(x for x in steps if x is not None)[2]
    with pytest.raises(ValueError, match=rf"NaN logits for prompt {poisoned} at decode step "
                                         rf"{compacted_at + 1 + overlap} "):
        _run(model, stop_token_ids=stops)
    assert 2 in sizes
