"""lmmrt: a kernel-optimized inference runtime for Flamingo-style multimodal models.

    import lmmrt
    model = lmmrt.load("idefics-9b-lmmrt", device="cuda", dtype="bfloat16")
    out = lmmrt.generate(model, "<image>What is in this picture?", [image], max_new_tokens=32)
    print(out[0].text)
"""

import importlib as _importlib
import sys as _sys
import types as _types

__version__ = "0.1.0"

# The public names and the module defining each. They are imported on first use (PEP 562), so that
# `import lmmrt` - and with it `lmmrt --help` - does not import torch (seconds) until something needs it.
_API = {
    "Model": "lmmrt.api", "generate": "lmmrt.api", "load": "lmmrt.api", "logits": "lmmrt.api",
    "info": "lmmrt.info", "info_text": "lmmrt.info",
    "VideoClip": "lmmrt.runtime.video", "generate_video_stream": "lmmrt.runtime.video_stream",
    "load_video": "lmmrt.runtime.video", "video_prompt": "lmmrt.runtime.video",
    "embed": "lmmrt.runtime.embed", "zero_shot": "lmmrt.runtime.embed", "Embeddings": "lmmrt.runtime.embed",
    "ClipRuntime": "lmmrt.runtime.embed",
}

_SUBPACKAGES = ("api", "cli", "convert", "demo", "kernels", "models", "runtime")

__all__ = ["__version__", *_API]


def __getattr__(name: str):
    if name in _SUBPACKAGES:  # `import lmmrt; lmmrt.runtime...` worked while this file imported eagerly
        return _importlib.import_module(f"lmmrt.{name}")
    if name not in _API:
        raise AttributeError(f"module 'lmmrt' has no attribute {name!r}")
    value = getattr(_importlib.import_module(_API[name]), name)
    globals()[name] = value  # later look-ups are plain attribute reads
    return value


def __dir__():
    return sorted(["__version__", *_API, *_SUBPACKAGES])


class _Package(_types.ModuleType):
    # `lmmrt.info` is both a submodule and the function it defines. Importing the submodule (e.g.
    # `from lmmrt.info import info_text` anywhere) makes Python set the package attribute `info` to the
    # module; the public name is the function, so the function is bound in its place.
    def __setattr__(self, name, value):
        if name == "info" and isinstance(value, _types.ModuleType):
            value = value.info
        super().__setattr__(name, value)


_sys.modules[__name__].__class__ = _Package
