"""How many positions a text prompt takes in the model, for a chat request without max_tokens (which then
gets the rest of the context, as in vLLM). The same tokenization Engine.submit applies (lmmrt.runtime's
marker expansion and family-specific encoding), without the images."""

from __future__ import annotations

from lmmrt.runtime.batch import expand_image_markers
from lmmrt.runtime.mllama_prompts import encode_mllama_prompt
from lmmrt.runtime.splice_prompts import encode_prompt


def prompt_length(model, prompt: str | list[int]) -> int:
    cfg = model.config
    if isinstance(prompt, list):
        ids = prompt
    elif cfg.family == "mllama":
        ids = encode_mllama_prompt(model.tokenizer, prompt, cfg)
    else:
        ids = encode_prompt(model.tokenizer, expand_image_markers(prompt, cfg), cfg)
    if cfg.media_feed == "splice":  # each marker becomes the connector's feature positions
        return len(ids) + ids.count(cfg.image_token_id) * (cfg.media_tokens - 1)
    return len(ids)
