"""Tiny random transformers IDEFICS models for parity tests, with non-zero gates."""

from __future__ import annotations

import torch
from random_init import randomize_parameters


def tiny_idefics_config(*, qk_layer_norms=False, alpha_type="float", cross_layer_interval=1,
                        qk_layer_norms_perceiver=False, use_resampler=True, layers=4):
    from transformers import IdeficsConfig

    return IdeficsConfig(
        vocab_size=96, additional_vocab_size=2, hidden_size=64, intermediate_size=112,
        num_hidden_layers=layers, num_attention_heads=4, max_position_embeddings=256,
        cross_layer_interval=cross_layer_interval, qk_layer_norms=qk_layer_norms, alpha_type=alpha_type,
        alpha_initializer="zeros", use_resampler=use_resampler, tie_word_embeddings=False,
        bos_token_id=1, eos_token_id=2, pad_token_id=0,
        vision_config=dict(embed_dim=48, image_size=28, patch_size=7, num_hidden_layers=2, num_attention_heads=4,
                           intermediate_size=96, hidden_act="gelu"),
        perceiver_config=dict(use_resampler=use_resampler, resampler_n_latents=8, resampler_depth=2,
                              resampler_n_heads=2, resampler_head_dim=16,
                              qk_layer_norms_perceiver=qk_layer_norms_perceiver),
    )


def tiny_idefics(seed=0, **kw):
    """An IdeficsForVisionText2Text with random weights, random norms and non-zero gates, fp32, eval."""
    from transformers import IdeficsForVisionText2Text

    torch.manual_seed(seed)
    cfg = tiny_idefics_config(**kw)
    model = IdeficsForVisionText2Text(cfg).eval()
    g = torch.Generator().manual_seed(seed + 1)

    def nonzero_gates(name: str, p: torch.nn.Parameter) -> bool:
        if not name.endswith(("alpha_cross_attn", "alpha_dense")):
            return False
        # zeros at construction (alpha_initializer="normal" crashes), then non-zero gates
        p.copy_((torch.rand(p.shape, generator=g) * 0.8 + 0.4) * torch.sign(torch.randn(p.shape, generator=g)))
        return True

    randomize_parameters(model, g, special=nonzero_gates)
    return model


IMAGE_ID = 97  # vocab 96 + 2 additional: IDEFICS's convention, the last additional token


def hf_inputs(ids_list, n_images_list, pixels_list, *, eos_id=2):
    """Left-padded batch inputs for IdeficsForVisionText2Text, with the processor's image mask."""
    from transformers.models.idefics.processing_idefics import image_attention_mask_for_packed_input_ids

    class _Tok:
        eos_token_id = eos_id

        def convert_tokens_to_ids(self, _):
            return IMAGE_ID

    B, T = len(ids_list), max(len(x) for x in ids_list)
    input_ids = torch.zeros(B, T, dtype=torch.long)
    attn = torch.zeros(B, T, dtype=torch.long)
    for b, ids in enumerate(ids_list):
        input_ids[b, T - len(ids):] = torch.tensor(ids)
        attn[b, T - len(ids):] = 1
    max_imgs = max(1, max(n_images_list))
    inc, _ = image_attention_mask_for_packed_input_ids(input_ids, _Tok(), "pt")
    img_mask = torch.zeros(B, T, max_imgs, dtype=torch.long)
    for b in range(B):
        for t in range(T):
            if inc[b, t] >= 0:
                img_mask[b, t, inc[b, t]] = 1
    S = pixels_list[0].shape[-1] if any(n for n in n_images_list) else 28
    pixel_values = torch.zeros(B, max_imgs, 3, S, S)
    for b, px in enumerate(pixels_list):
        if px is not None and len(px):
            pixel_values[b, : len(px)] = px
    return dict(input_ids=input_ids, attention_mask=attn, pixel_values=pixel_values, image_attention_mask=img_mask)
