"""Image preprocessing: PIL images, uint8 HxWx3 arrays/tensors, or normalized float (3, H, W)
tensors -> normalized (N, 3, S, S) pixels, per the checkpoint's VisionConfig.

uint8 inputs are resized (bicubic), centre-cropped for CLIP checkpoints, scaled to [0, 1] and
normalized with the checkpoint's mean/std. On the CPU the resize is PIL's, exactly as the reference
processors do it; on the GPU it is torch's antialiased bicubic on the device, batched over frames
(within about 1% of the PIL result on natural images; PIL's uint8 rounding is not reproduced).
PIL images become RGB as each family's reference processor makes them (see pil_to_rgb); float
pixels must be finite and plausibly normalized (|x| <= FLOAT_PIXEL_BOUND).
"""

from __future__ import annotations

import functools

import numpy as np
import torch
import torch.nn.functional as F

from lmmrt.models.config import VisionConfig

# High-bit-depth PIL modes: PIL's conversion to RGB (which the reference processors use) clips them
# at 255, so most such images would come out all white. lmmrt refuses them instead.
_DEEP_MODES = ("I", "F")
# Normalized pixels are (x - mean) / std with x in [0, 1]: a few units at most for any real mean/std.
# Far beyond that the input is not normalized pixels (0-255 values, garbage) and would give NaN logits.
FLOAT_PIXEL_BOUND = 100.0


def check_pil_mode(img, where: str) -> None:
    """Refuse a PIL image whose conversion to RGB would clip it (see _DEEP_MODES)."""
    if img.mode in _DEEP_MODES or img.mode.startswith("I;"):
        raise ValueError(f"{where}: PIL image mode {img.mode!r} (more than 8 bits per pixel) is not supported: "
                         "converting it to RGB would clip it at 255; scale it to 8 bits first, e.g. "
                         "Image.fromarray((a * (255 / a.max())).astype(np.uint8)) with a = np.array(img)")


def pil_to_rgb(img, *, on_white: bool, where: str):
    """A PIL image in RGB. on_white: composite transparency (an alpha band, or a palette / grey / RGB
    image's transparent colour, a PNG's tRNS) onto white, as transformers' convert_to_rgb does, an RGB
    image with a transparent colour included; else .convert("RGB"), which drops the alpha, as
    open_clip's transform does."""
    from PIL import Image

    check_pil_mode(img, where)
    try:
        if on_white and ("A" in img.getbands() or img.info.get("transparency") is not None):
            rgba = img.convert("RGBA")
            return Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba).convert("RGB")
        if img.mode == "RGB":
            return img
        return img.convert("RGB")
    except ValueError as e:  # e.g. a mode PIL has no conversion to RGB for
        raise ValueError(f"{where}: cannot convert a PIL image of mode {img.mode!r} to RGB ({e})") from None


def _check_float_pixels(img: torch.Tensor, where: str) -> None:
    if img.dim() != 3 or img.shape[0] != 3:
        raise ValueError(f"{where}: a float image tensor must have shape (3, H, W) (normalized pixels), "
                         f"got {tuple(img.shape)}")
    if min(img.shape[1], img.shape[2]) < 1:
        raise ValueError(f"{where}: empty image of shape {tuple(img.shape)}")
    if not bool(torch.isfinite(img).all()):
        raise ValueError(f"{where}: the float image holds NaN or inf pixels")
    peak = float(img.abs().max())
    if peak > FLOAT_PIXEL_BOUND:
        raise ValueError(f"{where}: a float image holds normalized pixels, which lie within a few units of 0 "
                         f"(|x| <= {FLOAT_PIXEL_BOUND:g} accepted), got |x| up to {peak:.3g}; pass 0-255 pixel "
                         "values as uint8 (H, W, 3)")


def _to_uint8_hwc(img, cfg: VisionConfig, where: str) -> torch.Tensor | None:
    """A uint8 (H, W, 3) tensor for PIL / uint8 inputs; None for float tensors (already normalized)."""
    try:
        from PIL import Image
    except ImportError:  # pragma: no cover - pillow is a dependency
        Image = None
    if Image is not None and isinstance(img, Image.Image):
        # each family as its reference processor: transformers' processors composite onto white;
        # OpenFlamingo's open_clip transform (resize="resize_crop") drops the alpha
        return torch.from_numpy(np.array(pil_to_rgb(img, on_white=cfg.resize != "resize_crop", where=where)))
    if isinstance(img, np.ndarray):
        if img.dtype != np.uint8:
            raise TypeError(f"{where}: a numpy image must be uint8 (H, W, 3), got dtype {img.dtype}; "
                            "pass float pixels as a torch tensor of shape (3, H, W)")
        if img.ndim != 3 or img.shape[2] != 3:
            raise ValueError(f"{where}: a numpy image must have shape (H, W, 3), got {img.shape}"
                             + ("; pass an image with transparency as a PIL image" if img.shape[-1:] == (4,) else ""))
        return torch.from_numpy(np.ascontiguousarray(img))
    if isinstance(img, torch.Tensor):
        if img.dtype == torch.uint8:
            if img.dim() != 3 or img.shape[2] != 3:
                raise ValueError(f"{where}: a uint8 image tensor must have shape (H, W, 3), got {tuple(img.shape)}")
            return img
        if not img.is_floating_point():
            raise TypeError(f"{where}: image tensor dtype {img.dtype} is not supported "
                            "(use uint8 (H, W, 3) or float (3, H, W))")
        _check_float_pixels(img, where)
        return None
    raise TypeError(f"{where}: unsupported image type {type(img).__name__}; use a PIL image, a uint8 (H, W, 3) "
                    "array or tensor, or a normalized float (3, H, W) tensor")


def _resize_shape(h: int, w: int, cfg: VisionConfig) -> tuple[int, int]:
    """Size before the crop: the square (IDEFICS), or the shortest side scaled to the image size
    with the long side truncated, as torchvision's Resize(int) computes it (CLIP / open_clip)."""
    s = cfg.image_size
    if cfg.resize == "resize":
        return s, s
    if h <= w:
        return s, int(s * w / h)
    return int(s * h / w), s


def _crop_offsets(h: int, w: int, s: int, *, floor: bool = False) -> tuple[int, int]:
    if floor:  # transformers' center_crop (CLIPImageProcessor, resize="resize_crop_hf")
        return (h - s) // 2, (w - s) // 2
    # torchvision's CenterCrop rounding (half to even: an odd excess of 7 starts the crop at 4)
    return int(round((h - s) / 2.0)), int(round((w - s) / 2.0))


def _resize(x: torch.Tensor, cfg: VisionConfig) -> torch.Tensor:
    """x: (N, 3, H, W) float -> (N, 3, S, S): bicubic (antialiased), then the centre crop."""
    s = cfg.image_size
    h, w = x.shape[-2:]
    nh, nw = _resize_shape(h, w, cfg)
    if (nh, nw) != (h, w):
        x = F.interpolate(x, size=(nh, nw), mode="bicubic", antialias=True, align_corners=False)
    top, left = _crop_offsets(nh, nw, s, floor=cfg.resize == "resize_crop_hf")
    return x[..., top:top + s, left:left + s]


def _resize_pil(u8: torch.Tensor, cfg: VisionConfig) -> torch.Tensor:
    """(H, W, 3) uint8 on the CPU -> (S, S, 3) uint8 with PIL's bicubic filter: on the CPU lmmrt
    resizes exactly as the reference processors do (transformers' PIL backend for IDEFICS, torchvision
    on PIL images for CLIP), rounding to uint8 included."""
    from PIL import Image

    s = cfg.image_size
    h, w = u8.shape[:2]
    nh, nw = _resize_shape(h, w, cfg)
    img = Image.fromarray(u8.numpy())
    if (nh, nw) != (h, w):
        img = img.resize((nw, nh), resample=Image.BICUBIC)
    top, left = _crop_offsets(nh, nw, s, floor=cfg.resize == "resize_crop_hf")
    return torch.from_numpy(np.array(img))[top:top + s, left:left + s]


def normalize_uint8(frames: torch.Tensor, cfg: VisionConfig) -> torch.Tensor:
    """frames: (N, H, W, 3) uint8 on any device -> (N, 3, S, S) float32 normalized."""
    if frames.device.type == "cpu":  # bit-exact with the reference processors on the CPU
        frames = torch.stack([_resize_pil(f, cfg) for f in frames])
    x = frames.permute(0, 3, 1, 2).float()
    x = _resize(x, cfg).clamp_(0, 255) / 255.0
    mean, std = _mean_std(tuple(cfg.image_mean), tuple(cfg.image_std), x.device)
    return (x - mean) / std


@functools.lru_cache(maxsize=16)
def _mean_std(mean: tuple, std: tuple, device) -> tuple[torch.Tensor, torch.Tensor]:
    # cached per device: no host-to-device copy per call (it would stall a pipelined encode stream)
    return (torch.tensor(mean, device=device).view(1, 3, 1, 1), torch.tensor(std, device=device).view(1, 3, 1, 1))


def preprocess_images(images: list, cfg: VisionConfig, device=None, where: str = "images",
                      index: bool = True) -> torch.Tensor:
    """A list of images -> (N, 3, S, S) float32 on `device`. Errors name `where[i]` (or `where`
    alone when index is False)."""
    out = []
    for i, img in enumerate(images):
        name = f"{where}[{i}]" if index else where
        u8 = _to_uint8_hwc(img, cfg, name)
        if u8 is None:
            x = img.to(device=device, dtype=torch.float32)[None]
            if x.shape[-2:] != (cfg.image_size, cfg.image_size):
                x = _resize(x, cfg)
            out.append(x)
        else:
            if min(u8.shape[0], u8.shape[1]) < 1:
                raise ValueError(f"{name}: empty image of shape {tuple(u8.shape)}")
            out.append(normalize_uint8(u8.to(device)[None], cfg))
    if not out:
        return torch.empty(0, 3, cfg.image_size, cfg.image_size, device=device)
    return torch.cat(out, dim=0)
