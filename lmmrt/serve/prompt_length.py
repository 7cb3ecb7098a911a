"""How many positions a text prompt takes in the model, for a chat request without max_tokens (which then
gets the rest of the context, as in vLLM). The same tokenization Engine.submit applies (lmmrt.runtime's
marker expansion and family-specific encoding), without the images."""

from __future__ import annotations

from lmmrt.runtime.batch import encode_text_prompt


def prompt_length(model, prompt: str | list[int]) -> int:
    cfg = model.config
    ids = prompt if isinstance(prompt, list) else encode_text_prompt(model, prompt)
    if cfg.media_feed == "splice":  # each marker becomes the connector's feature positions
        return len(ids) + ids.count(cfg.image_token_id) * (cfg.media_tokens - 1)
    return len(ids)
