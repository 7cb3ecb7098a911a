"""Tiny random lmmrt models for the serving-engine tests, one per way media reach the LM, with the
demo's character tokenizer: IDEFICS-style (LLaMA, GQA, immediate mask), OpenFlamingo-style (MPT
with ALiBi, cumulative mask, vector gates), LLaVA-style (an MLP connector spliced into a LLaMA) and
BLIP-2-style (a Q-Former spliced into an OPT: learned positions, project_in/out).
Small enough that a 16-request test runs in seconds on a 2-core CPU, random enough (std 0.02 on
narrow layers) that greedy outputs vary from token to token."""

from __future__ import annotations

import numpy as np

from lmmrt.api import Model
from lmmrt.demo import char_tokenizer
from lmmrt.models.config import DecoderConfig, ModelConfig, PerceiverConfig, VisionConfig, XAttnConfig
from lmmrt.models.connector_config import ConnectorConfig
from lmmrt.models.random_init import random_model
from lmmrt.runtime.tokenizer import Tokenizer

FAMILIES = ("idefics", "openflamingo", "llava", "blip2")
_VISION = dict(image_size=28, patch_size=14, width=32, layers=1, heads=2, mlp_dim=64, act="gelu")


def tiny_config(family: str, vocab: int) -> ModelConfig:
    common = dict(image_token_id=3, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    if family == "idefics":
        return ModelConfig(
            vision=VisionConfig(**_VISION),
            perceiver=PerceiverConfig(dim=32, depth=1, heads=2, head_dim=16, n_latents=8, mlp_dim=64,
                                      mlp_act="relu", qk_norm=True),
            decoder=DecoderConfig(family="llama", vocab_size=vocab, dim=64, layers=3, heads=4, kv_heads=2,
                                  ffn_dim=96, max_seq_len=256),
            xattn=XAttnConfig(style="idefics", layers=[0, 2], heads=4, head_dim=16, media_dim=32, ffn_dim=96,
                              qk_norm=True, mask_mode="immediate"),
            family="idefics", image_prompt_template="<fake_token_around_image>{image}<fake_token_around_image>",
            **common)
    if family == "openflamingo":
        return ModelConfig(
            vision=VisionConfig(**_VISION),
            perceiver=PerceiverConfig(dim=32, depth=1, heads=2, head_dim=16, n_latents=8, mlp_dim=64, mlp_act="gelu"),
            decoder=DecoderConfig(family="mpt", vocab_size=vocab, dim=64, layers=2, heads=4, kv_heads=4, ffn_dim=128,
                                  max_seq_len=256, act="gelu", alibi=True),
            xattn=XAttnConfig(style="openflamingo", layers=[1], heads=4, head_dim=16, media_dim=32, ffn_dim=128,
                              gate_type="vector", mask_mode="cumulative"),
            family="openflamingo", reset_media_after_eos=False, **common)
    if family == "llava":
        return ModelConfig(
            vision=VisionConfig(**_VISION), perceiver=None,
            decoder=DecoderConfig(family="llama", vocab_size=vocab, dim=64, layers=2, heads=4, kv_heads=4,
                                  ffn_dim=96, max_seq_len=256),
            xattn=XAttnConfig(layers=[], media_dim=32), family="llava", media_feed="splice",
            connector=ConnectorConfig(kind="mlp", in_dim=32, hidden_dim=48, out_dim=64), **common)
    if family == "blip2":
        return ModelConfig(
            vision=VisionConfig(**_VISION), perceiver=None,
            decoder=DecoderConfig(family="opt", vocab_size=vocab, dim=64, layers=2, heads=4, ffn_dim=96, act="relu",
                                  norm_eps=1e-5, norm_bias=True, max_seq_len=256, tie_embeddings=True, embed_dim=48),
            xattn=XAttnConfig(layers=[], media_dim=32), family="blip2", media_feed="splice",
            connector=ConnectorConfig(kind="qformer", in_dim=32, hidden_dim=48, out_dim=48, queries=4, layers=2,
                                      heads=2, mlp_dim=64),
            **common)
    raise ValueError(family)


def tiny_model(family: str, *, seed: int = 3) -> Model:
    tok = char_tokenizer()
    cfg = tiny_config(family, tok.get_vocab_size())
    return Model(random_model(cfg, seed=seed), cfg, Tokenizer(tok), backend="torch", cuda_graph=False)


def images(n: int, seed: int) -> list[np.ndarray]:
    """n random uint8 pictures of varied sizes."""
    g = np.random.default_rng(seed)
    return [g.integers(0, 256, size=(20 + 7 * i, 30 + 5 * i, 3), dtype=np.uint8) for i in range(n)]


def mixed_requests(n: int, *, seed: int = 0) -> list[tuple[str, list, int]]:
    """n (prompt, images, max_tokens) of mixed lengths, image counts and output lengths."""
    g = np.random.default_rng(seed)
    pics = images(3, seed)
    out = []
    for i in range(n):
        k = i % 3  # 0, 1 or 2 images
        words = " ".join(f"w{j}" for j in range(int(g.integers(1, 12))))
        prompt = f"User: {words}" + "".join(f" look<image> at {j}" for j in range(k)) + "\nAssistant:"
        out.append((prompt, [pics[(i + j) % 3] for j in range(k)], int(g.integers(1, 14))))
    return out
