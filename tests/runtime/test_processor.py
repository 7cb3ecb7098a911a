"""Image preprocessing on the CPU is bit-exact with the reference processors: transformers' IDEFICS
processor (bicubic resize to a square) and its CLIP processor (shortest side, centre crop, as
OpenFlamingo's open_clip transform does); the GPU path stays close."""

from __future__ import annotations

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
