"""The math of Flamingo-style models in plain PyTorch modules, dispatching hot ops to kernels."""

from lmmrt.models import opt  # noqa: F401 - registers the OPT decoder family
from lmmrt.models.config import DecoderConfig, ModelConfig, PerceiverConfig, VisionConfig, XAttnConfig
from lmmrt.models.flamingo import FlamingoModel

__all__ = ["DecoderConfig", "FlamingoModel", "ModelConfig", "PerceiverConfig", "VisionConfig", "XAttnConfig"]
