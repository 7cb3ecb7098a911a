"""RoPE frequency scaling: Llama 3.1's "llama3" rule (Llama 3.1 / 3.2, Llama 3.2 Vision).

The config side is a JSON object (DecoderConfig.rope_scaling), checked field by field here:
{"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
 "original_max_position_embeddings": 8192}.

The rule (Meta's llama3 reference, transformers' `_compute_llama3_parameters`): with wavelength
w = 2 pi / f of each inverse frequency f and the pretraining context C,
- w < C / high_freq_factor (high frequencies): f unchanged;
- w > C / low_freq_factor (low frequencies): f / factor;
- in between: a linear blend in s = (C / w - low_freq_factor) / (high_freq_factor - low_freq_factor),
  (1 - s) f / factor + s f.
"""

from __future__ import annotations

import math

import torch

from lmmrt.errors import ConfigError
from lmmrt.models.config_fields import MAX_SEQ_LEN, choice, integer, real

ROPE_TYPES = ("llama3",)
LLAMA3_FIELDS = ("rope_type", "factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")


def checked_rope_scaling(value, name: str = "decoder.rope_scaling") -> dict | None:
    """The rope_scaling config object with every field checked (ConfigError naming the field), or
    None for plain RoPE."""
    if value is None:
        return None
    if not isinstance(value, dict):
        raise ConfigError(f"{name}: must be a JSON object or null (got {type(value).__name__})")
    choice(value.get("rope_type"), f"{name}.rope_type", ROPE_TYPES)
    missing = [k for k in LLAMA3_FIELDS if k not in value]
    unknown = sorted(set(value) - set(LLAMA3_FIELDS))
    if missing or unknown:
        raise ConfigError(f"{name}: llama3 scaling needs exactly the fields {list(LLAMA3_FIELDS)}"
                          + (f"; missing {missing}" if missing else "") + (f"; unknown {unknown}" if unknown else ""))
    factor = real(value["factor"], f"{name}.factor", lo=1.0)
    low = real(value["low_freq_factor"], f"{name}.low_freq_factor", lo=0.0, lo_open=True)
    high = real(value["high_freq_factor"], f"{name}.high_freq_factor", lo=0.0, lo_open=True)
    if high <= low:  # the blend divides by high - low
        raise ConfigError(f"{name}: high_freq_factor = {high} must be greater than low_freq_factor = {low}")
    context = integer(value["original_max_position_embeddings"], f"{name}.original_max_position_embeddings",
                      lo=1, hi=MAX_SEQ_LEN)
    return {"rope_type": "llama3", "factor": factor, "low_freq_factor": low, "high_freq_factor": high,
            "original_max_position_embeddings": context}


def scale_inv_freq(inv_freq: torch.Tensor, scaling: dict) -> torch.Tensor:
    """inv_freq (rotary_dim / 2,) float32 -> the same frequencies under `scaling` (a checked
    rope_scaling object), float32."""
    factor, low, high = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
    context = scaling["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv_freq
    blend = (context / wavelen - low) / (high - low)
    blended = (1 - blend) * inv_freq / factor + blend * inv_freq
    # strict comparisons: a wavelength equal to a threshold is blended, as in the reference
    out = torch.where(wavelen < context / high, inv_freq, blended)
    return torch.where(wavelen > context / low, inv_freq / factor, out)
