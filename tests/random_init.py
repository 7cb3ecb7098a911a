"""Random, non-zero parameters for the tiny transformers models of the parity tests: a zero weight,
norm or bias would hide a wrong or missing tensor in a converter."""

from __future__ import annotations

from collections.abc import Callable

import torch


def randomize_parameters(model: torch.nn.Module, g: torch.Generator, *,
                         special: Callable[[str, torch.nn.Parameter], bool] | None = None) -> None:
    """Norm weights near 1, biases and other weights small, drawn from `g` in parameter order.
    special(name, p), when given, is asked first and returns True where it set p itself (gates, scales)."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if special is not None and special(name, p):
                continue
            if name.endswith("weight") and p.dim() == 1:
                p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=g))
            elif name.endswith("bias"):
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(0.2 * torch.randn(p.shape, generator=g))


def randomize(model: torch.nn.Module, seed: int) -> None:
    """Every parameter random and non-zero: norms near 1, biases and weights small."""
    randomize_parameters(model, torch.Generator().manual_seed(seed))
