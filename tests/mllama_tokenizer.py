"""A Llama-3-style word-level tokenizer for tests/mllama_util's tiny Mllama (vocabulary 96): the special
tokens where the tiny model has them (pad 0, <|begin_of_text|> 1, <|eot_id|> 2, <|image|> 90), a
post-processor that adds <|begin_of_text|> as Llama 3's does, words w3..w89, and a Llama 3.2 Vision
style chat template."""

from __future__ import annotations

from mllama_util import BOS, EOS, IMAGE_ID, PAD

SPECIALS = {"<|finetune_right_pad_id|>": PAD, "<|begin_of_text|>": BOS, "<|eot_id|>": EOS, "<|image|>": IMAGE_ID,
            "<|start_header_id|>": 91, "<|end_header_id|>": 92, "<|python_tag|>": 93, "<|end_of_text|>": 94}
WORDS = {"user": 3, "assistant": 4, **{f"w{i}": i for i in range(5, IMAGE_ID)}}
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n"
    "{% for c in m['content'] %}{% if c['type'] == 'image' %}<|image|>{% else %}{{ c['text'] }}{% endif %}"
    "{% endfor %}<|eot_id|>{% endfor %}{% if add_generation_prompt %}<|start_header_id|>assistant"
    "<|end_header_id|>\n\n{% endif %}")


def mllama_tokenizer():
    """A tokenizers.Tokenizer: "w7 w8" -> [1, 7, 8] with special tokens, [7, 8] without."""
    from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers, processors

    tok = Tokenizer(models.WordLevel({**WORDS, **SPECIALS, "<unk>": 95}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIALS])
    tok.post_processor = processors.TemplateProcessing(single="<|begin_of_text|> $A",
                                                       special_tokens=[("<|begin_of_text|>", BOS)])
    return tok
