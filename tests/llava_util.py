"""Tiny random transformers LLaVA-1.5 models for parity tests: CLIP tower, GELU projector with
biases, LLaMA with grouped-query attention; every weight, norm and bias non-zero."""

from __future__ import annotations

import torch
from random_init import randomize

IMAGE_ID = 90  # inside the LM's vocabulary of 96, as llava-hf's <image> (32000 of 32064)
VOCAB = 96


def tiny_llava_config(*, feature_layer=-2, strategy="default", image_size=28):
    from transformers import LlavaConfig

    return LlavaConfig(
        vision_config=dict(model_type="clip_vision_model", hidden_size=32, intermediate_size=64,
                           num_hidden_layers=3, num_attention_heads=4, image_size=image_size, patch_size=7,
                           hidden_act="quick_gelu", projection_dim=16),
        text_config=dict(model_type="llama", vocab_size=VOCAB, hidden_size=48, intermediate_size=80,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=256, rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2,
                         pad_token_id=0, tie_word_embeddings=False),
        image_token_id=IMAGE_ID, vision_feature_layer=feature_layer, vision_feature_select_strategy=strategy,
        projector_hidden_act="gelu", pad_token_id=0)


def tiny_llava(seed=0, **kw):
    """A LlavaForConditionalGeneration with random weights (norms around 1, non-zero biases), fp32, eval."""
    from transformers import LlavaForConditionalGeneration

    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(tiny_llava_config(**kw)).eval()
    randomize(model, seed + 1)
    return model


def expanded(ids: list[int], n: int) -> list[int]:
    """What LLaVA's processor puts in input_ids: each <image> repeated once per feature token."""
    out = []
    for t in ids:
        out.extend([t] * n if t == IMAGE_ID else [t])
    return out


def hf_prompt_logits(model, ids: list[int], pixels: torch.Tensor | None, n_features: int) -> torch.Tensor:
    """transformers' logits (T, V) for one prompt whose images are `pixels` (N, 3, S, S)."""
    input_ids = torch.tensor([expanded(ids, n_features)])
    with torch.no_grad():
        out = model(input_ids=input_ids, pixel_values=pixels)
    return out.logits[0].float()
