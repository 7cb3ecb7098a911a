"""Llama 3.2 Vision (Mllama) image preprocessing: any-aspect images -> padded, normalized tiles, as
transformers' MllamaImageProcessor makes them.

How a Mllama image looks to the model. Each image is resized, keeping its aspect ratio, onto a canvas
of tiles_h x tiles_w square tiles of vision.image_size pixels (560 for the released checkpoints), where
tiles_h * tiles_w <= vision.max_num_tiles (4 released): the canvas is the tile arrangement that
upscales the image least (or, when every arrangement must shrink it, shrinks it least), the smaller
canvas on a tie. The resized image sits in the canvas's top-left corner; the rest of the canvas is black
(pixel value 0, which normalizes to -mean/std). The canvas is cut into tiles row by row, and the image's
tiles are followed by all-zero padding tiles up to max_num_tiles. With it come the arrangement's
aspect-ratio id (1-based index into the tile arrangements, see tile_arrangements) and the tile mask
(1 for the image's tiles, 0 for padding tiles). A tiny image is upscaled to fill at least one tile; a
huge one is shrunk to fit the largest canvas its aspect ratio allows.

The resize is PIL's antialiased bilinear on the CPU, bit-exact with transformers' PIL backend; on a GPU
it is torch's antialiased bilinear on the device, batched over images of the same size and rounded
to 0-255 as transformers' torchvision backend does, which is within one pixel level of PIL's.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from lmmrt.errors import ConfigError
from lmmrt.runtime.processor import _to_uint8_hwc, pil_to_rgb

RESAMPLERS = ("auto", "pil", "torch")


@dataclass
class MllamaPixels:
    """Preprocessed Mllama images. pixels: (N, max_num_tiles, 3, S, S) float32, normalized, padding
    tiles all zero; aspect_ratio_ids: (N,) long, 1-based (see tile_arrangements); aspect_ratio_mask:
    (N, max_num_tiles) long, 1 on each image's tiles (the first num_tiles[i]); num_tiles: per image."""

    pixels: torch.Tensor
    aspect_ratio_ids: torch.Tensor
    aspect_ratio_mask: torch.Tensor
    num_tiles: list[int]


@functools.lru_cache(maxsize=8)
def tile_arrangements(max_num_tiles: int) -> tuple[tuple[int, int], ...]:
    """Every (tiles_h, tiles_w) with tiles_h * tiles_w <= max_num_tiles, in the order transformers'
    processor numbers them (aspect_ratio_id = index + 1): tiles_h major. For 4: (1,1) (1,2) (1,3)
    (1,4) (2,1) (2,2) (3,1) (4,1), which is the released checkpoints' supported_aspect_ratios."""
    return tuple((h, w) for h in range(1, max_num_tiles + 1) for w in range(1, max_num_tiles + 1)
                 if h * w <= max_num_tiles)


def optimal_canvas(height: int, width: int, *, max_num_tiles: int, tile_size: int) -> tuple[int, int]:
    """(tiles_h, tiles_w) of the canvas an image of height x width is resized onto: the smallest
    scale >= 1 (fit scale = the smaller of the two side ratios) if any canvas upscales, else the
    largest; the smallest area among canvases of equal scale. The scales are float64 divisions,
    compared exactly, as transformers compares them."""
    # transformers breaks scale ties by area. Keeping the first candidate of a tie is the same rule: the
    # arrangements of one scale c all have tiles_h >= c * height / tile and tiles_w >= c * width / tile,
    # with equality on a side for each, so the first in tiles_h-major order has the fewest of both
    best = None  # (key, arrangement): key orders candidates, smaller is better
    for th, tw in tile_arrangements(max_num_tiles):
        scale = min((th * tile_size) / height, (tw * tile_size) / width)
        key = (0, scale) if scale >= 1 else (1, -scale)
        if best is None or key < best[0]:
            best = (key, (th, tw))
    return best[1]


def fit_to_canvas(height: int, width: int, canvas_h: int, canvas_w: int, tile_size: int) -> tuple[int, int]:
    """The resized (height, width): each side's target clamped to [tile_size, canvas side]; the side
    with the smaller scale takes its target, the other is scaled by that side's scale and floored
    (at least 1, at most its own target)."""
    target_h = min(max(height, tile_size), canvas_h)
    target_w = min(max(width, tile_size), canvas_w)
    scale_h = target_h / height
    scale_w = target_w / width
    if scale_w < scale_h:
        return min(math.floor(height * scale_w) or 1, target_h), target_w
    return target_h, min(math.floor(width * scale_h) or 1, target_w)


def _check_vision_config(vcfg) -> None:
    if getattr(vcfg, "kind", None) != "mllama":
        raise ValueError(f"preprocess_mllama_images needs a Mllama vision config (vision.kind 'mllama'), "
                         f"got vision.kind {getattr(vcfg, 'kind', None)!r}")
    declared = getattr(vcfg, "supported_aspect_ratios", None)
    if declared is not None and [tuple(r) for r in declared] != list(tile_arrangements(vcfg.max_num_tiles)):
        # transformers' processor numbers the arrangements itself from max_num_tiles, whatever the model
        # config lists; a checkpoint whose list differs would read other tile embeddings than it expects
        raise ConfigError(f"vision.supported_aspect_ratios = {declared} is not the tile arrangement list that "
                         f"Mllama's image processor numbers for max_num_tiles = {vcfg.max_num_tiles}: "
                         f"{[list(r) for r in tile_arrangements(vcfg.max_num_tiles)]}")


_MLLAMA_IMAGE_KINDS = "pass a PIL image or a uint8 (H, W, 3) array or tensor"


def _rgb_uint8(img, vcfg, where: str) -> torch.Tensor:
    """(H, W, 3) uint8 (a tensor stays on its device), converted to RGB as transformers' processors
    convert (transparency composited onto white)."""
    from PIL import Image

    if isinstance(img, Image.Image):
        return torch.from_numpy(np.array(pil_to_rgb(img, on_white=True, where=where)))
    # refused here, not in _to_uint8_hwc, whose hints offer float (3, H, W) tensors, which Mllama does not take
    if not isinstance(img, (np.ndarray, torch.Tensor)):
        raise TypeError(f"{where}: unsupported image type {type(img).__name__}; {_MLLAMA_IMAGE_KINDS}")
    if img.dtype not in (np.uint8, torch.uint8):
        kind = "numpy array" if isinstance(img, np.ndarray) else "tensor"
        raise TypeError(f"{where}: Mllama images are tiled from their 0-255 pixels; {_MLLAMA_IMAGE_KINDS}, not a "
                        f"{kind} of dtype {img.dtype} and shape {tuple(img.shape)}")
    u8 = _to_uint8_hwc(img, vcfg, where)
    if min(u8.shape[0], u8.shape[1]) < 1:
        raise ValueError(f"{where}: empty image of shape {tuple(u8.shape)}")
    return u8


def _resize_pil(u8: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(H, W, 3) uint8 -> (3, h, w) uint8 with PIL's bilinear filter, as transformers' PIL backend."""
    from PIL import Image

    if tuple(u8.shape[:2]) != size:
        u8 = torch.from_numpy(np.array(Image.fromarray(u8.cpu().numpy()).resize(size[::-1], resample=Image.BILINEAR)))
    return u8.permute(2, 0, 1)


def _resize_torch(frames: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(n, H, W, 3) uint8 on any device -> (n, 3, h, w) uint8: antialiased bilinear in float32, rounded
    to 0-255 as torchvision's uint8 resize (transformers' torchvision backend) rounds."""
    x = frames.permute(0, 3, 1, 2)
    if tuple(x.shape[-2:]) == size:
        return x
    x = F.interpolate(x.float(), size=size, mode="bilinear", antialias=True, align_corners=False)
    return x.round_().clamp_(0, 255).to(torch.uint8)


@functools.lru_cache(maxsize=16)
def _mean_std(mean: tuple, std: tuple, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    # float32, as transformers normalizes; cached per device: no host-to-device copy per call
    return (torch.tensor(mean, dtype=torch.float32, device=device).view(1, 1, 3, 1, 1),
            torch.tensor(std, dtype=torch.float32, device=device).view(1, 1, 3, 1, 1))


def _normalized_tiles(canvas: torch.Tensor, tiles_h: int, tiles_w: int, mean_std) -> torch.Tensor:
    """canvas: (n, 3, tiles_h * S, tiles_w * S) uint8 -> (n, tiles_h * tiles_w, 3, S, S) float32, tiles
    in row-major order, normalized bit-exactly as transformers normalizes: it rescales in float64
    (v * (1/255), cast to float32), which for every level v in 0-255 is float32's v / 255; then
    (x - mean) / std in float32."""
    n, _, height, width = canvas.shape
    s = height // tiles_h
    tiles = canvas.view(n, 3, tiles_h, s, tiles_w, s).permute(0, 2, 4, 1, 3, 5)
    mean, std = mean_std
    return tiles.reshape(n, tiles_h * tiles_w, 3, s, s).float().div_(255).sub_(mean).div_(std)


def preprocess_mllama_images(images: list, vcfg, device=None, *, where: str | list[str],
                             resampler: str = "auto") -> MllamaPixels:
    """A list of images (PIL, or uint8 (H, W, 3) numpy arrays / torch tensors; any size and aspect
    ratio) -> MllamaPixels on `device` (default CPU), as transformers' MllamaImageProcessor makes
    them for vision config `vcfg` (kind "mllama": image_size, max_num_tiles, image_mean, image_std).

    resampler: "pil" resizes on the CPU with PIL, bit-exact with transformers' PIL backend; "torch"
    resizes with torch on `device`, all images of one size in one call (within one 0-255 level of
    PIL); "auto" is "torch" on a CUDA device and "pil" elsewhere. Errors name `where[i]`, or where[i]
    itself when `where` is a list (one name per image)."""
    if resampler not in RESAMPLERS:
        raise ValueError(f"resampler must be one of {RESAMPLERS}, got {resampler!r}")
    _check_vision_config(vcfg)
    device = torch.device("cpu" if device is None else device)
    on_device = resampler == "torch" or (resampler == "auto" and device.type == "cuda")
    tile, max_tiles = vcfg.image_size, vcfg.max_num_tiles
    names = where if isinstance(where, list) else [f"{where}[{i}]" for i in range(len(images))]
    frames = [_rgb_uint8(img, vcfg, name) for img, name in zip(images, names)]

    # the plan of each image: its canvas (tiles_h, tiles_w) and its resized (height, width)
    canvases, sizes = [], []
    for u8 in frames:
        th, tw = optimal_canvas(u8.shape[0], u8.shape[1], max_num_tiles=max_tiles, tile_size=tile)
        canvases.append((th, tw))
        sizes.append(fit_to_canvas(u8.shape[0], u8.shape[1], th * tile, tw * tile, tile))

    resized: list[torch.Tensor | None] = [None] * len(frames)
    if on_device:
        by_shape: dict[tuple[int, int], list[int]] = {}
        for i, u8 in enumerate(frames):
            by_shape.setdefault(tuple(u8.shape[:2]), []).append(i)
        for idx in by_shape.values():  # one source size -> one canvas and one resized size
            out = _resize_torch(torch.stack([frames[i].to(device) for i in idx]), sizes[idx[0]])
            for k, i in enumerate(idx):
                resized[i] = out[k]
    else:
        resized = [_resize_pil(u8, size).to(device) for u8, size in zip(frames, sizes)]

    n = len(frames)
    pixels = torch.empty(n, max_tiles, 3, tile, tile, device=device)
    mean_std = _mean_std(tuple(vcfg.image_mean), tuple(vcfg.image_std), device)
    by_canvas: dict[tuple[int, int], list[int]] = {}
    for i, canvas in enumerate(canvases):
        by_canvas.setdefault(canvas, []).append(i)
    for (th, tw), idx in by_canvas.items():
        canvas = torch.zeros(len(idx), 3, th * tile, tw * tile, dtype=torch.uint8, device=device)
        for k, i in enumerate(idx):  # top-left; the rest stays black (0), as transformers pads
            canvas[k, :, :sizes[i][0], :sizes[i][1]] = resized[i]
        rows = torch.tensor(idx, device=device)
        pixels[rows, :th * tw] = _normalized_tiles(canvas, th, tw, mean_std)
        pixels[rows, th * tw:] = 0  # padding tiles (pixels is allocated uninitialized: the tiles are most of it)

    num_tiles = [th * tw for th, tw in canvases]
    arrangements = tile_arrangements(max_tiles)
    ids = torch.tensor([arrangements.index(c) + 1 for c in canvases], dtype=torch.long)
    mask = (torch.arange(max_tiles)[None] < torch.tensor(num_tiles, dtype=torch.long).view(n, 1)).long()
    return MllamaPixels(pixels, ids.to(device), mask.to(device), num_tiles)
