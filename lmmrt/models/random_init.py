"""Deterministic random weights for a config: the embedded demo model, benchmarks at real model
shapes without a download, and tests. Gates are non-zero on purpose: a zero tanh gate would hide
every cross-attention bug."""

from __future__ import annotations

import zlib

import torch

from lmmrt.models.config import ModelConfig
from lmmrt.models.flamingo import FlamingoModel
from lmmrt.models.splice import SpliceModel, build_model


@torch.no_grad()
def random_model(cfg: ModelConfig, *, seed: int = 0, device="cpu", dtype=torch.float32,
                 std: float = 0.02) -> FlamingoModel | SpliceModel:
    """Build the model directly on `device` and fill it from a seeded generator (same seed, same
    weights on any device: values are drawn on the CPU per tensor, in a fixed order)."""
    with torch.device("meta"):
        model = build_model(cfg)
    model = model.to(dtype).to_empty(device=device)  # cast on meta: no full-precision copy on the device
    g = torch.Generator().manual_seed(seed)
    on_cpu = torch.device(device).type == "cpu"
    for name, p in model.named_parameters():
        leaf = name.rsplit(".", 1)[-1]
        if name.endswith("_gate"):
            # tanh gates well away from zero (both signs)
            v = (torch.rand(p.shape, generator=g) * 0.6 + 0.3) * torch.where(torch.rand(p.shape, generator=g) < 0.5, -1.0, 1.0)
        elif leaf == "weight" and p.dim() == 1:  # norm scales
            v = 1.0 + 0.1 * torch.randn(p.shape, generator=g)
        elif leaf == "bias":
            v = 0.02 * torch.randn(p.shape, generator=g)
        elif name.endswith(("latents", "class_embed", "pos_embed", "frame_embs", "media_time_embs")):
            v = torch.randn(p.shape, generator=g)
        else:
            v = std * torch.randn(p.shape, generator=g) if on_cpu or p.numel() < (1 << 22) else None
        if v is None:
            # Large matrices on the GPU: draw there (fast), from a device generator seeded per tensor.
            dg = torch.Generator(device=device).manual_seed(seed * 1000003 + zlib.crc32(name.encode()))
            p.normal_(0.0, std, generator=dg)
        else:
            p.copy_(v.to(dtype))
    return model
