"""Property-based hostile-input tests (issue 11, "Keep it that way").

Each case feeds lmmrt something a careless or hostile user could hand it — a mutated config.json field, a
damaged safetensors header, odd prompt/image layouts, odd sampling arguments — and asserts the one rule:
a clear lmmrt error, or a correct result; never a hang, a raw traceback from deep inside a library, or NaN.

"A clear lmmrt error" is checked mechanically: a ValueError/TypeError/OSError (CheckpointError is a
ValueError) raised by a frame inside the lmmrt package, whose message is not one of Python's own
internal-error phrasings. Hypothesis runs derandomized so CI is reproducible; every case runs under an
alarm so a hang fails the test instead of stalling CI.
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import signal
import struct
import time
import traceback
from pathlib import Path

import numpy as np
import pytest
import torch

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

import lmmrt  # noqa: E402
from lmmrt.api import parse_dtype  # noqa: E402
from lmmrt.demo import demo_model, save_demo  # noqa: E402

LMMRT_DIR = str(Path(lmmrt.__file__).parent)
CASE_SECONDS = 20  # far above any legitimate case on the tiny demo model
FUZZ = settings(max_examples=40, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])

# Python's own words for a programming error that escaped as the user's error message.
RAW_PHRASES = ("object is not subscriptable", "unsupported operand", "'NoneType' object", "not enough values to unpack",
               "index out of range", "object has no attribute", "object is not iterable", "division by zero",
               "too many values to unpack", "can't multiply sequence", "must be real number, not",
               "cannot be interpreted as an integer", "Overflow when unpacking")


class Hang(Exception):
    pass


@contextlib.contextmanager
def time_limit(seconds: int):
    def on_alarm(signum, frame):
        raise Hang(f"no answer within {seconds} s")

    # pytest-timeout's signal method uses the same alarm: hand its remaining time back afterwards.
    old = signal.signal(signal.SIGALRM, on_alarm)
    outer = signal.alarm(seconds)
    start = time.monotonic()
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)
        if outer:
            signal.alarm(max(1, outer - int(time.monotonic() - start)))


def assert_clear_error(e: BaseException) -> None:
    """The exception is one lmmrt raised on purpose, with a message a user can act on."""
    assert not isinstance(e, Hang), f"hang: {e}"
    assert isinstance(e, (ValueError, TypeError, OSError)), f"{type(e).__name__} escaped: {e}\n" + "".join(
        traceback.format_exception(e))
    frames = traceback.extract_tb(e.__traceback__)
    assert frames and frames[-1].filename.startswith(LMMRT_DIR), (
        f"{type(e).__name__} raised outside lmmrt ({frames[-1].filename if frames else '?'}): {e}")
    msg = str(e)
    assert msg.strip(), f"{type(e).__name__} with an empty message"
    assert not any(p in msg for p in RAW_PHRASES), f"raw Python error as the message: {msg}"


VALID, INVALID, EITHER = "valid", "invalid", "either"


def outcome(fn, expect: str = EITHER, what: str = ""):
    """Run fn under the time limit: its result, or None after asserting the error is a clear one.
    expect: VALID input must give a result, INVALID input a clear error (never silently accepted)."""
    try:
        with time_limit(CASE_SECONDS):
            got = fn()
    except Exception as e:  # noqa: BLE001 - the property is about which exceptions come out
        assert_clear_error(e)
        assert expect != VALID, f"valid input refused ({what}): {type(e).__name__}: {e}"
        return None
    assert expect != INVALID, f"invalid input silently accepted: {what}"
    return got


def _img(seed=0, h=40, w=50):
    return np.random.default_rng(seed).integers(0, 255, (h, w, 3), dtype=np.uint8)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    return Path(save_demo(tmp_path_factory.mktemp("hostile") / "ckpt"))


@pytest.fixture(scope="module")
def model():
    return demo_model(device="cpu", backend="torch")


# --- config.json ---------------------------------------------------------------------------------
HOSTILE_VALUES = st.one_of(
    st.sampled_from([0, -1, -7, 1, 2, 3, 10**6, 10**12, 2**63, 0.5, -0.5, 1e-30, 1e30, True, False, None, "", "x",
                     "12", [], [1], {}, {"a": 1}]),
    st.just(float("nan")), st.just(float("inf")), st.just(float("-inf")),
    st.integers(min_value=-(2**40), max_value=2**40), st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=6),
)


def _leaves(d: dict, prefix=()):
    for k, v in d.items():
        if isinstance(v, dict):
            yield from _leaves(v, prefix + (k,))
        else:
            yield prefix + (k,)


@FUZZ
@given(data=st.data())
def test_config_fields(ckpt, tmp_path_factory, data):
    base = json.loads((ckpt / "config.json").read_text())
    leaves = sorted(_leaves(base))
    path = data.draw(st.sampled_from(leaves), label="field")
    value = data.draw(HOSTILE_VALUES, label="value")
    cfg = copy.deepcopy(base)
    node = cfg
    for k in path[:-1]:
        node = node[k]
    node[path[-1]] = value
    out = tmp_path_factory.mktemp("cfg")
    for f in ckpt.iterdir():
        (out / f.name).symlink_to(f)
    (out / "config.json").unlink()
    (out / "config.json").write_text(json.dumps(cfg, allow_nan=True))

    def run():
        m = lmmrt.load(out, device="cpu", backend="torch")
        res = lmmrt.generate(m, "<image>ab", [_img()], max_new_tokens=3, ignore_eos=True)
        return m, res

    got = outcome(run)
    if got is not None:
        m, res = got
        assert len(res) == 1 and len(res[0].token_ids) == 3
        logits = lmmrt.logits(m, ["<image>ab"], [[_img()]])[0]
        assert torch.isfinite(logits).all(), f"{'.'.join(map(str, path))}={value!r} loaded but gives non-finite logits"


# fields that pass a type-and-range check yet contradict the rest of the checkpoint: refused at load
CONFIG_CASES = [(("image_token_id",), 2, INVALID),  # the demo's eos
                (("image_token_id",), 50, INVALID),  # tokenizer.json maps <image> elsewhere
                (("image_token",), "<picture>", INVALID),  # not in tokenizer.json
                (("vision", "feature_layers"), [-1, -1], INVALID), (("vision", "feature_layers"), [-1, -2], INVALID),
                (("image_prompt_template",), "{foo}{image}", INVALID),
                (("image_prompt_template",), "<fake_token_around_image>{image}", VALID)]


@pytest.mark.parametrize("path,value,expect", CONFIG_CASES, ids=lambda x: repr(x)[:24])
def test_config_cases(ckpt, tmp_path, path, value, expect):
    cfg = json.loads((ckpt / "config.json").read_text())
    node = cfg
    for k in path[:-1]:
        node = node[k]
    node[path[-1]] = value
    for f in ckpt.iterdir():
        (tmp_path / f.name).symlink_to(f)
    (tmp_path / "config.json").unlink()
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    outcome(lambda: lmmrt.load(tmp_path, device="cpu", backend="torch"), expect, f"{'.'.join(path)}={value!r}")


# --- safetensors headers -------------------------------------------------------------------------
@FUZZ
@given(data=st.data())
def test_safetensors_header(ckpt, tmp_path_factory, data):
    raw = (ckpt / "model.safetensors").read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = bytearray(raw[8:8 + n])
    kind = data.draw(st.sampled_from(["length", "flip", "truncate", "json"]), label="damage")
    if kind == "length":
        new_n = data.draw(st.one_of(st.integers(0, 2 * n), st.sampled_from([0, 1, 2**63 - 1, 2**64 - 1])))
        blob = struct.pack("<Q", new_n) + bytes(header) + raw[8 + n:]
    elif kind == "flip":
        i = data.draw(st.integers(0, len(header) - 1))
        header[i] = data.draw(st.integers(0, 255))
        blob = raw[:8] + bytes(header) + raw[8 + n:]
    elif kind == "truncate":
        blob = raw[:data.draw(st.integers(0, len(raw) - 1))]
    else:  # a well-formed header that lies about one tensor
        meta = json.loads(bytes(header))
        key = data.draw(st.sampled_from(sorted(k for k in meta if k != "__metadata__")))
        field = data.draw(st.sampled_from(["dtype", "shape", "data_offsets"]))
        meta[key][field] = data.draw(st.sampled_from(
            {"dtype": ["I32", "BOOL", "I64", "U8", "F64", "F16", "XX"],
             "shape": [[], [0], [1], [-1, 4], [10**9, 10**9]],
             "data_offsets": [[0, 0], [0, 4], [10**12, 10**12 + 4], [-4, 0]]}[field]))
        hb = json.dumps(meta).encode()
        hb += b" " * (-len(hb) % 8)
        blob = struct.pack("<Q", len(hb)) + hb + raw[8 + n:]
    out = tmp_path_factory.mktemp("st")
    for f in ckpt.iterdir():
        if f.name != "model.safetensors":
            (out / f.name).symlink_to(f)
    (out / "model.safetensors").write_bytes(blob)

    def run():
        m = lmmrt.load(out, device="cpu", backend="torch")
        return lmmrt.logits(m, ["<image>ab"], [[_img()]])[0]

    # A header that lies about a tensor, a truncated file or a wrong header length is always an error; a
    # flipped header byte may be harmless (inside a metadata string, or the same byte).
    harmless = kind == "flip" or (kind == "length" and new_n == n)
    logits = outcome(run, EITHER if harmless else INVALID, kind)
    if logits is not None:  # a harmless change (e.g. F16 of a float tensor): must still compute
        assert torch.isfinite(logits).all()


# --- prompts and images --------------------------------------------------------------------------
# (image, its validity): uint8 (H, W, 3) and finite float (3, H, W) pixels are images; the rest is not,
# except a few forms a runtime may reasonably accept (grey or RGBA arrays, other integer dtypes).
def _image_strategy():
    shapes = st.tuples(st.integers(1, 70), st.integers(1, 70))
    uint8 = shapes.map(lambda hw: (_img(hw[0] * 7 + hw[1], *hw), VALID))
    float_px = st.tuples(shapes, st.sampled_from([None, "nan", "inf"])).map(_float_image)
    odd = st.sampled_from([(np.zeros((5, 5), np.uint8), EITHER), (np.zeros((5, 5, 4), np.uint8), EITHER),
                           (np.zeros((5, 5, 3), np.int64), EITHER), (np.zeros((3, 0, 5), np.float32), INVALID),
                           (torch.zeros(3, 0, 5), INVALID), ("cat.jpg", INVALID), (None, INVALID), (3, INVALID),
                           ([1, 2, 3], INVALID), (np.zeros((0, 5, 3), np.uint8), INVALID),
                           (torch.full((3, 5, 5), 1e30), INVALID), (torch.full((3, 5, 5), 255.0), INVALID)])
    return st.one_of(uint8, uint8, float_px, odd)


def _float_image(arg):
    (h, w), poison = arg
    t = torch.randn(3, h, w, generator=torch.Generator().manual_seed(h * 71 + w))
    if poison:
        t[0, 0, 0] = float(poison)
    return t, INVALID if poison else VALID


def _worst(*states):
    return INVALID if INVALID in states else EITHER if EITHER in states else VALID


@FUZZ
@given(data=st.data())
def test_prompt_and_image_layouts(model, data):
    n_prompts = data.draw(st.integers(1, 3), label="prompts")
    prompts = []
    for _ in range(n_prompts):
        words = data.draw(st.lists(st.sampled_from(["a", "b c", "<image>", "\n", "é", " "]), min_size=1, max_size=6))
        prompts.append("".join(words))
    markers = [p.count("<image>") for p in prompts]
    layout = data.draw(st.sampled_from(["per_prompt", "flat", "single", "none", "wrong_count"]), label="layout")
    img = _image_strategy()
    single_prompt = n_prompts == 1 and data.draw(st.booleans(), label="bare string")
    if layout == "per_prompt":
        drawn = [data.draw(st.lists(img, min_size=max(0, m - 1), max_size=m + 1)) for m in markers]
        images = [[x for x, _ in row] for row in drawn]
        counts_ok = [len(row) for row in drawn] == markers
        expect = _worst(*(v for row in drawn for _, v in row)) if counts_ok else INVALID
        if single_prompt:  # one prompt: a flat list of its images is the form; a nested one may be accepted
            expect = EITHER if expect == VALID else expect
    elif layout == "flat":  # one flat list: right for one prompt, ambiguous (refused) for several
        drawn = data.draw(st.lists(img, min_size=max(0, sum(markers) - 1), max_size=sum(markers) + 1))
        images = [x for x, _ in drawn]
        ok = n_prompts == 1 and len(drawn) == markers[0]
        expect = _worst(*(v for _, v in drawn)) if ok else INVALID
        if n_prompts > 1 and not any(markers) and not images:
            expect = EITHER  # [] for prompts without markers: nothing to misplace
    elif layout == "single":  # a bare image, not in a list
        images, v = data.draw(img)
        expect = EITHER if (n_prompts == 1 and markers[0] == 1 and v != INVALID) else INVALID
    elif layout == "none":
        images = None
        expect = VALID if not any(markers) else INVALID
    else:  # one list per prompt, but the wrong number of lists or of images
        images = [[_img(i)] * m for i, m in enumerate(markers)]
        if data.draw(st.booleans()):
            images = images[:-1] if len(images) > 1 else images + [[]]
        else:
            images[0] = images[0] + [_img(9)]
        expect = INVALID
    arg = prompts[0] if single_prompt else prompts

    got = outcome(lambda: lmmrt.logits(model, arg, images), expect, f"{layout}: {prompts!r}")
    if got is None:
        return
    assert len(got) == n_prompts
    for row in got:
        assert torch.isfinite(row).all()
    # A batch gives what each prompt gives alone (left padding and packing change nothing).
    if n_prompts > 1 and layout == "per_prompt":
        for i, p in enumerate(prompts):
            alone = lmmrt.logits(model, [p], [images[i]])[0]
            torch.testing.assert_close(got[i], alone, rtol=1e-4, atol=1e-4)


# token-id prompts in the forms they arrive in: lists, numpy arrays, torch tensors (1-D per prompt)
PROMPT_FORMS = [([5, 6, 7], VALID), ([np.array([5, 6, 7])], VALID), ([torch.tensor([5, 6]), [7, 8, 9]], VALID),
                (np.array([5, 6]), VALID), (torch.tensor([[5, 6], [7, 8]]), VALID), ([np.array([[5, 6]])], INVALID),
                ([np.array([5.0, 6.0])], INVALID), ([torch.tensor([True, False])], INVALID),
                ([np.array([5, 10**6])], INVALID)]


@pytest.mark.parametrize("prompts,expect", PROMPT_FORMS, ids=lambda x: repr(x)[:30])
def test_token_id_prompt_forms(model, prompts, expect):
    got = outcome(lambda: lmmrt.generate(model, prompts, max_new_tokens=2), expect, repr(prompts))
    if got is not None:
        assert all(len(r.token_ids) <= 2 for r in got)


# --- sampling arguments --------------------------------------------------------------------------
# name -> [(value, validity)]; EITHER where a runtime may accept it (None meaning "the default").
ARGS = {
    "max_new_tokens": [(0, VALID), (1, VALID), (3, VALID), (np.int64(2), VALID), (-1, INVALID), (2.5, INVALID),
                       (True, INVALID), ("3", INVALID), (None, INVALID), (10**9, INVALID)],
    "temperature": [(0.0, VALID), (0.7, VALID), (1, VALID), (1e-30, VALID), (-1.0, INVALID), (float("nan"), INVALID),
                    (float("inf"), INVALID), ("0.5", INVALID), (None, EITHER)],
    "top_k": [(0, VALID), (1, VALID), (5, VALID), (10**9, VALID), (-3, INVALID), (2.5, INVALID), ("2", INVALID),
              (None, EITHER)],
    "top_p": [(1.0, VALID), (0.5, VALID), (1e-9, VALID), (0.0, INVALID), (-0.1, INVALID), (1.5, INVALID),
              (float("nan"), INVALID), (None, EITHER)],
    "repetition_penalty": [(1.0, VALID), (1.3, VALID), (0.0, INVALID), (-1.0, INVALID), (float("inf"), INVALID),
                           (float("nan"), INVALID)],
    "seed": [(None, VALID), (0, VALID), (7, VALID), (np.int64(3), VALID), (-1, EITHER), (2**63, INVALID),
             (2**70, INVALID), (2.5, INVALID), ("7", INVALID)],
    "stop": [(None, VALID), ("a", VALID), (["a", "b"], VALID), (["x" * 300], VALID), ("", INVALID), ([""], INVALID),
             (5, INVALID), ([5], INVALID)],
    "stop_token_ids": [(None, VALID), (2, VALID), ([2, 3], VALID), (np.int64(2), VALID), ([], VALID),
                       (np.array([44]), VALID), (torch.tensor([2, 3]), VALID), (np.array([2.5]), INVALID),
                       ("44", INVALID), ([10**9], INVALID), ([-1], INVALID), ([2.5], INVALID)],
    "ignore_eos": [(False, VALID), (True, VALID), ("yes", INVALID), (None, EITHER)],
}


def _generate_case(model, kw: dict, expect: str, stream: bool):
    def run():
        if stream:
            return "".join(lmmrt.generate(model, "<image>ab", [_img()], stream=True, **kw))
        return lmmrt.generate(model, "<image>ab", [_img()], **kw)

    got = outcome(run, expect, repr(kw))
    if got is None or stream:
        assert got is None or isinstance(got, str)
        return
    (res,) = got
    limit = int(kw["max_new_tokens"])
    assert isinstance(res.text, str) and len(res.token_ids) <= limit
    assert res.finish_reason in ("stop", "length")
    if res.finish_reason == "length":
        assert len(res.token_ids) == limit


@pytest.mark.parametrize("name,value,expect", [(n, v, e) for n, cases in ARGS.items() for v, e in cases],
                         ids=lambda x: repr(x)[:20])
def test_each_sampling_argument(model, name, value, expect):
    kw = {"max_new_tokens": 3, name: value}
    _generate_case(model, kw, expect, stream=False)


@FUZZ
@given(data=st.data())
def test_sampling_argument_combinations(model, data):
    names = data.draw(st.lists(st.sampled_from(sorted(ARGS)), min_size=2, max_size=4, unique=True))
    picked = {name: data.draw(st.sampled_from(ARGS[name]), label=name) for name in names}
    kw = {name: v for name, (v, _) in picked.items()}
    kw.setdefault("max_new_tokens", 3)
    _generate_case(model, kw, _worst(*(e for _, e in picked.values())), stream=data.draw(st.booleans()))


def test_a_hang_is_caught():
    """The time limit itself works: without it a hang would stall CI instead of failing."""
    with pytest.raises(Hang):
        with time_limit(1):
            while True:
                math.sqrt(2.0)


def test_raw_errors_are_recognised():
    """The checker can fail: a raw TypeError from a library frame, a Python-internal message, a silently
    accepted invalid input and a refused valid one are all caught."""
    with pytest.raises(AssertionError):
        try:
            torch.zeros(2) + "x"
        except TypeError as e:
            assert_clear_error(e)
    with pytest.raises(AssertionError):
        assert_clear_error(KeyError("weight_map"))
    with pytest.raises(AssertionError, match="silently accepted"):
        outcome(lambda: 1, INVALID)
    with pytest.raises(AssertionError, match="valid input refused"):
        outcome(lambda: parse_dtype("no-such-dtype"), VALID)
