"""Mllama image preprocessing against transformers' MllamaImageProcessor (its PIL backend, the one
installed here): canvas choice, resize, padding, normalization, tiles, aspect-ratio ids and masks
bit-exact on the CPU; the batched torch path within one 0-255 level of it."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from mllama_util import tiny_mllama_config
from PIL import Image

from lmmrt.convert.mllama_vision import CLIP_STD, mllama_vision_config
from lmmrt.errors import ConfigError
from lmmrt.models.config import VisionConfig
from lmmrt.runtime.mllama_image import (
    fit_to_canvas,
    optimal_canvas,
    preprocess_mllama_images,
    tile_arrangements,
)

# tall, wide, tiny both ways, exactly one tile, exactly a two-tile canvas, huge, a 1-pixel strip,
# nearly square, and a size shared by two images (the torch path resizes them in one call)
SIZES_2 = [(45, 19), (19, 45), (5, 3), (3, 5), (28, 28), (28, 56), (1000, 700), (1, 200), (60, 61), (45, 19)]
SIZES_4 = [(300, 413), (1200, 500), (560, 560), (90, 2300), (1000, 1100)]  # 1, 3x1, 1, 1x4, 2x2 tiles


def _vcfg(max_num_tiles: int):
    """The vision config lmmrt converts: tests/mllama_util's (2 tiles of 28) or the released one (4 of 560),
    with the released processor's CLIP mean / std."""
    if max_num_tiles == 2:
        return mllama_vision_config(tiny_mllama_config().vision_config.to_dict())
    return mllama_vision_config({"image_size": 560})


def _reference(images, vcfg):
    """transformers' processor, one image per sample (its batch layout), squeezed to lmmrt's."""
    from transformers.models.mllama.image_processing_pil_mllama import MllamaImageProcessorPil

    proc = MllamaImageProcessorPil(size={"height": vcfg.image_size, "width": vcfg.image_size},
                                   max_image_tiles=vcfg.max_num_tiles,
                                   image_mean=list(vcfg.image_mean), image_std=list(vcfg.image_std))
    out = proc([[img] for img in images], return_tensors="pt")
    return (out["pixel_values"][:, 0], out["aspect_ratio_ids"][:, 0], out["aspect_ratio_mask"][:, 0],
            [n[0] for n in out["num_tiles"]])


def _noise(sizes, seed=0):
    rng = np.random.default_rng(seed)  # noise: the hardest case for resampling and rounding
    return [(rng.random((h, w, 3)) * 255).astype(np.uint8) for h, w in sizes]


def _assert_matches_reference(ours, ref):
    pixels, ids, mask, num_tiles = ref
    assert ours.pixels.shape == pixels.shape and ours.pixels.dtype == torch.float32
    err = (ours.pixels - pixels).abs()
    assert err.max() == 0, f"max error {err.max():.3g} at {np.unravel_index(int(err.argmax()), err.shape)}"
    assert torch.equal(ours.aspect_ratio_ids, ids) and ours.aspect_ratio_ids.dtype == torch.long
    assert torch.equal(ours.aspect_ratio_mask, mask) and ours.aspect_ratio_mask.dtype == torch.long
    assert ours.num_tiles == num_tiles


@pytest.mark.parametrize("max_num_tiles, sizes", [(2, SIZES_2), (4, SIZES_4)])
def test_matches_transformers(max_num_tiles, sizes):
    vcfg = _vcfg(max_num_tiles)
    images = _noise(sizes)
    # PIL images for the reference: it guesses the channel axis of an array, and takes a 3-row array for
    # channels-first; lmmrt always reads uint8 arrays as (H, W, 3)
    ref = _reference([Image.fromarray(a) for a in images], vcfg)
    assert len(set(ref[3])) > 1  # the sizes reach several canvases
    _assert_matches_reference(preprocess_mllama_images(images, vcfg, where="images"), ref)


def test_canvas_choice_and_resized_size_match_transformers():
    """Every tie and rounding rule, over many sizes: exact float64 scale comparisons, the smaller
    canvas on equal scales, the first arrangement on equal areas, floored sides of at least 1."""
    from transformers.models.mllama.image_processing_pil_mllama import (
        get_all_supported_aspect_ratios,
        get_image_size_fit_to_canvas,
        get_optimal_tiled_canvas,
    )

    rng = np.random.default_rng(1)
    sizes = [(int(h), int(w)) for h, w in rng.integers(1, 3000, size=(150, 2))]
    sizes += [(h, w) for h in (1, 7, 28, 29, 56, 84, 112) for w in (1, 7, 28, 29, 56, 84, 112)]
    for max_num_tiles in (1, 2, 3, 4, 6):
        assert list(tile_arrangements(max_num_tiles)) == get_all_supported_aspect_ratios(max_num_tiles)
        for tile in (28, 560):
            for h, w in sizes:
                canvas_h, canvas_w = get_optimal_tiled_canvas(h, w, max_num_tiles, tile)
                th, tw = optimal_canvas(h, w, max_num_tiles=max_num_tiles, tile_size=tile)
                assert (th * tile, tw * tile) == (canvas_h, canvas_w), (h, w, max_num_tiles, tile)
                assert fit_to_canvas(h, w, canvas_h, canvas_w, tile) == \
                    get_image_size_fit_to_canvas(h, w, canvas_h, canvas_w, tile), (h, w, max_num_tiles, tile)


def _with_alpha(rng, mode):
    rgba = Image.fromarray((rng.random((40, 23, 4)) * 255).astype(np.uint8), "RGBA")
    if mode == "P":  # a palette image with a transparent colour
        img = rgba.convert("RGB").quantize(colors=16)
        img.info["transparency"] = 3
        return img
    return rgba.convert(mode)


@pytest.mark.parametrize("mode", ["RGBA", "LA", "P", "L", "1", "CMYK"])
def test_pil_modes_convert_as_transformers(mode):
    """Transparency (an alpha band, a palette's transparent colour) is composited onto white."""
    vcfg = _vcfg(2)
    img = _with_alpha(np.random.default_rng(2), mode)
    ref = _reference([img], vcfg)
    _assert_matches_reference(preprocess_mllama_images([img], vcfg, where="images"), ref)


def test_torch_path_is_within_one_level_of_pil_path():
    vcfg = _vcfg(2)
    images = _noise(SIZES_2, seed=3)
    pil = preprocess_mllama_images(images, vcfg, where="images", resampler="pil")
    tch = preprocess_mllama_images(images, vcfg, torch.device("cpu"), where="images", resampler="torch")
    # PIL resizes in fixed point and rounds its own way: one 0-255 level apart at most, in normalized units
    levels = (tch.pixels - pil.pixels).abs() * torch.tensor(CLIP_STD).view(1, 1, 3, 1, 1) * 255
    assert levels.max() <= 1 + 1e-3 and levels.mean() < 0.1, (levels.max(), levels.mean())
    assert torch.equal(tch.aspect_ratio_ids, pil.aspect_ratio_ids)
    assert torch.equal(tch.aspect_ratio_mask, pil.aspect_ratio_mask) and tch.num_tiles == pil.num_tiles
    padding = tch.aspect_ratio_mask == 0
    assert padding.any() and (tch.pixels[padding] == 0).all()  # padding tiles stay exactly zero


def test_uint8_tensor_and_strided_inputs_equal_the_array_input():
    vcfg = _vcfg(2)
    wide = _noise([(31, 70)], seed=4)[0]
    strided = torch.from_numpy(np.ascontiguousarray(wide.transpose(1, 0, 2))).permute(1, 0, 2)  # not contiguous
    want = preprocess_mllama_images([wide], vcfg, where="images")
    for x in (torch.from_numpy(wide), strided, Image.fromarray(wide)):
        assert torch.equal(preprocess_mllama_images([x], vcfg, where="images").pixels, want.pixels)


def test_no_images_gives_empty_batch():
    out = preprocess_mllama_images([], _vcfg(4), where="images")
    assert out.pixels.shape == (0, 4, 3, 560, 560) and out.aspect_ratio_ids.shape == (0,)
    assert out.aspect_ratio_mask.shape == (0, 4) and out.num_tiles == []


@pytest.mark.parametrize("image, error, words", [
    (torch.rand(3, 28, 28), TypeError, "not a tensor of dtype torch.float32"),
    (np.zeros((8, 8, 3), np.uint16) + 1, TypeError, "uint8"),
    (np.ones((8, 8, 4), np.uint8), ValueError, "(H, W, 3)"),
    (np.ones((8, 8), np.uint8), ValueError, "(H, W, 3)"),
    (np.ones((0, 8, 3), np.uint8), ValueError, "empty image"),
    (Image.fromarray(np.ones((8, 8), np.int32) * 70000), ValueError, "more than 8 bits"),
    ("cat.png", TypeError, "unsupported image type"),
])
def test_bad_images_are_named(image, error, words):
    good = np.ones((9, 9, 3), np.uint8)
    with pytest.raises(error, match=r"prompt_images\[1\]") as info:
        preprocess_mllama_images([good, image], _vcfg(2), where="prompt_images")
    assert words in str(info.value)


def test_bad_configs_and_options_are_refused():
    images = [np.ones((9, 9, 3), np.uint8)]
    with pytest.raises(ValueError, match="kind 'mllama'"):
        preprocess_mllama_images(images, VisionConfig(), where="images")
    # listed in another order, the ids the processor gives would pick other tile embeddings
    swapped = dataclasses.replace(_vcfg(2), supported_aspect_ratios=[[1, 1], [2, 1], [1, 2]])
    with pytest.raises(ConfigError, match="supported_aspect_ratios"):
        preprocess_mllama_images(images, swapped, where="images")
    with pytest.raises(ValueError, match="resampler"):
        preprocess_mllama_images(images, _vcfg(2), where="images", resampler="bicubic")


@pytest.mark.parametrize("image", [np.random.default_rng(5).random((8, 8, 3), dtype=np.float32),
                                   torch.rand(8, 8, 3, dtype=torch.float64), torch.ones(8, 8, 3, dtype=torch.int32),
                                   "cat.png"], ids=["float32-array", "float64-tensor", "int32-tensor", "a-path"])
def test_bad_image_hints_name_what_mllama_takes(image):
    """Not the other families' hint (a normalized float (3, H, W) tensor), which Mllama refuses."""
    with pytest.raises(TypeError, match=r"images\[0\]") as info:
        preprocess_mllama_images([image], _vcfg(2), where="images")
    assert "pass a PIL image or a uint8 (H, W, 3) array or tensor" in str(info.value)
    assert "(3, H, W)" not in str(info.value)
