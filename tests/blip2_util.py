"""Tiny random transformers Blip2ForConditionalGeneration (OPT) models, non-zero everything, for
the BLIP-2 and MiniGPT-4 tests."""

from __future__ import annotations

import torch
from random_init import randomize  # also imported from here by the BLIP-2 / MiniGPT-4 tests

IMAGE_TOKEN_ID = 3  # an id of the tiny vocabulary, as processors add "<image>" to the tokenizer
N_QUERIES = 5


def tiny_blip2(seed: int = 0, *, opt: dict | None = None, cross_attention_frequency: int = 2):
    """A Blip2ForConditionalGeneration with an OPT LM: ViT 2 layers of width 40 on 28 px images
    (patch 7: 17 tokens), Q-Former 3 layers of width 32 with N_QUERIES queries, OPT of width 48.
    opt: OPTConfig overrides (do_layer_norm_before, word_embed_proj_dim, ...)."""
    from transformers import Blip2Config, Blip2ForConditionalGeneration

    torch.manual_seed(seed)
    text = dict(model_type="opt", vocab_size=64, hidden_size=48, ffn_dim=72, num_hidden_layers=2,
                num_attention_heads=4, max_position_embeddings=40, bos_token_id=2, eos_token_id=2, pad_token_id=1,
                activation_function="relu", do_layer_norm_before=True, word_embed_proj_dim=48)
    text.update(opt or {})
    cfg = Blip2Config(
        vision_config=dict(hidden_size=40, intermediate_size=56, num_hidden_layers=2, num_attention_heads=4,
                           image_size=28, patch_size=7, layer_norm_eps=1e-6),
        qformer_config=dict(hidden_size=32, num_hidden_layers=3, num_attention_heads=4, intermediate_size=44,
                            cross_attention_frequency=cross_attention_frequency, encoder_hidden_size=40,
                            vocab_size=50, max_position_embeddings=16),
        text_config=text, num_query_tokens=N_QUERIES, image_token_index=IMAGE_TOKEN_ID)
    model = Blip2ForConditionalGeneration(cfg).eval()
    randomize(model, seed + 1)
    return model
