"""Operator and launch counts per decode step, by differencing two profiled generate calls.

    per step = (count in a generate of n2 new tokens - count in one of n1) / (n2 - n1)

Prefill, media encoding and per-call setup are the same in both calls and cancel, so the decode
loop can stay a black box: the same measurement serves lmmrt's eager step, its fixed-shape step
and transformers' `generate`. Counted (torch.profiler):
- `aten`: every aten:: operator event, nested ones included (aten::linear -> aten::addmm counts 2);
- `aten_top`: aten:: events with no aten:: ancestor, i.e. the operators called from Python;
- on CUDA also `kernel_launches` (cudaLaunchKernel / cuLaunchKernel runtime calls) and
  `graph_launches` (cudaGraphLaunch): a graph-replayed step shows ~1 graph launch and few kernels.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

KERNEL_LAUNCH = ("cudaLaunchKernel", "cuLaunchKernel", "cudaLaunchKernelExC", "cuLaunchKernelEx")
GRAPH_LAUNCH = ("cudaGraphLaunch", "cuGraphLaunch")


def _is_aten(ev) -> bool:
    return ev.name.startswith("aten::")


def count_ops(fn: Callable[[], object], *, cuda: bool = False) -> dict[str, int]:
    """Run fn() once under torch.profiler and count its aten operators (and launches on CUDA)."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof:
        fn()
        if cuda:
            torch.cuda.synchronize()
    counts = {"aten": 0, "aten_top": 0}
    if cuda:
        counts.update(kernel_launches=0, graph_launches=0)
    for ev in prof.events():
        if _is_aten(ev):
            counts["aten"] += 1
            parent = ev.cpu_parent
            while parent is not None and not _is_aten(parent):
                parent = parent.cpu_parent
            counts["aten_top"] += parent is None
        elif cuda and ev.name in KERNEL_LAUNCH:
            counts["kernel_launches"] += 1
        elif cuda and ev.name in GRAPH_LAUNCH:
            counts["graph_launches"] += 1
    return counts


def per_decode_step(generate_n: Callable[[int], object], *, n1: int = 2, n2: int = 6,
                    cuda: bool = False) -> dict[str, float]:
    """Counts per decode step of `generate_n(new_tokens)`, which must run exactly new_tokens
    steps (EOS ignored). Both lengths run once unprofiled first, so lazy initialisation (a CUDA
    graph captured per cache-length bucket, caches grown) is counted in neither."""
    if not 1 <= n1 < n2:
        raise ValueError(f"need 1 <= n1 < n2, got n1={n1}, n2={n2}")
    generate_n(n1)
    generate_n(n2)
    short = count_ops(lambda: generate_n(n1), cuda=cuda)
    long = count_ops(lambda: generate_n(n2), cuda=cuda)
    return {k: (long[k] - short[k]) / (n2 - n1) for k in long}
