"""CuPy arrays (or any DLPack producer) in and out of lmmrt's public kernel functions.

`accepts_dlpack_arrays(fn)`: array arguments that are not torch tensors but speak DLPack become
torch tensors with `torch.from_dlpack` (no copy, same memory; the producer orders its stream
before torch's current one, as the protocol says), and the results go back through the first such
argument's library (`cupy.from_dlpack`), so a CuPy caller gets CuPy arrays. Torch callers pay one
isinstance scan.
"""

from __future__ import annotations

import functools
import importlib

import torch


def _is_foreign_array(x) -> bool:
    return not isinstance(x, torch.Tensor) and hasattr(x, "__dlpack__") and hasattr(x, "__dlpack_device__")


def _library(x) -> str:
    return type(x).__module__.split(".")[0]


def accepts_dlpack_arrays(fn):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        foreign = [a for a in (*args, *kwargs.values()) if _is_foreign_array(a)]
        if not foreign:
            return fn(*args, **kwargs)
        libs = sorted({_library(a) for a in foreign})
        if len(libs) > 1:
            raise TypeError(f"{fn.__name__}: arrays of one library at a time, got {', '.join(libs)}")
        lib = importlib.import_module(libs[0])
        if not hasattr(lib, "from_dlpack"):
            raise TypeError(f"{fn.__name__}: {libs[0]} arrays cannot be returned (no {libs[0]}.from_dlpack)")

        def to_torch(a):
            return torch.from_dlpack(a) if _is_foreign_array(a) else a

        result = fn(*[to_torch(a) for a in args], **{k: to_torch(v) for k, v in kwargs.items()})
        if isinstance(result, tuple):
            return tuple(lib.from_dlpack(r) for r in result)
        return lib.from_dlpack(result)

    return wrapper
