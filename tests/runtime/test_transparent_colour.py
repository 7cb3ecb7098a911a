"""A transparent colour key (a PNG's tRNS chunk) on an RGB or grey image is composited onto white as
each family's transformers processor does (its convert_to_rgb): IDEFICS, BLIP-2 (and MiniGPT-4, which
takes BLIP-2's processing), LLaVA, Llama 3.2 Vision; OpenFlamingo's open_clip transform drops it."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from mllama_util import tiny_mllama_config
from PIL import Image

from lmmrt.convert.mllama_vision import mllama_vision_config
from lmmrt.models.config import VisionConfig
from lmmrt.runtime.mllama_image import preprocess_mllama_images
from lmmrt.runtime.processor import preprocess_images

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
S = 28


def _keyed(mode: str) -> Image.Image:
    """Noise (odd size) with a block in the key colour across the centre, so that a centre crop keeps it,
    written to PNG and read back: the key is a real tRNS chunk."""
    rng = np.random.default_rng(7)
    pixels = rng.integers(0, 256, (45, 67, 3), dtype=np.uint8)
    key = (201, 37, 118)
    pixels[12:33, 20:50] = key
    img = Image.fromarray(pixels) if mode == "RGB" else Image.fromarray(pixels[..., 1])
    buf = io.BytesIO()
    img.save(buf, format="PNG", transparency=key if mode == "RGB" else key[1])
    out = Image.open(io.BytesIO(buf.getvalue()))
    out.load()
    assert out.mode == mode and out.info.get("transparency") is not None
    return out


def _without_key(img: Image.Image) -> Image.Image:
    plain = img.copy()
    plain.info.pop("transparency")
    return plain


def _pixels(out) -> torch.Tensor:
    x = out["pixel_values"] if hasattr(out, "keys") else out  # IDEFICS's returns the tensor itself
    return torch.as_tensor(np.asarray(x[0] if isinstance(x, list) else x)).reshape(-1, 3, S, S)[0].float()


def _idefics(img):
    from transformers.models.idefics.image_processing_pil_idefics import IdeficsImageProcessorPil

    proc = IdeficsImageProcessorPil(image_size=S, image_mean=list(CLIP_MEAN), image_std=list(CLIP_STD))
    return _pixels(proc.preprocess([img], return_tensors="pt"))


def _blip2(img):
    from transformers.models.blip.image_processing_pil_blip import BlipImageProcessorPil

    proc = BlipImageProcessorPil(size={"height": S, "width": S}, image_mean=list(CLIP_MEAN),
                                 image_std=list(CLIP_STD))
    return _pixels(proc([img], return_tensors="pt"))


def _llava(img):
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    proc = CLIPImageProcessorPil(size={"shortest_edge": S}, crop_size={"height": S, "width": S},
                                 image_mean=list(CLIP_MEAN), image_std=list(CLIP_STD))
    return _pixels(proc([img], return_tensors="pt"))


FAMILIES = {"idefics": (_idefics, "resize"), "blip2": (_blip2, "resize"), "llava": (_llava, "resize_crop_hf")}


@pytest.mark.parametrize("mode", ["RGB", "L"])
@pytest.mark.parametrize("family", list(FAMILIES))
def test_colour_key_matches_transformers(family, mode):
    reference, resize = FAMILIES[family]
    img = _keyed(mode)
    cfg = VisionConfig(image_size=S, patch_size=14, resize=resize, image_mean=CLIP_MEAN, image_std=CLIP_STD)
    ours = preprocess_images([img], cfg)[0]
    assert (ours - reference(img)).abs().max() < 1e-6
    assert (ours - preprocess_images([_without_key(img)], cfg)[0]).abs().max() > 0.1  # the key did matter


@pytest.mark.parametrize("mode", ["RGB", "L"])
def test_colour_key_matches_transformers_mllama(mode):
    from transformers.models.mllama.image_processing_pil_mllama import MllamaImageProcessorPil

    vcfg = mllama_vision_config(tiny_mllama_config().vision_config.to_dict())  # 2 tiles of 28
    img = _keyed(mode)
    proc = MllamaImageProcessorPil(size={"height": S, "width": S}, max_image_tiles=2,
                                   image_mean=list(vcfg.image_mean), image_std=list(vcfg.image_std))
    ref = proc([[img]], return_tensors="pt")["pixel_values"][:, 0]
    ours = preprocess_mllama_images([img], vcfg, where="images").pixels
    assert ours.shape == ref.shape and (ours - ref).abs().max() == 0
    plain = preprocess_mllama_images([_without_key(img)], vcfg, where="images").pixels
    assert (ours - plain).abs().max() > 0.1


@pytest.mark.parametrize("mode", ["RGB", "L"])
def test_colour_key_dropped_like_open_clip(mode):
    """open_clip's transform (OpenFlamingo) starts with image.convert("RGB"): the key is ignored."""
    img = _keyed(mode)
    cfg = VisionConfig(image_size=S, patch_size=14, resize="resize_crop", image_mean=CLIP_MEAN, image_std=CLIP_STD)
    assert torch.equal(preprocess_images([img], cfg), preprocess_images([np.array(img.convert("RGB"))], cfg))
