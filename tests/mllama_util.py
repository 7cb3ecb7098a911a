"""Tiny random transformers Llama 3.2 Vision (Mllama) models for parity tests: a vision encoder with
local and global (gated) layers, intermediate-layer features, 2 tiles of 28x28 per image at most,
two aspect-ratio layouts; a LLaMA text model with GQA, llama3 RoPE scaling and two cross-attention
layers; every weight, norm, bias and tanh gate non-zero (randomize)."""

from __future__ import annotations

import torch
from random_init import randomize_parameters

IMAGE_ID = 90  # <|image|>, inside the text vocabulary (the real one is 128256 of 128264 rows)
VOCAB = 96
BOS, EOS, PAD = 1, 2, 0


def tiny_mllama_config(*, max_num_tiles: int = 2, image_size: int = 28, cross_attention_layers=(1, 3)):
    from transformers import MllamaConfig

    ratios = [[1, 1], [1, 2], [2, 1]] if max_num_tiles == 2 else None
    return MllamaConfig(
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_global_layers=2,
                           attention_heads=4, image_size=image_size, patch_size=7, max_num_tiles=max_num_tiles,
                           supported_aspect_ratios=ratios, intermediate_layers_indices=[0, 2],
                           vision_output_dim=32 * 3, norm_eps=1e-5),
        text_config=dict(vocab_size=VOCAB + 8, hidden_size=48, intermediate_size=80, num_hidden_layers=5,
                         num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-5,
                         max_position_embeddings=512, cross_attention_layers=list(cross_attention_layers),
                         rope_parameters=dict(rope_type="llama3", rope_theta=500000.0, factor=8.0,
                                              low_freq_factor=1.0, high_freq_factor=4.0,
                                              original_max_position_embeddings=64),
                         bos_token_id=BOS, eos_token_id=EOS, pad_token_id=PAD, tie_word_embeddings=False),
        image_token_index=IMAGE_ID)


def tiny_mllama(seed: int = 0, **kw):
    """A MllamaForConditionalGeneration with random weights and non-zero gates, fp32, eval."""
    from transformers import MllamaForConditionalGeneration

    torch.manual_seed(seed)
    model = MllamaForConditionalGeneration(tiny_mllama_config(**kw)).eval()
    randomize_parameters(model, torch.Generator().manual_seed(seed + 1), special=_large_gate)
    return model


def _large_gate(name: str, p: torch.nn.Parameter) -> bool:
    """Every tanh gate of magnitude 0.4..1.2 with a random sign: a small gate would hide a wrong branch."""
    if not (name.endswith("gate") or name.endswith("gate_attn") or name.endswith("gate_ffn")):
        return False
    with torch.no_grad():
        mag = 0.4 + 0.8 * torch.rand(p.shape)
        p.copy_(torch.where(torch.rand(p.shape) < 0.5, -mag, mag))
    return True
