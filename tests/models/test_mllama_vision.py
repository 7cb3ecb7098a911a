"""lmmrt's Mllama vision encoder against transformers' MllamaVisionModel in float32 (the tiny random
model of tests/mllama_util.py: local and gated global layers, intermediate features, non-zero gates):
1-tile images with a padding tile, both 2-tile layouts, a batch mixing them, a 4-tile config with the
default aspect ratios, both checkpoint key spellings; and the config, converter and input errors."""

from __future__ import annotations

import pytest
import torch
from mllama_util import tiny_mllama

from lmmrt.convert.mllama_vision import mllama_vision_config, mllama_vision_state
from lmmrt.errors import CheckpointError, ConfigError
from lmmrt.models.mllama_vision import MllamaVisionEncoder
from lmmrt.models.part_configs import VisionConfig

PREFIX = "model.vision_model."


def converted(hf, prefix: str = PREFIX, state=None):
    cfg = mllama_vision_config(hf.config.vision_config.to_dict())
    enc = MllamaVisionEncoder(cfg).eval()
    enc.load_state_dict(mllama_vision_state(hf.state_dict() if state is None else state, prefix, config=cfg))
    return enc


@pytest.fixture(scope="module")
def pair():
    hf = tiny_mllama()
    return hf.model.vision_model, converted(hf)


@pytest.fixture(scope="module")
def pair4():
    hf = tiny_mllama(seed=3, max_num_tiles=4)
    return hf.model.vision_model, converted(hf)


def tiled_images(ids: list[int], valid: list[int], tiles: int, size: int = 28, seed: int = 0):
    """Random normalized pixels (N, tiles, 3, size, size), padding tiles zero as the processor pads."""
    g = torch.Generator().manual_seed(seed)
    px = torch.randn(len(ids), tiles, 3, size, size, generator=g)
    mask = torch.zeros(len(ids), tiles, dtype=torch.long)
    for i, n in enumerate(valid):
        mask[i, :n] = 1
        px[i, n:] = 0
    return px, torch.tensor(ids), mask


def assert_matches(hf_vision, enc, px, ids, mask):
    with torch.no_grad():
        ref = hf_vision(px[:, None], ids[:, None], mask[:, None]).last_hidden_state[:, 0]
        out = enc(px, ids, mask)
    assert out.shape == ref.shape
    err = (out - ref).abs()
    rel = (err.max() / ref.abs().max()).item()
    assert rel <= 1e-4, f"max rel err {rel:.2e}, mean abs err {err.mean():.2e}, first bad {err.argmax().item()}"
    return out


# (aspect_ratio_id, real tiles): [1, 1] with its padding tile, [1, 2], [2, 1]
@pytest.mark.parametrize("ratio_id, valid", [(1, 1), (2, 2), (3, 2)])
def test_one_image_matches_transformers(pair, ratio_id, valid):
    px, ids, mask = tiled_images([ratio_id], [valid], 2, seed=ratio_id)
    assert_matches(*pair, px, ids, mask)


def test_mixed_batch_matches_transformers_and_each_image_alone(pair):
    px, ids, mask = tiled_images([1, 3, 2, 1], [1, 2, 2, 1], 2, seed=7)
    out = assert_matches(*pair, px, ids, mask)
    with torch.no_grad():
        for i in range(len(ids)):
            alone = pair[1](px[i:i + 1], ids[i:i + 1], mask[i:i + 1])
            torch.testing.assert_close(alone[0], out[i], rtol=1e-5, atol=1e-5)


def test_four_tiles_default_ratios_matches_transformers(pair4):
    _, enc = pair4
    assert enc.cfg.supported_aspect_ratios == [[1, 1], [1, 2], [1, 3], [1, 4], [2, 1], [2, 2], [3, 1], [4, 1]]
    # [1, 3] (one padding tile), [2, 2], [1, 1] (three padding tiles), [4, 1]
    px, ids, mask = tiled_images([3, 6, 1, 8], [3, 4, 1, 4], 4, seed=11)
    assert_matches(*pair4, px, ids, mask)


def test_original_key_spelling_converts_the_same(pair):
    hf = tiny_mllama()
    state = {k.replace(PREFIX, "vision_model.", 1): v for k, v in hf.state_dict().items()}
    enc = converted(hf, "vision_model.", state)
    inferred = mllama_vision_state(state, "vision_model.")  # layer counts read from the key names
    assert inferred.keys() == enc.state_dict().keys()
    for k, v in pair[1].state_dict().items():
        torch.testing.assert_close(enc.state_dict()[k], v, rtol=0, atol=0)
        torch.testing.assert_close(inferred[k], v, rtol=0, atol=0)


def test_triton_backend_matches_transformers(pair):
    """The encoder's norms dispatch on the model's backend: under the interpreter "triton" must give
    the reference's result too (whatever kernels those ops have, or their torch fallback)."""
    hf_vision, enc = pair
    px, ids, mask = tiled_images([3, 1], [2, 1], 2, seed=9)
    try:
        for m in enc.modules():
            if hasattr(m, "backend"):
                m.backend = "triton"
        assert_matches(hf_vision, enc, px, ids, mask)
    finally:
        for m in enc.modules():
            if hasattr(m, "backend"):
                m.backend = "torch"


def test_bfloat16_close_to_float32(pair):
    _, enc = pair
    px, ids, mask = tiled_images([2, 1], [2, 1], 2, seed=5)
    low = MllamaVisionEncoder(enc.cfg).eval()
    low.load_state_dict(enc.state_dict())
    low.to(torch.bfloat16)
    with torch.no_grad():
        ref, out = enc(px, ids, mask), low(px, ids, mask)
    assert out.dtype == torch.bfloat16
    rel = ((out.float() - ref).abs().max() / ref.abs().max()).item()
    assert rel < 5e-2, rel


def test_config_properties_and_round_trip(pair):
    cfg = pair[1].cfg
    assert (cfg.tile_tokens, cfg.n_tokens, cfg.feature_dim) == (17, 34, 96)
    from dataclasses import asdict

    assert VisionConfig(**asdict(cfg)) == cfg
    assert VisionConfig().kind == "clip"  # configs written before `kind` existed load as CLIP


MLLAMA = dict(kind="mllama", image_size=28, patch_size=7, width=32, layers=3, heads=4, mlp_dim=64,
              max_num_tiles=2, supported_aspect_ratios=[[1, 1], [1, 2], [2, 1]], global_layers=2,
              intermediate_layers=[0, 2])


@pytest.mark.parametrize("change, msg", [
    (dict(kind="siglip"), r"vision.kind = 'siglip': must be one of"),
    (dict(max_num_tiles=0), r"vision.max_num_tiles = 0: must be between 1"),
    (dict(max_num_tiles=True), r"vision.max_num_tiles = True: must be an integer"),
    (dict(supported_aspect_ratios=[]), r"vision.supported_aspect_ratios = \[\]: must be a non-empty list"),
    (dict(supported_aspect_ratios=[[1, 1], [2, 2]]), r"supported_aspect_ratios\[1\] = \[2, 2\]: 4 tiles, more"),
    (dict(supported_aspect_ratios=[[1, 2], [1, 2]]), r"supported_aspect_ratios\[1\] = \[1, 2\]: listed twice"),
    (dict(supported_aspect_ratios=[[1, 1, 1]]), r"supported_aspect_ratios\[0\] = \[1, 1, 1\]: must be a pair"),
    (dict(supported_aspect_ratios=[[0, 1]]), r"supported_aspect_ratios\[0\]\[0\] = 0: must be between 1"),
    (dict(global_layers=-1), r"vision.global_layers = -1: must be between 0"),
    (dict(intermediate_layers=[0, 3]), r"vision.intermediate_layers\[1\] = 3: must be between 0 and 2"),
    (dict(intermediate_layers=[]), r"vision.intermediate_layers: must name at least one"),
    (dict(intermediate_layers=[1, 1]), r"vision.intermediate_layers = \[1, 1\]: names a layer twice"),
    (dict(output_dim=64), r"vision.output_dim = 64: the features are .* = 96 wide"),
    (dict(kind="clip"), r"vision.max_num_tiles = 2: a Mllama field, but vision.kind = 'clip'"),
])
def test_bad_config_refused(change, msg):
    with pytest.raises(ConfigError, match=msg):
        VisionConfig(**{**MLLAMA, **change})


def test_bad_hf_config_refused():
    hf = tiny_mllama().config.vision_config.to_dict()
    assert mllama_vision_config({**hf, "image_size": [28, 28]}).image_size == 28
    with pytest.raises(ConfigError, match=r"vision_config.image_size = \[28, 56\]: only square"):
        mllama_vision_config({**hf, "image_size": [28, 56]})
    with pytest.raises(ConfigError, match=r"vision_config.num_channels = 1"):
        mllama_vision_config({**hf, "num_channels": 1})
    with pytest.raises(ConfigError, match=r"vision.output_dim = 64"):
        mllama_vision_config({**hf, "vision_output_dim": 64})


def test_converter_names_missing_unused_and_misshapen_tensors():
    hf = tiny_mllama()
    cfg = mllama_vision_config(hf.config.vision_config.to_dict())
    state = dict(hf.state_dict())
    gate = PREFIX + "global_transformer.layers.1.gate_ffn"
    del state[gate]
    state[PREFIX + "extra.weight"] = torch.ones(2)
    with pytest.raises(CheckpointError, match=r"missing keys \(1\): .*layers.1.gate_ffn[\s\S]*unexpected keys "
                                              r"\(1\): model.vision_model.extra.weight"):
        mllama_vision_state(state, PREFIX, config=cfg)
    state = dict(hf.state_dict())
    state[PREFIX + "transformer.layers.0.mlp.fc1.bias"] = torch.ones(65)
    with pytest.raises(CheckpointError, match=r"blocks.0.fc1.bias: shape \(65,\), expected \(64,\)"):
        mllama_vision_state(state, PREFIX, config=cfg)
    state[PREFIX + "transformer.layers.0.self_attn.k_proj.weight"] = torch.ones(32, 31)
    with pytest.raises(CheckpointError, match=r"do not fit together"):
        mllama_vision_state(state, PREFIX)


def test_bad_inputs_refused(pair):
    enc = pair[1]
    px, ids, mask = tiled_images([2], [2], 2)
    with pytest.raises(ValueError, match=r"pixels of shape \(N, 2, 3, 28, 28\), got \(1, 1, 3, 28, 28\)"):
        enc(px[:, :1], ids, mask)
    with pytest.raises(ValueError, match=r"aspect_ratio_ids\[0\] = 4: must be between 0 and 3"):
        enc(px, torch.tensor([4]), mask)
    with pytest.raises(ValueError, match=r"aspect_ratio_mask\[0\] = \[0, 0\]: must be 0/1 with at least one"):
        enc(px, ids, torch.zeros(1, 2, dtype=torch.long))
    with pytest.raises(ValueError, match=r"aspect_ratio_mask must have shape \(1, 2\)"):
        enc(px, ids, mask[0])
    with pytest.raises(TypeError, match=r"aspect_ratio_ids must be an integer tensor, got torch.float32"):
        enc(px, ids.float(), mask)
