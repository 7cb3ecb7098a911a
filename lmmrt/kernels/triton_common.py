"""What the Triton kernel files share: the guarded import (the package and its torch paths work
without triton), online-softmax constants, launch-heuristic helpers, and the flash-decoding
split workspaces with their combine kernel."""

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


def split_workspaces(rows: int, block_d: int, device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """fp32 (acc, max, sum) partials of `rows` (program, split) slots for split_softmax_combine_kernel.
    Allocated through torch's allocator: inside a CUDA-graph capture this is the graph's pool."""
    ws_acc = torch.empty((rows, block_d), dtype=torch.float32, device=device)
    ws_m = torch.empty((rows,), dtype=torch.float32, device=device)
    return ws_acc, ws_m, torch.empty_like(ws_m)


@jit
def split_softmax_combine_kernel(
    WS_ACC, WS_M, WS_L, O, so_b, so_h, so_d, H,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, NUM_SPLITS: tl.constexpr, SPLITS_P2: tl.constexpr,
    NEG_INIT: tl.constexpr,
):
    # grid: (batch * heads,). Log-sum-exp merge of the split partials (decode attention and the
    # cross-attention decode kernel write the same layout: slot (b * H + h) * NUM_SPLITS + split).
    pid = tl.program_id(0)
    b = pid // H
    h = pid % H
    offs_s = tl.arange(0, SPLITS_P2)
    offs_d = tl.arange(0, BLOCK_D)
    s_ok = offs_s < NUM_SPLITS
    ws = pid.to(tl.int64) * NUM_SPLITS + offs_s
    m_s = tl.load(WS_M + ws, mask=s_ok, other=NEG_INIT)
    l_s = tl.load(WS_L + ws, mask=s_ok, other=0.0)
    acc_s = tl.load(WS_ACC + ws[:, None] * BLOCK_D + offs_d[None, :], mask=s_ok[:, None], other=0.0)
    m = tl.max(m_s, 0)
    w = tl.exp2(m_s - m)  # empty splits have l = 0 and acc = 0, whatever their weight
    l_tot = tl.sum(w * l_s, 0)
    acc = tl.sum(w[:, None] * acc_s, 0)
    out = tl.where(l_tot > 0, acc / tl.where(l_tot > 0, l_tot, 1.0), 0.0)
    tl.store(O + b.to(tl.int64) * so_b + h * so_h + offs_d * so_d, out.to(O.dtype.element_ty),
             mask=offs_d < HEAD_DIM)
