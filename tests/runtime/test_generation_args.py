"""Generation options: each bad one gets lmmrt's own error naming it; numpy scalars are accepted."""

from __future__ import annotations

import math

import numpy as np
import pytest

import lmmrt
from lmmrt.demo import demo_model
from lmmrt.runtime.generation_args import check_generation_args


@pytest.fixture(scope="module")
def model():
    return demo_model(device="cpu", backend="torch")


@pytest.mark.parametrize("kw, error, msg", [
    ({"max_new_tokens": 2.5}, TypeError, r"max_new_tokens must be an int, got 2\.5"),
    ({"max_new_tokens": True}, TypeError, "max_new_tokens must be an int"),
    ({"max_new_tokens": "8"}, TypeError, "max_new_tokens must be an int"),
    ({"max_new_tokens": -1}, ValueError, "max_new_tokens must be >= 0"),
    ({"top_k": 2.5}, TypeError, r"top_k must be an int, got 2\.5"),
    ({"top_k": -1}, ValueError, r"top_k=-1 \(must be >= 0\)"),
    ({"temperature": math.nan}, ValueError, "temperature must be finite"),
    ({"temperature": math.inf}, ValueError, "temperature must be finite"),
    ({"temperature": "hot"}, TypeError, "temperature must be a real number"),
    ({"temperature": -0.5}, ValueError, r"temperature=-0\.5"),
    ({"top_p": 1.5}, ValueError, r"top_p=1\.5 \(must be in \(0, 1\]\)"),
    ({"top_p": math.nan}, ValueError, "top_p must be finite"),
    ({"repetition_penalty": 0}, ValueError, "repetition_penalty=0.0"),
    ({"repetition_penalty": -math.inf}, ValueError, "repetition_penalty must be finite"),
    ({"seed": 2**70}, ValueError, r"seed must be in \[0, 2\*\*63\)"),
    ({"seed": -1}, ValueError, r"seed must be in \[0, 2\*\*63\)"),
    ({"seed": 1.0}, TypeError, "seed must be an int"),
    ({"stop_token_ids": "44"}, TypeError, "stop_token_ids must be an int or a list of ints"),
    ({"stop_token_ids": ["44"]}, TypeError, "stop_token_ids must be an int or a list of ints"),
    ({"stop_token_ids": [4.0]}, TypeError, "stop_token_ids must be an int or a list of ints"),
    ({"stop_token_ids": [True]}, TypeError, "stop_token_ids must be an int or a list of ints"),
    ({"stop_token_ids": [5, 10**6]}, ValueError, r"stop_token_ids \[1000000\] are outside the vocabulary"),
    ({"stop_token_ids": -3}, ValueError, r"stop_token_ids \[-3\] are outside the vocabulary"),
    ({"stop": 3}, TypeError, "stop must be a string or a list of strings"),
    ({"stop": ["a", None]}, TypeError, "stop must be a string or a list of strings"),
    ({"ignore_eos": "yes"}, TypeError, "ignore_eos must be True or False"),
    ({"stream": 1}, TypeError, "stream must be True or False"),
])
def test_bad_generation_options_are_named(model, kw, error, msg):
    with pytest.raises(error, match=msg):
        lmmrt.generate(model, "hi", **{"max_new_tokens": 2, **kw})


def test_numpy_scalars_are_accepted(model):
    ref = lmmrt.generate(model, "hello", max_new_tokens=8, temperature=0.8, top_k=5, seed=3, ignore_eos=True)[0]
    out = lmmrt.generate(model, "hello", max_new_tokens=np.int64(8), temperature=np.float32(0.8),
                         top_k=np.int32(5), seed=np.uint64(3), ignore_eos=True)[0]
    assert out.token_ids == ref.token_ids
    stop_at = ref.token_ids[3]
    a = lmmrt.generate(model, "hello", max_new_tokens=8, temperature=0.8, top_k=5, seed=3,
                       stop_token_ids=[np.int64(stop_at)])[0]
    b = lmmrt.generate(model, "hello", max_new_tokens=8, temperature=0.8, top_k=5, seed=3,
                       stop_token_ids=np.int16(stop_at))[0]
    assert a.token_ids == b.token_ids == ref.token_ids[:ref.token_ids.index(stop_at) + 1]
    assert a.finish_reason == "stop"


def test_normalized_values(model):
    args = check_generation_args(model, max_new_tokens=np.int64(3), temperature=1, stop="ab",
                                 stop_token_ids=np.int64(7), seed=2**63 - 1)
    assert type(args.max_new_tokens) is int and args.temperature == 1.0 and args.seed == 2**63 - 1
    assert args.stop_strings == ("ab",)
    assert args.stop_ids == {7, model.config.eos_token_id}
    assert check_generation_args(model, stop_token_ids=[7], ignore_eos=True).stop_ids == {7}


def test_stop_strings_need_a_tokenizer(model):
    from types import SimpleNamespace

    bare = SimpleNamespace(config=model.config, tokenizer=None)
    with pytest.raises(ValueError, match="stop strings need a tokenizer"):
        check_generation_args(bare, stop=["x"])
