"""Chat messages -> one prompt with lmmrt's image markers, for /v1/chat/completions.

With the checkpoint's own Jinja template (chat_template.jinja, as `lmmrt convert` keeps it, or
chat_template.json), rendered as transformers' apply_chat_template renders it: a sandboxed environment
with trim_blocks and lstrip_blocks, raise_exception, strftime_now, a tojson that does not escape HTML,
the special tokens as bos_token / eos_token / ..., add_generation_prompt=True, and each image as a
{"type": "image"} content part, for which the template writes the model's marker. Without a template,
each family's documented prompt format (FAMILY_FORMATS; docs/serve.md lists them).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from lmmrt.errors import CheckpointError
from lmmrt.serve.openai_schema import APIError

TEMPLATE_FILES = ("chat_template.jinja", "chat_template.json")


def read_chat_template(model_dir) -> str | None:
    """The checkpoint's chat template: chat_template.jinja, else chat_template.json's "chat_template" (a
    string, or a list of named templates of which "default" is taken); None when it has neither."""
    d = Path(model_dir)
    jinja_file, json_file = (d / name for name in TEMPLATE_FILES)
    try:
        if jinja_file.is_file():
            return jinja_file.read_text(encoding="utf-8")
        if not json_file.is_file():
            return None
        data = json.loads(json_file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise CheckpointError(f"cannot read the chat template in {d}: {e}") from None
    tpl = data.get("chat_template") if isinstance(data, dict) else None
    if isinstance(tpl, list):
        tpl = next((t.get("template") for t in tpl if isinstance(t, dict) and t.get("name") == "default"), None)
    if not isinstance(tpl, str):
        raise CheckpointError(f"{json_file} has no \"chat_template\" string (nor a list with a \"default\" one)")
    return tpl


def compile_template(source: str, where: str = "the chat template"):
    """A jinja2 Template in transformers' environment; a syntax error is a CheckpointError naming it."""
    import jinja2
    import jinja2.ext
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        # jinja's own tojson escapes HTML characters (< becomes \u003c), which transformers' does not
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    try:
        return env.from_string(source)
    except jinja2.exceptions.TemplateSyntaxError as e:
        raise CheckpointError(f"{where} is not a valid Jinja template: {e.message} (line {e.lineno})") from None


def _text(content) -> str:
    return content if isinstance(content, str) else "".join(p["text"] for p in content if p["type"] == "text")


def _images(content) -> int:
    return 0 if isinstance(content, str) else sum(p["type"] == "image" for p in content)


def _inline(content, marker: str) -> str:
    """Text and images in their order, each image as the marker."""
    if isinstance(content, str):
        return content
    return "".join(p["text"] if p["type"] == "text" else marker for p in content)


def _idefics(messages, marker):
    # IDEFICS-instruct's format (its model card): "User: ...<end_of_utterance>\nAssistant: ...<end_of_utterance>\n"
    out = []
    for m in messages:
        if m["role"] in ("system", "developer"):
            out.append(_text(m["content"]) + "\n\n")
        else:
            who = "User" if m["role"] == "user" else "Assistant"
            out.append(f"{who}: {_inline(m['content'], marker)}<end_of_utterance>\n")
    return "".join(out) + "Assistant:"


def _openflamingo(messages, marker):
    # no chat format: text and images in order, each answer closed by <|endofchunk|>, as its few-shot prompts
    out = []
    for m in messages:
        out.append(_inline(m["content"], marker) + ("<|endofchunk|>" if m["role"] == "assistant" else ""))
    return "".join(out)


def _llava(messages, marker):
    # LLaVA-1.5 (llava-hf's template): "USER: <image>\n... ASSISTANT: ...", images first in each turn
    out = []
    for m in messages:
        prefix = "" if m["role"] in ("system", "developer") else m["role"].upper() + ": "
        out.append(prefix + (marker + "\n") * _images(m["content"]) + _text(m["content"]) + " ")
    return "".join(out) + "ASSISTANT:"


def _blip2(messages, marker):
    # BLIP-2's VQA prompt, "Question: ... Answer:", the images first (lmmrt puts them before BOS)
    out = [marker * sum(_images(m["content"]) for m in messages)]
    for m in messages:
        text = _text(m["content"])
        if m["role"] == "user":
            out.append(f"Question: {text} ")
        elif m["role"] == "assistant":
            out.append(f"Answer: {text} ")
        else:
            out.append(text + " ")
    return "".join(out) + "Answer:"


def _minigpt4(messages, marker):
    # MiniGPT-4's CONV_VISION: "<system>###Human: <Img><ImageHere></Img> ...###Assistant: ...###"
    out = []
    for m in messages:
        if m["role"] in ("system", "developer"):
            out.append(_text(m["content"]))
            continue
        who = "Human" if m["role"] == "user" else "Assistant"
        body = f"<Img>{marker}</Img> " * _images(m["content"]) + _text(m["content"])
        out.append(f"###{who}: {body}")
    return "".join(out) + "###Assistant:"


def _mllama(messages, marker):
    # Llama 3's header format; the tokenizer adds <|begin_of_text|>
    out = []
    for m in messages:
        role = "system" if m["role"] == "developer" else m["role"]
        out.append(f"<|start_header_id|>{role}<|end_header_id|>\n\n{_inline(m['content'], marker)}<|eot_id|>")
    return "".join(out) + "<|start_header_id|>assistant<|end_header_id|>\n\n"


# family -> (format, stop strings the format implies)
FAMILY_FORMATS = {"idefics": (_idefics, ()), "openflamingo": (_openflamingo, ()), "llava": (_llava, ()),
                  "blip2": (_blip2, ()), "minigpt4": (_minigpt4, ("###",)), "mllama": (_mllama, ())}


@dataclass
class ChatPrompt:
    text: str  # with one image marker per image, in order
    stop: tuple[str, ...]  # stop strings the format implies (MiniGPT-4's ###)


class ChatFormatter:
    """Renders a request's messages for one model: its template, else its family's format."""

    def __init__(self, config, tokenizer, template_source: str | None):
        self.marker = config.image_token
        self.family = config.family
        self.template = compile_template(template_source) if template_source is not None else None
        if self.template is None and config.family not in FAMILY_FORMATS:
            raise CheckpointError(f"no chat template in the checkpoint and no default format for family "
                                  f"{config.family!r}: add a chat_template.jinja, or use /v1/completions")
        special = {"bos_token": config.bos_token_id, "eos_token": config.eos_token_id,
                   "pad_token": config.pad_token_id}
        self.special_tokens = {name: tokenizer.decode([tid], skip_special_tokens=False)
                               for name, tid in special.items() if tid is not None and tokenizer is not None}
        # The prompt is tokenized with the tokenizer's own special tokens: a BOS the template writes as
        # text would be a second one (transformers tokenizes the rendered text without adding any).
        bos = self.special_tokens.get("bos_token")
        self.strip_bos = bool(bos) and tokenizer is not None and config.bos_token_id is not None and \
            tokenizer.encode("a")[:1] == [config.bos_token_id]
        self.bos_text = bos

    @property
    def source(self) -> str:
        return "the checkpoint's chat template" if self.template is not None else f"the {self.family} format"

    def render(self, messages: list[dict]) -> ChatPrompt:
        """messages: [{"role", "content": str | [{"type": "text", "text"} | {"type": "image"}]}] -> the prompt.
        The messages' text may not hold the marker itself (it would be an image without pixels)."""
        for i, m in enumerate(messages):
            if self.marker in _text(m["content"]):
                raise APIError(400, f"messages[{i}]: the text holds the image marker {self.marker!r}; send images "
                                    "as image_url content parts", param=f"messages[{i}].content")
        if self.template is None:
            fmt, stop = FAMILY_FORMATS[self.family]
            return ChatPrompt(fmt(messages, self.marker), stop)
        import jinja2

        try:
            text = self.template.render(messages=messages, add_generation_prompt=True, **self.special_tokens)
        except jinja2.exceptions.TemplateError as e:
            raise APIError(400, f"the model's chat template refused the messages: {e}", param="messages") from None
        if self.strip_bos and text.startswith(self.bos_text):
            text = text[len(self.bos_text):]
        return ChatPrompt(text, ())


def openai_messages_to_template(messages) -> tuple[list[dict], list[tuple[str, str]]]:
    """Pydantic chat messages -> the template's plain messages and the (url, where) of each image, in order."""
    plain, urls = [], []
    for i, m in enumerate(messages):
        if isinstance(m.content, str):
            content = m.content
        else:
            content = []
            for j, part in enumerate(m.content):
                if part.type == "text":
                    content.append({"type": "text", "text": part.text})
                else:
                    content.append({"type": "image"})
                    urls.append((part.image_url.url, f"messages[{i}].content[{j}]"))
        plain.append({"role": m.role, "content": content})
    return plain, urls
