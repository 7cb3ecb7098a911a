"""Llama 3.2 Vision (Mllama): lmmrt's model, built from a tiny random transformers
MllamaForConditionalGeneration through lmmrt.convert.mllama, against that model in float32.

Images enter as tiled pixel tensors (the image processor has its own tests), in two aspect ratios
(1 tile and 2 tiles of 2); the cross-attention mask is transformers' processor rule
(get_cross_attention_token_mask + convert_sparse_cross_attention_mask_to_dense)."""

from __future__ import annotations

import pytest
import torch
from mllama_util import BOS, IMAGE_ID, tiny_mllama

from lmmrt.convert.mllama import mllama_config_from_hf, mllama_state_from_hf, placement
from lmmrt.models.mllama import MllamaModel
from lmmrt.models.splice import build_model
from lmmrt.models.xattn import MediaContext
from lmmrt.runtime.kv_cache import KVCache
from lmmrt.runtime.mllama_prompts import image_spans

TILES, SIZE = 2, 28
# aspect_ratio_id -> tiles used ([1,1]: 1; [1,2] and [2,1]: 2)
RATIO_TILES = {1: 1, 2: 2, 3: 2}


def lmmrt_from_hf(hf) -> MllamaModel:
    cfg = mllama_config_from_hf(hf.config.to_dict())
    model = build_model(cfg).eval()
    model.load_state_dict(mllama_state_from_hf(hf.state_dict()))
    model.fold_gates()
    return model


@pytest.fixture(scope="module")
def hf_model():
    return tiny_mllama()


@pytest.fixture(scope="module")
def model(hf_model):
    return lmmrt_from_hf(hf_model)


def tiled_images(ratio_ids: list[int], seed: int):
    """Random normalized pixels (N, TILES, 3, S, S) (padding tiles zero), aspect_ratio_ids (N,),
    aspect_ratio_mask (N, TILES)."""
    g = torch.Generator().manual_seed(seed)
    pixels = torch.randn(len(ratio_ids), TILES, 3, SIZE, SIZE, generator=g)
    mask = torch.zeros(len(ratio_ids), TILES, dtype=torch.long)
    for i, r in enumerate(ratio_ids):
        pixels[i, RATIO_TILES[r]:] = 0
        mask[i, :RATIO_TILES[r]] = 1
    return pixels, torch.tensor(ratio_ids), mask


def hf_logits(hf, ids: list[int], ratio_ids: list[int], seed: int) -> torch.Tensor:
    from transformers.models.mllama.processing_mllama import (
        convert_sparse_cross_attention_mask_to_dense,
        get_cross_attention_token_mask,
    )

    input_ids = torch.tensor([ids])
    if not ratio_ids:
        with torch.no_grad():
            return hf(input_ids=input_ids).logits[0]
    pixels, ar_ids, ar_mask = tiled_images(ratio_ids, seed)
    spans = get_cross_attention_token_mask(ids, IMAGE_ID)
    xmask = convert_sparse_cross_attention_mask_to_dense([spans], [[RATIO_TILES[r] for r in ratio_ids]], TILES,
                                                         len(ids))
    with torch.no_grad():
        return hf(input_ids=input_ids, pixel_values=pixels[None], aspect_ratio_ids=ar_ids[None],
                  aspect_ratio_mask=ar_mask[None], cross_attention_mask=torch.from_numpy(xmask)).logits[0]


def lmmrt_logits(model: MllamaModel, ids: list[int], ratio_ids: list[int], seed: int) -> torch.Tensor:
    """One prompt through the module, driven directly: (T, V) float32 logits."""
    T = len(ids)
    tokens = torch.tensor([ids])
    text_time, first = image_spans(ids, IMAGE_ID)
    kv, media_len = [], None
    if ratio_ids:
        pixels, ar_ids, ar_mask = tiled_images(ratio_ids, seed)
        with torch.no_grad():
            kv = model.project_media(model.encode_media(pixels, aspect_ratio_ids=ar_ids, aspect_ratio_mask=ar_mask))
        per_tile = kv[0][0].shape[1] // TILES
        media_len = torch.tensor([RATIO_TILES[r] * per_tile for r in ratio_ids], dtype=torch.int32)
    media = MediaContext(kv=kv, text_time=torch.tensor([text_time], dtype=torch.int32),
                         media_start=torch.zeros(1, dtype=torch.int32),
                         media_count=torch.tensor([len(ratio_ids)], dtype=torch.int32), any_media=bool(ratio_ids),
                         text_time_first=torch.tensor([first], dtype=torch.int32), media_len=media_len)
    ctx = model.decoder.context(torch.arange(T)[None], 0, T, None, causal=True)
    cache = KVCache.allocate(model.cfg.decoder, 1, T, model.dtype, "cpu")
    with torch.no_grad():
        return model(tokens, ctx, cache, media)[0]


def assert_close(got: torch.Tensor, want: torch.Tensor, rel: float = 1e-4) -> None:
    assert got.shape == want.shape
    err = (got - want).abs().max().item()
    scale = want.abs().max().item()
    assert err <= rel * scale, f"max error {err:.3g} vs max |logit| {scale:.3g} (relative {err / scale:.3g})"


# (token ids, aspect_ratio_id of each image); 5..60 are plain text tokens
PROMPTS = {
    "no_image": ([BOS, 5, 17, 33, 8, 41], []),
    "one_image_first": ([IMAGE_ID, BOS, 12, 7, 55, 3, 19], [1]),
    "text_before_image": ([BOS, 21, 9, 14, IMAGE_ID, 30, 6, 44], [2]),
    "text_between_images": ([BOS, 11, IMAGE_ID, 23, 40, 8, IMAGE_ID, 15, 27, 9], [3, 1]),
    "consecutive_markers": ([BOS, 16, IMAGE_ID, IMAGE_ID, 35, 52, 13, 4], [2, 1]),
    "three_images_one_run_then_one": ([BOS, IMAGE_ID, IMAGE_ID, 28, 17, IMAGE_ID, 9, 50], [1, 3, 2]),
}


@pytest.mark.parametrize("name", list(PROMPTS))
def test_prompt_logits_match_transformers(hf_model, model, name):
    ids, ratios = PROMPTS[name]
    want = hf_logits(hf_model, ids, ratios, seed=len(ids))
    assert_close(lmmrt_logits(model, ids, ratios, seed=len(ids)), want)


def test_cross_attention_layers_first_consecutive_and_last():
    """Blocks before the first decoder layer, two in a row, and one after the last layer."""
    hf = tiny_mllama(seed=3, cross_attention_layers=(0, 1, 4))
    model = lmmrt_from_hf(hf)
    assert model.cfg.xattn.layers == [0, 0, 2] and model.cfg.decoder.layers == 2
    for ids, ratios in (PROMPTS["text_between_images"], PROMPTS["text_before_image"]):
        assert_close(lmmrt_logits(model, ids, ratios, seed=1), hf_logits(hf, ids, ratios, seed=1))


def test_placement_of_cross_attention_layers():
    assert placement([3, 8, 13, 18, 23, 28, 33, 38], 40) == [3, 7, 11, 15, 19, 23, 27, 31]
    assert placement([0, 1, 4], 5) == [0, 0, 2]


def test_saved_model_reloads_with_gates_applied_once(hf_model, model, tmp_path):
    """Model.save stores folded gates as neutral ones: the reloaded model gives the same logits."""
    import lmmrt
    from lmmrt.api import Model

    cfg = mllama_config_from_hf(hf_model.config.to_dict())
    fresh = build_model(cfg)
    fresh.load_state_dict(mllama_state_from_hf(hf_model.state_dict()))
    Model(fresh, cfg, tokenizer=None, backend="torch").save(tmp_path / "ckpt")
    loaded = lmmrt.load(tmp_path / "ckpt", device="cpu", backend="torch").module
    ids, ratios = PROMPTS["text_between_images"]
    torch.testing.assert_close(lmmrt_logits(loaded, ids, ratios, seed=2), lmmrt_logits(model, ids, ratios, seed=2),
                               rtol=1e-5, atol=1e-5)


def test_bfloat16_model_runs_close_to_float32(hf_model, model):
    """Every path (pre-image rows, valid-tile keys, the masked MLP branch) in the model dtype: bf16
    logits stay within bf16 rounding of the float32 ones."""
    low = lmmrt_from_hf(hf_model).to(torch.bfloat16)
    ids, ratios = PROMPTS["text_between_images"]
    assert_close(lmmrt_logits(low, ids, ratios, seed=4), lmmrt_logits(model, ids, ratios, seed=4), rel=0.05)


@pytest.mark.parametrize("act", ["gelu", "gelu_pytorch_tanh"])
def test_text_activation_reaches_the_cross_attention_mlp(act):
    """transformers builds every text MLP, the cross-attention layers' included, with ACT2FN[hidden_act]."""
    from transformers.activations import ACT2FN

    hf = tiny_mllama(seed=4)
    hf.config.text_config.hidden_act = act
    for layer in hf.model.language_model.layers:
        layer.mlp.act_fn = ACT2FN[act]
    model = lmmrt_from_hf(hf)
    for ids, ratios in (PROMPTS["text_between_images"], PROMPTS["no_image"]):
        assert_close(lmmrt_logits(model, ids, ratios, seed=5), hf_logits(hf, ids, ratios, seed=5))
