"""lmmrt's ops, one per file: each holds its plain-PyTorch reference and its kernels."""

from lmmrt.kernels import masked_cross_attention_cuda, norms  # noqa: F401  (the former registers "cuda")
from lmmrt.kernels.backend import BACKENDS, requested_backend
from lmmrt.kernels.decode_attention import decode_attention, decode_attention_reference
from lmmrt.kernels.masked_cross_attention import masked_cross_attention, masked_cross_attention_reference
from lmmrt.kernels.perceiver_attention import perceiver_attention, perceiver_attention_reference

__all__ = [
    "BACKENDS",
    "norms",
    "requested_backend",
    "decode_attention",
    "decode_attention_reference",
    "masked_cross_attention",
    "masked_cross_attention_reference",
    "perceiver_attention",
    "perceiver_attention_reference",
]
