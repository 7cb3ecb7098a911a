"""lmmrt serve's chat prompts: a checkpoint's Jinja template renders as transformers' apply_chat_template
renders it (transformers' render_jinja_template is the reference), and without one each family's format."""

from __future__ import annotations

import pytest

pytest.importorskip("jinja2")

from lmmrt.demo import char_tokenizer, demo_config  # noqa: E402
from lmmrt.errors import CheckpointError  # noqa: E402
from lmmrt.runtime.tokenizer import Tokenizer  # noqa: E402
from lmmrt.serve.chat_template import ChatFormatter, read_chat_template  # noqa: E402
from lmmrt.serve.openai_schema import APIError  # noqa: E402

# llava-hf/llava-1.5-7b-hf's template: images first in each turn, {% generation %}-free variant
LLAVA = ("{% for message in messages %}{% if message['role'] != 'system' %}{{ message['role'].upper() + ': '}}"
         "{% endif %}{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}"
         "{{ '<image>\n' }}{% endfor %}{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
         "{{ content['text'] + ' '}}{% endfor %}{% endfor %}{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}")
# Idefics2's, with whitespace control that trim_blocks / lstrip_blocks change, tojson and raise_exception
IDEFICS2 = """{% for message in messages %}
    {% if message['role'] not in ['user', 'assistant', 'system'] %}{{ raise_exception('bad role ' + message['role']) }}{% endif %}
    {{ message['role'].capitalize() }}{% if message['content'][0]['type'] == 'image' %}{{':'}}{% else %}{{': '}}{% endif %}
    {% for line in message['content'] %}
        {% if line['type'] == 'text' %}{{ line['text'] }}{% elif line['type'] == 'image' %}{{ '<image>' }}{% endif %}
    {% endfor %}
<end_of_utterance>{{ {'n': loop.index, 'q': '<"&>'} | tojson }}
{% endfor %}
{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}"""
WITH_BOS = "{{ bos_token }}{% for m in messages %}{{ m['content'] }}{{ eos_token }}{% endfor %}"

MESSAGES = [
    {"role": "system", "content": [{"type": "text", "text": "Be brief."}]},
    {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is this?"}, {"type": "image"}]},
    {"role": "assistant", "content": [{"type": "text", "text": "Two squares."}]},
    {"role": "user", "content": [{"type": "text", "text": "And now <b>\u00e9</b>?"}]},
]


@pytest.fixture(scope="module")
def tokenizer():
    return Tokenizer(char_tokenizer())


@pytest.fixture(scope="module")
def config(tokenizer):
    return demo_config(tokenizer._tok.get_vocab_size())


def reference(template: str, messages, tokenizer) -> str:
    from transformers.utils.chat_template_utils import render_jinja_template

    rendered, _ = render_jinja_template([messages], chat_template=template, add_generation_prompt=True,
                                        bos_token=tokenizer.decode([1], skip_special_tokens=False),
                                        eos_token=tokenizer.decode([2], skip_special_tokens=False))
    return rendered[0]


@pytest.mark.parametrize("template", [LLAVA, IDEFICS2], ids=["llava", "idefics2"])
def test_template_renders_as_transformers(template, config, tokenizer):
    got = ChatFormatter(config, tokenizer, template).render(MESSAGES)
    assert got.text == reference(template, MESSAGES, tokenizer)
    assert got.text.count("<image>") == 2


def test_template_bos_is_not_doubled(config, tokenizer):
    """The tokenizer adds BOS itself: the template's leading BOS text is dropped, the rest kept."""
    msgs = [{"role": "user", "content": "hi"}]
    ref = reference(WITH_BOS, msgs, tokenizer)
    assert ref.startswith("<s>")
    got = ChatFormatter(config, tokenizer, WITH_BOS).render(msgs).text
    assert got == ref[len("<s>"):] and got.endswith("</s>")


def test_template_raise_exception_is_a_400(config, tokenizer):
    with pytest.raises(APIError, match="bad role developer") as e:
        ChatFormatter(config, tokenizer, IDEFICS2).render([{"role": "developer", "content": [
            {"type": "text", "text": "x"}]}])
    assert e.value.status == 400


def test_marker_in_text_is_refused(config, tokenizer):
    with pytest.raises(APIError, match="image marker '<image>'"):
        ChatFormatter(config, tokenizer, None).render([{"role": "user", "content": "look: <image>"}])


def test_family_formats(config, tokenizer):
    msgs = MESSAGES[1:]
    expect = {
        "idefics": "User: <image>What is this?<image><end_of_utterance>\nAssistant: Two squares.<end_of_utterance>\n"
                   "User: And now <b>\u00e9</b>?<end_of_utterance>\nAssistant:",
        "llava": "USER: <image>\n<image>\nWhat is this? ASSISTANT: Two squares. USER: And now <b>\u00e9</b>? ASSISTANT:",
        "openflamingo": "<image>What is this?<image>Two squares.<|endofchunk|>And now <b>\u00e9</b>?",
    }
    for family, text in expect.items():
        config.family = family
        try:
            assert ChatFormatter(config, tokenizer, None).render(msgs).text == text, family
        finally:
            config.family = "idefics"


def test_template_files(tmp_path):
    assert read_chat_template(tmp_path) is None
    (tmp_path / "chat_template.json").write_text('{"chat_template": [{"name": "default", "template": "T"}]}')
    assert read_chat_template(tmp_path) == "T"
    (tmp_path / "chat_template.jinja").write_text("J")  # the .jinja file wins, as in transformers
    assert read_chat_template(tmp_path) == "J"
    (tmp_path / "chat_template.jinja").write_text("{% for %}")
    with pytest.raises(CheckpointError, match="not a valid Jinja template"):
        ChatFormatter(demo_config(100), None, read_chat_template(tmp_path))
