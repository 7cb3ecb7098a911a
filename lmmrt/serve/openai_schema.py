"""The request bodies `lmmrt serve` accepts (OpenAI's chat and completions APIs, the subset lmmrt runs) and
the error body it answers with.

Unknown fields are refused (a typo such as `max_token` must not be silently ignored); OpenAI fields that
lmmrt does not run are refused by name, except a few that clients send at their no-op value on every
request (`presence_penalty: 0`, `logprobs: false`, ...), which are accepted at exactly that value.
"""

from __future__ import annotations

import math
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

MAX_STOP_STRINGS = 16
SEED_LIMIT = 2**63  # torch.Generator.manual_seed takes a signed 64-bit seed

# OpenAI fields lmmrt accepts only at their no-op value (what clients put in every request).
NO_OP_FIELDS = {"presence_penalty": 0, "frequency_penalty": 0, "logprobs": False, "parallel_tool_calls": None,
                "user": ...}  # ... = any value (a caller's own tag, informational)
# OpenAI fields lmmrt does not run: named in the error, so that a client knows it is not a typo.
UNSUPPORTED_FIELDS = ("tools", "tool_choice", "functions", "function_call", "response_format", "logit_bias",
                      "top_logprobs", "echo", "best_of", "suffix", "audio", "modalities", "prediction",
                      "reasoning_effort", "service_tier", "store", "metadata")


class APIError(Exception):
    """An error answered in OpenAI's shape: {"error": {"message", "type", "param", "code"}}."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def validation_message(e: ValidationError) -> tuple[str, str | None]:
    """(message, param) naming every field that is wrong, from pydantic's errors."""
    parts, param = [], None
    for err in e.errors():
        loc = ".".join(str(x) for x in err["loc"] if not str(x).startswith(("function-", "union[")))
        if param is None and loc:
            param = loc
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            field = str(err["loc"][-1])
            msg = (f"OpenAI's {field!r} is not supported by lmmrt serve" if field in UNSUPPORTED_FIELDS
                   else f"unknown field {field!r}")
            parts.append(f"{loc}: {msg}" if loc != field else msg)
        else:
            parts.append(f"{loc}: {msg}" if loc else msg)
    return "; ".join(parts), param


class _Strict(BaseModel):
    # strict: a JSON type that is not the field's is refused ("5" or 5.0 or true for max_tokens, "0.5" for
    # temperature, "yes" for stream), not coerced; a float field takes a JSON int
    model_config = ConfigDict(extra="forbid", strict=True)


class ImageURL(_Strict):
    url: str
    detail: Literal["auto", "low", "high"] | None = None  # OpenAI's resolution hint; lmmrt uses the model's own


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class ImagePart(_Strict):
    type: Literal["image_url"]
    image_url: ImageURL


ContentPart = Annotated[TextPart | ImagePart, Field(discriminator="type")]


class Message(_Strict):
    role: Literal["system", "user", "assistant", "developer"]
    content: str | list[ContentPart]
    name: str | None = None

    @model_validator(mode="after")
    def _images_only_from_the_user(self):
        if self.role != "user" and isinstance(self.content, list) and any(
                isinstance(p, ImagePart) for p in self.content):
            raise ValueError(f"a {self.role} message cannot hold images; send them in user messages")
        return self


class StreamOptions(_Strict):
    include_usage: bool = False


def _finite(name: str, v: float | None) -> float | None:
    if v is not None and not math.isfinite(v):
        raise ValueError(f"{name} must be a finite number, got {v}")
    return v


class _Sampling(_Strict):
    """The generation fields both endpoints share."""

    model: str
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float = Field(default=1.0, ge=0)
    top_p: float = Field(default=1.0, gt=0, le=1)
    top_k: int = Field(default=0, ge=-1)  # lmmrt / vLLM extension; -1 and 0 mean no limit
    stop: str | list[str] | None = None
    seed: int | None = Field(default=None, ge=0, lt=SEED_LIMIT)
    n: int = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    ignore_eos: bool = False  # lmmrt / vLLM extension: generate max_tokens tokens whatever is drawn
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logprobs: bool | int | None = None
    parallel_tool_calls: bool | None = None
    user: str | None = None

    @field_validator("temperature", "top_p", mode="before")
    @classmethod
    def _check_finite(cls, v, info):  # before the range check, which would say NaN is not >= 0
        return _finite(info.field_name, v) if isinstance(v, float) else v

    @field_validator("n")
    @classmethod
    def _one_choice(cls, v):
        if v != 1:
            raise ValueError(f"n must be 1 (lmmrt serve returns one choice per request), got {v}")
        return v

    @field_validator("stop")
    @classmethod
    def _stop_strings(cls, v):
        stops = [v] if isinstance(v, str) else (v or [])
        if len(stops) > MAX_STOP_STRINGS:
            raise ValueError(f"at most {MAX_STOP_STRINGS} stop strings, got {len(stops)}")
        if any(s == "" for s in stops):
            raise ValueError("stop strings must be non-empty")
        return stops

    @model_validator(mode="after")
    def _no_op_fields_only(self):
        for name, no_op in NO_OP_FIELDS.items():
            value = getattr(self, name)
            if no_op is not ... and value is not None and value != no_op:
                raise ValueError(f"{name}={value!r} is not supported by lmmrt serve (only {no_op!r})")
        if self.stream_options is not None and not self.stream:
            raise ValueError("stream_options is only allowed with stream=true")
        return self

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage

    @property
    def stop_list(self) -> list[str]:
        return list(self.stop or [])


class ChatCompletionRequest(_Sampling):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)  # OpenAI's newer name for max_tokens

    @model_validator(mode="after")
    def _one_max_tokens(self):
        if self.max_tokens is not None and self.max_completion_tokens is not None:
            raise ValueError("give max_tokens or max_completion_tokens, not both")
        if self.max_completion_tokens is not None:
            self.max_tokens = self.max_completion_tokens
        return self


class CompletionRequest(_Sampling):
    prompt: str | list[int] = Field(description="one prompt: text with the model's image markers, or token ids")
    max_tokens: int | None = Field(default=16, ge=1)  # OpenAI's default for completions
    # lmmrt extension: one image per marker in the prompt, in order, as data: URLs (file:// URLs with
    # --allowed-local-media-path); OpenAI's completions API has no images.
    images: list[str] = Field(default_factory=list)

    @field_validator("prompt")
    @classmethod
    def _non_empty(cls, v):
        if len(v) == 0:
            raise ValueError("the prompt is empty")
        if isinstance(v, list) and any(t < 0 for t in v):
            raise ValueError("token ids must be >= 0")
        return v


def _lone_surrogate(body: Any) -> str | None:
    """The place (as "messages.0.content") of the first string in `body` holding a lone UTF-16 surrogate
    (JSON's "\\ud800" escape decodes to one; it is no text, and the tokenizer fails deep inside on it), else
    None. Iterative: the body may be nested as deeply as the JSON parser allows."""
    todo: list[tuple[str, Any]] = [("", body)]
    while todo:
        where, value = todo.pop()
        if isinstance(value, str) and not value.isascii():  # ASCII (base64 images): no copy made
            try:
                value.encode("utf-8")
            except UnicodeEncodeError:
                return where
        elif isinstance(value, dict):
            todo += [(f"{where}.{k}" if where else str(k), v) for k, v in reversed(value.items())]
            todo += [(f"{where or 'the body'} (a key)", k) for k in value]  # checked first
        elif isinstance(value, list):
            todo += [(f"{where}.{i}" if where else str(i), v) for i, v in reversed(list(enumerate(value)))]
    return None


def parse_request(kind: type[_Sampling], body: Any) -> _Sampling:
    """The request body as `kind`, or an APIError(400) naming what is wrong."""
    if not isinstance(body, dict):
        raise APIError(400, f"the request body must be a JSON object, got {type(body).__name__}")
    where = _lone_surrogate(body)
    if where is not None:
        raise APIError(400, f"{where}: the string holds a lone UTF-16 surrogate (such as \\ud800 without its "
                            "pair), which is not text", param=where)
    if isinstance(body.get("prompt"), list) and body["prompt"] and not all(
            isinstance(t, int) and not isinstance(t, bool) for t in body["prompt"]):
        raise APIError(400, "prompt must be one string or one list of token ids (lmmrt serve takes one prompt "
                            "per request)", param="prompt")
    try:
        return kind.model_validate(body)
    except ValidationError as e:
        message, param = validation_message(e)
        raise APIError(400, message, param=param) from None
