"""Image preprocessing on the CPU is bit-exact with the reference processors: transformers' IDEFICS
processor (bicubic resize to a square) and its CLIP processor (shortest side, centre crop, as
OpenFlamingo's open_clip transform does); the GPU path stays close."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch
from PIL import Image

from lmmrt.models.config import VisionConfig
from lmmrt.runtime.processor import preprocess_images

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def _images():
    rng = np.random.default_rng(0)
    noise = (rng.random((300, 413, 3)) * 255).astype(np.uint8)
    yy, xx = np.mgrid[0:517, 0:230]
    smooth = np.stack([xx * 255 // 230, yy * 255 // 517, (xx + yy) * 255 // 747], -1).astype(np.uint8)
    return [noise, smooth]


def _as_tensor(x):
    if hasattr(x, "keys"):  # a BatchFeature
        x = x["pixel_values"]
    x = x[0] if isinstance(x, list) else x
    return torch.as_tensor(np.asarray(x)).reshape(-1, 3, *np.asarray(x).shape[-2:])[0]


@pytest.mark.parametrize("i", [0, 1])
def test_idefics_preprocessing_matches_transformers(i):
    from transformers.models.idefics.image_processing_pil_idefics import IdeficsImageProcessorPil

    img = _images()[i]
    ref = _as_tensor(IdeficsImageProcessorPil(image_size=224).preprocess([Image.fromarray(img)], return_tensors="pt"))
    ours = preprocess_images([img], VisionConfig(image_size=224, resize="resize"))[0]
    assert torch.equal(ours, ref.float()) or (ours - ref).abs().max() < 1e-6


def test_clip_preprocessing_matches_transformers():
    """Resize as transformers' CLIP processor (and torchvision) does; the 300x413 image crops at an
    even margin, where transformers' truncating crop and torchvision's rounding one agree."""
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    img = _images()[0]
    proc = CLIPImageProcessorPil(size={"shortest_edge": 224}, crop_size={"height": 224, "width": 224},
                                 image_mean=list(CLIP_MEAN), image_std=list(CLIP_STD))
    ref = _as_tensor(proc.preprocess([Image.fromarray(img)], return_tensors="pt"))
    cfg = VisionConfig(image_size=224, resize="resize_crop", image_mean=CLIP_MEAN, image_std=CLIP_STD)
    ours = preprocess_images([img], cfg)[0]
    assert (ours - ref).abs().max() < 1e-6


def test_device_path_is_close_to_the_cpu_path():
    """The torch (GPU-side) resize, run here on the CPU, stays close to PIL's on a smooth image."""
    from lmmrt.runtime.processor import _resize

    img = torch.from_numpy(_images()[1])
    cfg = VisionConfig(image_size=224, resize="resize_crop")
    exact = preprocess_images([img], cfg)[0]
    x = _resize(img.permute(2, 0, 1)[None].float(), cfg)[0] / 255.0
    mean = torch.tensor(cfg.image_mean).view(3, 1, 1)
    std = torch.tensor(cfg.image_std).view(3, 1, 1)
    approx = (x - mean) / std
    assert approx.shape == exact.shape
    assert (approx - exact).abs().mean() < 0.01


def test_clip_crop_rounds_like_torchvision():
    """open_clip (OpenFlamingo) crops with torchvision's CenterCrop: offset round((h - s) / 2)."""
    from lmmrt.runtime.processor import _crop_offsets, _resize_shape

    cfg = VisionConfig(image_size=224, resize="resize_crop")
    assert _resize_shape(517, 230, cfg) == (503, 224)  # int(224 * 517 / 230): torchvision truncates
    assert _crop_offsets(503, 224, 224) == (140, 0)  # round(139.5) = 140
    assert _crop_offsets(301, 224, 224) == (38, 0)  # round(38.5) = 38 (Python rounds half to even)


# --- PIL modes: transparency and bit depth, as each family's reference processor -------------------------
def _transparent_images() -> dict[str, Image.Image]:
    """RGBA, LA, and palette / grey images with a transparent colour; random (never flat) pixels and
    alpha, odd sizes."""
    rng = np.random.default_rng(1)
    rgb = rng.integers(0, 256, (97, 131, 3), dtype=np.uint8)
    alpha = rng.integers(0, 256, (97, 131), dtype=np.uint8)
    grey = rng.integers(0, 256, (97, 131), dtype=np.uint8)
    p = Image.fromarray(rgb).quantize(16)
    p.info["transparency"] = 3
    lt = Image.fromarray(grey)
    lt.info["transparency"] = int(grey[5, 7])
    return {"RGBA": Image.fromarray(np.dstack([rgb, alpha])), "LA": Image.fromarray(np.dstack([grey, alpha])),
            "P": p, "L+transparency": lt}


@pytest.mark.parametrize("kind", ["RGBA", "LA", "P", "L+transparency"])
def test_transparent_images_match_transformers_idefics(kind):
    """transformers' IDEFICS processor composites transparency onto white: bit-exact here."""
    from transformers.models.idefics.image_processing_pil_idefics import IdeficsImageProcessorPil

    img = _transparent_images()[kind]
    ref = _as_tensor(IdeficsImageProcessorPil(image_size=56).preprocess([img], return_tensors="pt"))
    ours = preprocess_images([img], VisionConfig(image_size=56, patch_size=14, resize="resize"))[0]
    assert (ours - ref.float()).abs().max() < 1e-6
    # as an array: PIL's convert("RGB") keeps a palette's transparent colour as an RGB key
    dropped = preprocess_images([np.array(img.convert("RGB"))], VisionConfig(image_size=56, patch_size=14,
                                                                             resize="resize"))[0]
    assert (ours - dropped).abs().max() > 0.1  # the alpha did matter


@pytest.mark.parametrize("kind", ["RGBA", "LA", "P"])
def test_transparent_images_for_clip_drop_alpha_like_open_clip(kind):
    """open_clip's transform (OpenFlamingo) starts with image.convert("RGB"): alpha dropped."""
    img = _transparent_images()[kind]
    cfg = VisionConfig(image_size=56, patch_size=14, resize="resize_crop", image_mean=CLIP_MEAN, image_std=CLIP_STD)
    assert torch.equal(preprocess_images([img], cfg), preprocess_images([np.array(img.convert("RGB"))], cfg))


@pytest.mark.parametrize("mode", ["CMYK", "1", "YCbCr"])
def test_other_8bit_modes_match_transformers_idefics(mode):
    from transformers.models.idefics.image_processing_pil_idefics import IdeficsImageProcessorPil

    img = Image.fromarray(_images()[0]).convert(mode)
    ref = _as_tensor(IdeficsImageProcessorPil(image_size=56).preprocess([img], return_tensors="pt"))
    ours = preprocess_images([img], VisionConfig(image_size=56, patch_size=14, resize="resize"))[0]
    assert (ours - ref.float()).abs().max() < 1e-6


@pytest.mark.parametrize("mode", ["I;16", "I", "F"])
def test_high_bit_depth_images_are_refused(mode):
    """PIL's RGB conversion (the reference processors') clips these at 255: all white for a typical
    16-bit image. lmmrt says so instead of answering on a white image."""
    a = np.random.default_rng(2).integers(300, 60000, (20, 30)).astype(np.uint16)
    img = Image.fromarray(a)  # uint16: mode I;16
    img = img if mode == "I;16" else img.convert(mode)
    assert img.mode == mode
    with pytest.raises(ValueError, match=rf"images\[0\]: PIL image mode '{re.escape(mode)}' .*scale it to 8 bits"):
        preprocess_images([img], VisionConfig(image_size=56, patch_size=14))


def test_unconvertible_mode_is_named():
    img = Image.new("La", (8, 8))
    with pytest.raises(ValueError, match=r"images\[0\]: cannot convert a PIL image of mode 'La' to RGB"):
        preprocess_images([img], VisionConfig(image_size=56, patch_size=14))


@pytest.mark.parametrize("bad, msg", [
    (torch.full((3, 8, 8), float("nan")), "NaN or inf"),
    (torch.randn(3, 8, 8).index_put_((torch.tensor(0), torch.tensor(1), torch.tensor(2)), torch.tensor(float("inf"))),
     "NaN or inf"),
    (torch.randn(3, 0, 5), r"empty image of shape \(3, 0, 5\)"),
    (torch.randn(3, 5, 0, dtype=torch.float64), r"empty image of shape \(3, 5, 0\)"),
])
def test_bad_float_pixels_are_named(bad, msg):
    with pytest.raises(ValueError, match=r"images\[1\]: .*" + msg):
        preprocess_images([torch.randn(3, 8, 8), bad], VisionConfig(image_size=56, patch_size=14))
