"""llama3 RoPE frequency scaling against transformers' rope init function, and its config checks."""

from __future__ import annotations

import pytest
import torch

from lmmrt.errors import ConfigError
from lmmrt.models.config import DecoderConfig
from lmmrt.models.decoder import rope_inv_freq

LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 8192}


@pytest.mark.parametrize("head_dim, theta, scaling", [
    (128, 500000.0, LLAMA3),  # Llama 3.1 / 3.2 Vision
    (12, 500000.0, {**LLAMA3, "original_max_position_embeddings": 64}),  # every band hit at a short context
    (64, 10000.0, {**LLAMA3, "factor": 32.0, "low_freq_factor": 2.0, "high_freq_factor": 7.0,
                   "original_max_position_embeddings": 300}),
])
def test_llama3_inv_freq_matches_transformers(head_dim, theta, scaling):
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    hf = LlamaConfig(hidden_size=head_dim * 4, num_attention_heads=4, max_position_embeddings=1 << 20,
                     rope_parameters={**scaling, "rope_theta": theta})
    want, _ = ROPE_INIT_FUNCTIONS["llama3"](hf)
    cfg = DecoderConfig(dim=head_dim * 4, heads=4, layers=1, vocab_size=8, ffn_dim=8, rope_theta=theta,
                        rope_scaling=dict(scaling))
    got = rope_inv_freq(cfg, "cpu")
    plain = rope_inv_freq(DecoderConfig(dim=head_dim * 4, heads=4, layers=1, vocab_size=8, ffn_dim=8,
                                        rope_theta=theta), "cpu")
    torch.testing.assert_close(got, want, rtol=1e-6, atol=0)
    # the three bands: unchanged, divided by factor, and blended in between
    assert (got == plain).any() and (got == plain / scaling["factor"]).any()
    assert ((got < plain) & (got > plain / scaling["factor"])).any()


@pytest.mark.parametrize("change, message", [
    ({"rope_type": "yarn"}, "rope_scaling.rope_type"),
    ({"factor": 0.5}, "rope_scaling.factor"),
    ({"high_freq_factor": 1.0}, "must be greater than low_freq_factor"),
    ({"original_max_position_embeddings": 8192.0}, "original_max_position_embeddings"),
    ({"extra": 1}, "unknown ['extra']"),
])
def test_bad_rope_scaling_is_refused_naming_the_field(change, message):
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("]", r"\]")):
        DecoderConfig(rope_scaling={**LLAMA3, **change})


def test_rope_scaling_missing_field_and_alibi_family_refused():
    scaling = dict(LLAMA3)
    del scaling["factor"]
    with pytest.raises(ConfigError, match=r"missing \['factor'\]"):
        DecoderConfig(rope_scaling=scaling)
    with pytest.raises(ConfigError, match="has no RoPE"):
        DecoderConfig(family="mpt", rope_scaling=dict(LLAMA3))
