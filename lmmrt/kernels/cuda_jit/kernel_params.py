"""The kernels' by-value parameter structs (csrc/include/lmmrt/api.h) as ctypes, and the launch
geometry of csrc's host launchers, for launching the NVRTC-compiled kernels from Python.

The structs are written twice (C++ and here) by necessity: a kernel parameter is raw bytes.
`struct_layout_asserts()` turns this description into C++ static_asserts (offset of every field,
size) that each JIT compile checks, so a field added on one side only is a compile error, on the
CPU, not a silent misread on the GPU.
"""

from __future__ import annotations

import ctypes

# lmmrt::decode_detail::kDecodeThreads / kDecodeUnroll (statically asserted in the JIT source).
DECODE_THREADS = 128
DECODE_UNROLL = 4
GATED_THREADS = 256
GATED_MAX_BLOCKS = 65536


class DecodeParams(ctypes.Structure):
    _fields_ = [
        ("out", ctypes.c_void_p), ("q", ctypes.c_void_p), ("k", ctypes.c_void_p), ("v", ctypes.c_void_p),
        ("text_time", ctypes.c_void_p), ("media_start", ctypes.c_void_p), ("media_count", ctypes.c_void_p),
        ("tt_int64", ctypes.c_bool), ("ms_int64", ctypes.c_bool), ("mc_int64", ctypes.c_bool),
        ("ws_acc", ctypes.c_void_p), ("ws_ml", ctypes.c_void_p),
        ("batch", ctypes.c_int), ("heads", ctypes.c_int), ("latents", ctypes.c_int),
        ("num_media", ctypes.c_int64),
        ("q_stride_b", ctypes.c_int64), ("q_stride_h", ctypes.c_int64),
        ("out_stride_b", ctypes.c_int64), ("out_stride_h", ctypes.c_int64),
        ("kv_stride_tok", ctypes.c_int64), ("kv_stride_h", ctypes.c_int64),
        ("tt_stride", ctypes.c_int64), ("ms_stride", ctypes.c_int64), ("mc_stride", ctypes.c_int64),
        ("cumulative", ctypes.c_bool), ("scale", ctypes.c_float), ("num_splits", ctypes.c_int),
    ]


class NormParams(ctypes.Structure):
    _fields_ = [
        ("out", ctypes.c_void_p), ("h_out", ctypes.c_void_p), ("x", ctypes.c_void_p),
        ("residual", ctypes.c_void_p), ("weight", ctypes.c_void_p), ("bias", ctypes.c_void_p),
        ("rows", ctypes.c_int64), ("dim", ctypes.c_int), ("eps", ctypes.c_float), ("layer_norm", ctypes.c_bool),
    ]


def struct_layout_asserts() -> str:
    """C++ static_asserts that lmmrt::DecodeParams / NormParams have exactly this module's layout."""
    lines = []
    for cls in (DecodeParams, NormParams):
        name = f"lmmrt::{cls.__name__}"
        lines.append(f"static_assert(sizeof({name}) == {ctypes.sizeof(cls)}, \"{cls.__name__} size differs from "
                     "lmmrt/kernels/cuda_jit/kernel_params.py\");")
        for field, _ in cls._fields_:
            off = getattr(cls, field).offset
            lines.append(f"static_assert(__builtin_offsetof({name}, {field}) == {off}, \"{cls.__name__}.{field} "
                         "moved: update lmmrt/kernels/cuda_jit/kernel_params.py\");")
    return "\n".join(lines)


def norm_threads(nvec: int) -> int:
    """Block size of the norm kernel for nvec packs per row (csrc/include/lmmrt/norms.cuh fused_norm)."""
    return 1024 if nvec >= 1024 else ((nvec + 31) // 32) * 32


def gated_blocks(nvec: int) -> int:
    return min(-(-nvec // GATED_THREADS), GATED_MAX_BLOCKS)
