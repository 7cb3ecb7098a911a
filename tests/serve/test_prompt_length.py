"""The prompt length the server assumes for a chat without max_tokens (the rest of the context is then
generated) is the length the engine's batch builder gives the same prompt, for each way media reach the LM
(IDEFICS's wrapped markers, OpenFlamingo's plain ones, LLaVA's markers expanded to feature positions)."""

from __future__ import annotations

import numpy as np
import pytest
from serve_util import FAMILIES, tiny_model

from lmmrt.runtime.batch import build_batch
from lmmrt.serve.prompt_length import prompt_length


@pytest.mark.parametrize("family", FAMILIES)
def test_prompt_length_is_the_batch_length(family):
    model = tiny_model(family)
    image = np.random.default_rng(0).integers(0, 256, (40, 50, 3), dtype=np.uint8)
    for prompt, n_images in [("User: hi\nAssistant:", 0), ("User: <image>and<image><image> differ?\nAssistant:", 3),
                             ([1, 40, 3, 41, 42], 1)]:
        batch = build_batch(model, [prompt], [[image] * n_images])
        assert prompt_length(model, prompt) == batch.lengths[0], (family, prompt)


@pytest.fixture(scope="module")
def mllama(tmp_path_factory):
    pytest.importorskip("transformers")
    from mllama_tokenizer import mllama_tokenizer
    from mllama_util import tiny_mllama

    import lmmrt
    from lmmrt.convert.mllama_files import convert_mllama

    d = tmp_path_factory.mktemp("mllama")
    tiny_mllama(seed=3).save_pretrained(d / "src")
    mllama_tokenizer().save(str(d / "src" / "tokenizer.json"))
    convert_mllama(d / "src", d / "out", progress=False)
    return lmmrt.load(d / "out", device="cpu", backend="torch", cuda_graph=False)


def test_mllama_chat_prompt_tokenizes_as_transformers(mllama):
    """Llama 3's template writes <|begin_of_text|> itself: the server's prompt (that BOS dropped, the batch
    builder putting one back) has transformers' apply_chat_template tokens, and its length is the batch's."""
    from mllama_tokenizer import CHAT_TEMPLATE
    from transformers.utils.chat_template_utils import render_jinja_template

    from lmmrt.serve.chat_template import ChatFormatter

    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "w5 w6"}]},
                {"role": "assistant", "content": [{"type": "text", "text": "w7"}]},
                {"role": "user", "content": [{"type": "text", "text": "w8"}, {"type": "image"}]}]
    prompt = ChatFormatter(mllama.config, mllama.tokenizer, CHAT_TEMPLATE).render(messages).text
    rendered = render_jinja_template([messages], chat_template=CHAT_TEMPLATE, add_generation_prompt=True,
                                     bos_token="<|begin_of_text|>")[0][0]
    image = np.random.default_rng(0).integers(0, 256, (30, 40, 3), dtype=np.uint8)
    batch = build_batch(mllama, [prompt], [[image, image]])
    ids = batch.tokens[0, int(batch.pad[0]):].tolist()
    assert ids == mllama.tokenizer.encode(rendered, add_special_tokens=False)
    assert prompt_length(mllama, prompt) == batch.lengths[0]
    raw = "<|begin_of_text|>w5 <|image|> w6"  # a completions prompt writing its BOS: not a second one
    assert prompt_length(mllama, raw) == build_batch(mllama, [raw], [[image]]).lengths[0] == 4
