"""pytest-benchmark entry points for the kernel microbenchmarks:

    pytest bench --benchmark-only                      # one representative shape per op
    pytest bench --benchmark-only --benchmark-json=out.json

On a GPU: real model shapes in bf16, every implementation available (triton and cuda included);
without one: the smoke shapes in fp32, torch backend and baselines only. The full sweeps with
rotating inputs, CUDA graphs and roofline fractions are `python -m bench.run`; these exist for
pytest-benchmark's own comparison tooling (--benchmark-compare). CI runs `pytest tests`, which
never collects this directory.
"""

from __future__ import annotations

import pytest
import torch

from bench import bench_perceiver as bp
from bench import bench_xattn as bx

CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if CUDA else "cpu")
DTYPE = torch.bfloat16 if CUDA else torch.float32
ELEM = torch.tensor([], dtype=DTYPE).element_size()
IMPLS = ["eager", "sdpa", "compile", "triton", "cuda"]

if CUDA:
    PERCEIVER = [("idefics-9b", 8, 1), ("openflamingo-9b", 1, 8)]
    PREFILL = [("idefics-9b", 1024, 8), ("openflamingo-9b", 4096, 32)]
    DECODE = [("idefics-9b", 8, 8), ("idefics-9b", 32, 1)]
    MODELS_P, MODELS_X = bp.MODELS, bx.MODELS
else:
    PERCEIVER = [("idefics-tiny", 3, 2)]
    PREFILL = [("idefics-tiny", 48, 3)]
    DECODE = [("idefics-tiny", 3, 3)]
    MODELS_P, MODELS_X = bp.SMOKE_MODELS, bx.SMOKE_MODELS


def _pick(impls, name: str):
    for i in impls:
        if i.name == name or (name == "sdpa" and i.name.startswith("sdpa")):
            return i
    pytest.skip(f"{name} is not available here (CPU runs time the torch backend and baselines only)")


def _run(benchmark, fn, args, flops: float, nbytes: float):
    def call():
        out = fn(*args)
        if CUDA:
            torch.cuda.synchronize()
        return out

    benchmark.extra_info.update(flops=flops, bytes=nbytes, device=str(DEVICE), dtype=str(DTYPE))
    benchmark.pedantic(call, warmup_rounds=3, rounds=30 if CUDA else 5, iterations=1)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("model,media,frames", PERCEIVER)
def test_perceiver(benchmark, model, media, frames, impl):
    spec = MODELS_P[model]
    f, b = bp.work(media, frames * spec["tokens"], spec["n_latents"], spec["heads"], spec["head_dim"], ELEM)
    chosen = _pick(bp.impls(DEVICE, use_compile=impl == "compile"), impl)
    _run(benchmark, chosen.fn, bp.make_inputs(spec, media, frames, DTYPE, DEVICE, 1)[0], f, b)


def _xattn(benchmark, model, B, T, N, impl, decode):
    from lmmrt.kernels.masked_cross_attention import masked_cross_attention_reference

    spec = MODELS_X[model]
    compiled = torch.compile(masked_cross_attention_reference) if impl == "compile" else None
    chosen = _pick(bx.impls(DEVICE, decode=decode, use_compile=compiled is not None, compiled=compiled), impl)
    args = bx.make_inputs(spec, B, T, N, DTYPE, DEVICE, 1, decode=decode)[0]
    f, b = bx.work(args[3], spec["latents"], spec["heads"], spec["head_dim"], ELEM)
    _run(benchmark, chosen.fn, args, f, b)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("model,text,media", PREFILL)
def test_xattn_prefill(benchmark, model, text, media, impl):
    if impl == "cuda":
        pytest.skip("the CUDA kernel is decode-only")
    _xattn(benchmark, model, 1, text, media, impl, decode=False)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("model,batch,media", DECODE)
def test_xattn_decode(benchmark, model, batch, media, impl):
    _xattn(benchmark, model, batch, 1, media, impl, decode=True)
