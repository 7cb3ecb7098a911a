"""lmmrt: a kernel-optimized inference runtime for Flamingo-style multimodal models."""

__version__ = "0.1.0"
