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


def _stop_ids(full: list[list[int]], long_row: int = LONG_ROW) -> list[int]:
    """Stop tokens ending the rows but long_row at different steps: for each in turn, its first token
    from step 2 * turn on that long_row never makes and no row left to place makes earlier."""
    banned = set(full[long_row])
    stops: list[int] = []
    short = [r for r in range(len(full)) if r != long_row]
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


def _expected_sizes(steps: list[int | None], overlap: bool, n_new: int = N_NEW) -> list[int]:
    """The batch of each decode call (that of step k computes the logits of step k + 1) when rows
    stop at `steps` (None: never) and each step drops the finished rows once at most half of the
    running rows are live; with overlap the step's call was queued before its tokens were seen."""
    running, sizes = len(steps), []
    for step in range(n_new - 1):
        if overlap:
            sizes.append(running)
        live = sum(1 for s in steps if s is None or s > step)
        if live <= running / 2:
            running = live
        if not overlap:
            sizes.append(running)
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


# the seeded sampler on every path and loop (its draws are what compaction could shift), the penalty
# once per path
@pytest.mark.parametrize(("mode", "path", "overlap"), [("seeded", p, o) for p in PATHS for o in (False, True)]
                         + [("penalty", p, False) for p in PATHS])
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


STOP_PROMPTS = ["ab", "cd", "ef", "gh"]  # no media; rows 0-2 end on stop strings after a few tokens
N_STOP = 30


@pytest.fixture(scope="module")
def uncut(model):
    """Each STOP_PROMPTS row's tokens when nothing ends it."""
    return [r.token_ids for r in lmmrt.generate(model, STOP_PROMPTS, max_new_tokens=N_STOP, ignore_eos=True)]


def _ended_by(decode, ids: list[int], strings: list[str], stop_ids: list[int]) -> tuple[list[int], str, str]:
    """The definition: (token_ids, text, finish reason) of a row whose uncut tokens are `ids`: it
    ends at its first stop token (kept in token_ids, not in the text) or at the first token whose
    text completes a stop string (the text cut before it)."""
    for k in range(1, len(ids) + 1):
        if ids[k - 1] in stop_ids:
            return ids[:k], decode(ids[:k - 1]), "stop"
        text = decode(ids[:k])
        cuts = [text.index(s) for s in strings if s in text]
        if cuts:
            return ids[:k], text[:min(cuts)], "stop"
    return ids, decode(ids), "length"


@pytest.mark.parametrize("mix", ["strings", "strings_and_token"])
@pytest.mark.parametrize(("path", "overlap"), [("eager", False), ("eager", True), ("graph", False)])
def test_rows_ended_by_stop_strings_leave_the_decode_loop(model, uncut, on_path, path, overlap, mix):
    """A row a stop string ends is finished in the decode loop too: it is dropped from the step's
    batch and adds no more tokens to the stats, while every result stays what the definition says,
    streamed or not."""
    texts = [model.tokenizer.decode(ids) for ids in uncut]
    strings, stop_ids = [t[1:3] for t in texts[:3]], []
    if mix == "strings_and_token":  # row 1 ends on a stop token, rows 0 and 2 on stop strings
        strings = [strings[0], strings[2]]
        stop_ids = [next(t for t in uncut[1][3:] if all(t not in uncut[r] for r in (0, 2, 3)))]
    want = [_ended_by(model.tokenizer.decode, ids, strings, stop_ids) for ids in uncut]
    steps = [len(ids) - 1 if reason == "stop" else None for ids, _, reason in want]
    # what the test needs: rows 0-2 end early (0 and 2 by a string: the stop token is not theirs), row 3
    # runs to the end
    assert all(s is not None and s < 5 for s in steps[:3]) and steps[3] is None, (texts, strings, steps)
    kw = dict(max_new_tokens=N_STOP, ignore_eos=True, stop=strings, stop_token_ids=stop_ids)
    sizes = on_path(path, overlap)
    got = lmmrt.generate(model, STOP_PROMPTS, **kw)
    stats = model.last_stats
    assert [(r.token_ids, r.text, r.finish_reason) for r in got] == want
    assert sizes == _expected_sizes(steps, overlap, n_new=N_STOP), (sizes, steps)
    assert stats.new_tokens == sum(len(r.token_ids) for r in got)
    assert stats.decode_tokens == stats.new_tokens - len(STOP_PROMPTS)
    sizes.clear()
    streamed = [""] * len(STOP_PROMPTS)
    for r, piece in lmmrt.generate(model, STOP_PROMPTS, stream=True, **kw):
        streamed[r] += piece
    assert streamed == [text for _, text, _ in want]
    assert sizes == _expected_sizes(steps, overlap, n_new=N_STOP)
    assert model.last_stats.new_tokens == stats.new_tokens


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


@pytest.fixture(scope="module")
def mllama(tmp_path_factory):
    from mllama_util import tiny_mllama

    from lmmrt.convert.mllama_files import convert_mllama

    d = tmp_path_factory.mktemp("mllama")
    tiny_mllama(seed=3).save_pretrained(d / "src")
    with pytest.warns(UserWarning, match="no tokenizer.json"):  # token-id prompts only: all this test needs
        convert_mllama(d / "src", d / "out", progress=False)
    return lmmrt.load(d / "out", device="cpu", backend="torch")


@pytest.mark.parametrize("overlap", [False, True])
def test_mllama_graph_path_compaction(mllama, monkeypatch, on_path, overlap):
    """Llama 3.2 Vision on the graph path: its pooled media_len and per-row text_time_first follow
    the rows kept."""
    import numpy as np
    from mllama_util import BOS, IMAGE_ID

    i = IMAGE_ID
    prompts = [[BOS, 5, 6, i, 7, 8, 9], [BOS, 10, 11, 12], [i, BOS, 13, 14, i, 15, 16, 17], [BOS, i, i, 20, 21, 22]]
    rng = np.random.default_rng(7)
    images = [[(rng.random((h, w, 3)) * 255).astype(np.uint8) for h, w in sizes]
              for sizes in [[(20, 50)], [], [(45, 19), (21, 60)], [(33, 30), (16, 40)]]]

    def run(**kw):
        return [r.token_ids for r in lmmrt.generate(mllama, prompts, images, max_new_tokens=N_NEW, ignore_eos=True,
                                                    **kw)]

    with monkeypatch.context() as m:
        _no_compaction(m)
        full = run()
        stops = _stop_ids(full, long_row=1)
        want = run(stop_token_ids=stops)
    steps = _stop_steps(full, stops)
    ended = sorted(s for s in steps if s is not None)
    assert steps[1] is None and len(ended) == 3 and N_NEW - 2 - ended[1] >= GRAPH_COMPACT_MIN_STEPS, (full, steps)
    sizes = on_path("graph", overlap)
    mllama.cuda_graph = True
    try:
        assert run(stop_token_ids=stops) == want
    finally:
        mllama.cuda_graph = False
    assert sizes == _expected_sizes(steps, overlap) and min(sizes) < len(prompts)


@pytest.mark.skipif(not __import__("torch").cuda.is_available(), reason="CUDA graphs need a GPU")
def test_compaction_captures_and_replays_the_smaller_batch_graph_on_gpu(monkeypatch):
    """The real thing (bench/device.sh): on CUDA the graph path moves the live KV rows to the front of
    the pool and replays the smaller batch's graph, in the overlapped loop; every row's tokens are the
    uncompacted run's."""
    from lmmrt.runtime.static_decode import graph_capturable

    m = demo_model(device="cuda", backend="auto")
    assert graph_capturable(m), "the cross-attention op must resolve to a kernel on CUDA"
    with monkeypatch.context() as p:
        _no_compaction(p)
        full = [r.token_ids for r in _run(m)]
        stops = _stop_ids(full)
        want = [r.token_ids for r in _run(m, stop_token_ids=stops)]
    steps = _stop_steps(full, stops)
    got = [r.token_ids for r in _run(m, stop_token_ids=stops)]
    assert got == want, (steps, got, want)
    batches = {key[0] for key in m.decode_state.graphs}
    assert len(PROMPTS) in batches and min(batches) < len(PROMPTS), (steps, sorted(batches))
    assert m.decode_state.graph_error is None
