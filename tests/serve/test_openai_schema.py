"""Request bodies of lmmrt serve: OpenAI's fields as lmmrt runs them, and a 400 naming each field that is
wrong (unknown, unsupported, out of range)."""

from __future__ import annotations

import pytest

from lmmrt.serve.openai_schema import APIError, ChatCompletionRequest, CompletionRequest, parse_request

CHAT = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}


def bad(kind, body, match: str):
    with pytest.raises(APIError, match=match) as e:
        parse_request(kind, body)
    assert e.value.status == 400


def test_defaults_and_aliases():
    r = parse_request(ChatCompletionRequest, {**CHAT, "max_completion_tokens": 7, "top_k": -1,
                                              "presence_penalty": 0, "frequency_penalty": 0.0, "logprobs": False,
                                              "user": "me", "stop": "x"})
    assert (r.max_tokens, r.top_k, r.stop_list, r.temperature, r.include_usage) == (7, -1, ["x"], 1.0, False)
    c = parse_request(CompletionRequest, {"model": "m", "prompt": [1, 2], "stream": True,
                                          "stream_options": {"include_usage": True}})
    assert (c.max_tokens, c.include_usage, c.images) == (16, True, [])


def test_bad_fields_are_named():
    bad(ChatCompletionRequest, {**CHAT, "max_token": 5}, "unknown field 'max_token'")
    bad(ChatCompletionRequest, {**CHAT, "response_format": {}}, "'response_format' is not supported")
    bad(ChatCompletionRequest, {**CHAT, "presence_penalty": 0.5}, "presence_penalty=0.5 is not supported")
    bad(ChatCompletionRequest, {**CHAT, "temperature": "hot"}, "temperature")
    bad(ChatCompletionRequest, {**CHAT, "temperature": float("inf")}, "temperature")
    bad(ChatCompletionRequest, {**CHAT, "top_k": -2}, "top_k")
    bad(ChatCompletionRequest, {**CHAT, "seed": 2**63}, "seed")
    bad(ChatCompletionRequest, {**CHAT, "max_tokens": 0}, "max_tokens")
    bad(ChatCompletionRequest, {**CHAT, "max_tokens": 4, "max_completion_tokens": 4}, "not both")
    bad(ChatCompletionRequest, {**CHAT, "stop": ["a"] * 17}, "at most 16 stop strings")
    bad(ChatCompletionRequest, {**CHAT, "stop": [""]}, "non-empty")
    bad(ChatCompletionRequest, {**CHAT, "stream_options": {"include_usage": True}}, "only allowed with stream")
    bad(ChatCompletionRequest, {**CHAT, "messages": []}, "messages")
    bad(ChatCompletionRequest, {**CHAT, "messages": [{"role": "tool", "content": "x"}]}, "role")
    bad(ChatCompletionRequest, {**CHAT, "messages": [{"role": "assistant", "content": [
        {"type": "image_url", "image_url": {"url": "data:,"}}]}]}, "cannot hold images")
    bad(ChatCompletionRequest, [1, 2], "must be a JSON object")
    bad(CompletionRequest, {"model": "m", "prompt": ["a", "b"]}, "one prompt per request")
    bad(CompletionRequest, {"model": "m", "prompt": ""}, "the prompt is empty")
    bad(CompletionRequest, {"model": "m", "prompt": [1, -1]}, "token ids must be >= 0")
    bad(CompletionRequest, {"prompt": "x"}, "model")


@pytest.mark.parametrize("field, value, kind", [
    ("max_tokens", "5", "integer"), ("max_tokens", 5.0, "integer"), ("max_tokens", True, "integer"),
    ("temperature", "0.5", "number"), ("stream", "yes", "boolean"), ("seed", "1", "integer"),
    ("top_k", 1.0, "integer")])
def test_wrong_json_types_are_refused_naming_the_field(field, value, kind):
    """Strict types: pydantic's lax mode turned "5", 5.0 and true into max_tokens=5 (or 1)."""
    with pytest.raises(APIError, match=rf"^{field}: Input should be a valid {kind}") as e:
        parse_request(ChatCompletionRequest, {**CHAT, field: value})
    assert e.value.param == field


def test_floats_take_json_ints_and_nan_is_said_to_be_not_finite():
    r = parse_request(ChatCompletionRequest, {**CHAT, "temperature": 1, "top_p": 1})
    assert (r.temperature, r.top_p) == (1.0, 1.0) and isinstance(r.temperature, float)
    bad(ChatCompletionRequest, {**CHAT, "temperature": float("nan")}, "temperature must be a finite number")
    bad(ChatCompletionRequest, {**CHAT, "top_p": float("nan")}, "top_p must be a finite number")


def test_a_lone_surrogate_is_refused_naming_its_place():
    """json.loads turns the escape "\\ud800" into a lone surrogate, which the tokenizer refused deep inside
    ("TextInputSequence must be str")."""
    bad(ChatCompletionRequest, {**CHAT, "messages": [{"role": "user", "content": "x \ud800 y"}]},
        r"^messages\.0\.content: the string holds a lone UTF-16 surrogate")
    parts = [{"type": "text", "text": "ok"}, {"type": "text", "text": "\udfff"}]
    bad(ChatCompletionRequest, {**CHAT, "messages": [{"role": "user", "content": parts}]},
        r"^messages\.0\.content\.1\.text: ")
    bad(CompletionRequest, {"model": "m", "prompt": "a", "\ud800": 1}, r"^the body \(a key\): ")
    assert parse_request(ChatCompletionRequest, {**CHAT, "user": "\U0001f600 \u00e9"}).user == "\U0001f600 \u00e9"
