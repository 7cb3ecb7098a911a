"""Mllama's config: transformers' config.json (both rope spellings) -> ModelConfig, and the checks
that keep the mllama-only options (block style, range mask, grouped K/V heads, a block after the
last layer) to mllama models."""

from __future__ import annotations

import pytest
from mllama_util import tiny_mllama_config

from lmmrt.convert.mllama import mllama_config_from_hf
from lmmrt.errors import ConfigError
from lmmrt.models.config import ModelConfig, XAttnConfig


@pytest.fixture(scope="module")
def hf_dict():
    return tiny_mllama_config().to_dict()


def test_config_from_transformers(hf_dict):
    cfg = mllama_config_from_hf(hf_dict)
    d, x = cfg.decoder, cfg.xattn
    assert (d.layers, d.vocab_size, d.kv_heads, d.head_dim) == (3, 104 + 8, 2, 12)
    assert d.rope_scaling["original_max_position_embeddings"] == 64 and d.rope_theta == 500000.0
    assert (x.layers, x.heads, x.kv_heads, x.mask_mode, x.media_dim) == ([1, 2], 4, 2, "range", 48)
    assert cfg.image_token_id == 90 and cfg.perceiver is None and not cfg.reset_media_after_eos
    assert ModelConfig.from_dict(cfg.to_dict()) == cfg  # config.json round trip


def test_released_config_spelling(hf_dict):
    """The hub's config.json: rope_theta beside a rope_scaling object, eos as a list."""
    text = dict(hf_dict["text_config"])
    rope = text.pop("rope_parameters")
    text["rope_theta"] = rope.pop("rope_theta")
    text["rope_scaling"] = rope
    text["eos_token_id"] = [2, 7, 9]
    cfg = mllama_config_from_hf({**hf_dict, "text_config": text})
    assert cfg.decoder.rope_scaling == mllama_config_from_hf(hf_dict).decoder.rope_scaling
    assert cfg.eos_token_id == 2 and cfg.stop_token_ids == [7, 9]


@pytest.mark.parametrize("change, message", [
    ({"rope_parameters": {"rope_type": "yarn", "rope_theta": 1.0, "factor": 2.0}}, "rope_type 'yarn'"),
    ({"cross_attention_layers": [1, 1]}, "must be distinct"),
    ({"cross_attention_layers": [5]}, r"in \[0, 5\)"),
    ({"tie_word_embeddings": True}, "tie_word_embeddings"),
])
def test_unsupported_transformers_configs_are_named(hf_dict, change, message):
    with pytest.raises(ConfigError, match=message):
        mllama_config_from_hf({**hf_dict, "text_config": {**hf_dict["text_config"], **change}})


def test_mllama_options_only_for_mllama(hf_dict):
    with pytest.raises(ConfigError, match="grouped K/V heads are an mllama option"):
        XAttnConfig(style="idefics", heads=4, kv_heads=2)
    with pytest.raises(ConfigError, match="mask_mode \"range\""):
        XAttnConfig(style="idefics", mask_mode="range")
    with pytest.raises(ConfigError, match="mask_mode \"range\""):
        XAttnConfig(style="mllama", qk_norm=True, mask_mode="immediate")
    with pytest.raises(ConfigError, match="strictly increasing"):
        XAttnConfig(style="idefics", layers=[1, 1])
    XAttnConfig(style="mllama", qk_norm=True, mask_mode="range", layers=[1, 1])  # consecutive HF layers


def test_block_placement_checked_against_the_decoder(hf_dict):
    d = mllama_config_from_hf(hf_dict).to_dict()
    d["xattn"]["layers"] = [1, 3]  # after the last of 3 decoder layers: allowed
    ModelConfig.from_dict(d)
    d["xattn"]["layers"] = [1, 4]
    with pytest.raises(ConfigError, match="past the end of the decoder"):
        ModelConfig.from_dict(d)
    d["xattn"]["layers"] = [1, 2]
    d["family"] = "idefics"
    with pytest.raises(ConfigError, match="family 'idefics'"):
        ModelConfig.from_dict(d)
