"""What the Triton kernel files share: the guarded import (the package and its torch paths work
without triton), online-softmax constants, and launch-heuristic helpers."""

from __future__ import annotations

import functools

import torch

from lmmrt.kernels import backend as _backend

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised only where triton is absent
    triton = None
    tl = None

KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
MAX_HEAD_DIM = 256
# The running max starts at a large finite negative value instead of -inf: a row whose keys so far
# are all masked keeps alpha = exp2(0) = 1 and p = exp2(-inf) = 0 instead of exp2(-inf + inf) = nan.
NEG_INIT = -1.0e30
LOG2E = 1.4426950408889634


def attention_tiles(block_d: int, dtype: torch.dtype) -> dict:
    """GPU tile sizes of the flash-attention style kernels (perceiver, cross-attention prefill), by
    head-dim tile and dtype: BLOCK_ROWS query rows, BLOCK_N keys per step, warps, pipeline stages.

    Each pipeline stage holds a K and a V tile in shared memory (BLOCK_N x BLOCK_D each). Up to
    128-wide heads, 64-key tiles with 3 stages (2 in fp32) fit sm_80's 163 KiB with room to spare
    and compile without register spills in bf16. Wider heads (160/192/256, padded to 256) would
    need ~172-180 KiB with those: they take 32-key tiles and 2 stages, and fp32 (twice the bytes,
    twice the registers for q and the accumulator) also halves the query rows.
    tests/kernels/triton_gpu_compile.py checks every choice against sm_80/sm_90 limits."""
    if block_d <= 128:
        return dict(BLOCK_ROWS=64, BLOCK_N=64, num_warps=4 if block_d <= 64 else 8,
                    num_stages=2 if dtype == torch.float32 else 3)
    return dict(BLOCK_ROWS=32 if dtype == torch.float32 else 64, BLOCK_N=32, num_warps=8, num_stages=2)


def next_pow2(x: int) -> int:
    return 1 << max(0, int(x) - 1).bit_length()


@functools.lru_cache(maxsize=None)
def _sm_count_cached(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def sm_count(device) -> int:
    return _sm_count_cached(device.index if device.index is not None else torch.cuda.current_device())


def interpreted(device) -> bool:
    """True under TRITON_INTERPRET=1 or off CUDA: launch configs then favour big tiles (the
    interpreter costs ~1 ms per program instance and loop iteration)."""
    return _backend.triton_interpreted() or device.type != "cuda"


def jit(fn):
    return triton.jit(fn) if triton is not None else fn
