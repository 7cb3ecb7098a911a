"""Decode self-attention microbenchmark (lmmrt.kernels.decode_attention): one new token per row
over its filled slice of a static KV cache.

Shapes: the language models' self-attention, with a cache allocated for S = 2048 slots (IDEFICS's
and OpenFlamingo's context) of which `filled` in {128, 1536} are in use per row (each row also has
0-15 slots of left padding before its range), batch B in {1, 8, 32}.
IDEFICS-9B (LLaMA-7B): 32 heads x 128, no GQA; OpenFlamingo-9B (MPT-7B): 32 x 128 with ALiBi;
a GQA LLaMA of the same width: 32 query heads over 8 kv heads.

Implementations, on the same rotating inputs (each cache a layer's view of a (2, B, KV, S, dh)
K/V tensor):
- eager: lmmrt's torch backend, the reference (dense over all S slots with a range mask, fp32);
- sdpa-dense-mask: F.scaled_dot_product_attention in the input dtype over all S slots with a
  (B, 1, 1, S) boolean mask, or with the ALiBi bias (B, H, 1, S) holding -inf where masked — what a
  capturable step did before this kernel. Mask and bias are built outside the timed region;
- sdpa-prefix: the same over the first max(key_end) slots only: needs that length on the host, so
  it cannot be captured in a CUDA graph (the eager decode loop's reference point);
- compile: torch.compile of the reference;
- triton: lmmrt's flash-decoding kernel (GPU only), reading only each row's range.

Useful work (the same for every implementation; the dense baselines do more):
  FLOPs = 4 * H * dh * sum_b len_b
  bytes = e * (2 * B * H * dh + 2 * KV * dh * sum_b len_b) + index bytes
          (read q, write out, read the K and V of each row's range once)
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from bench.bench_perceiver import lmmrt_backends
from bench.harness import BenchRun, Impl, rotation_sets

MODELS = {
    "idefics-9b": dict(heads=32, kv_heads=32, head_dim=128, alibi=False),
    "openflamingo-9b": dict(heads=32, kv_heads=32, head_dim=128, alibi=True),
    "llama-gqa": dict(heads=32, kv_heads=8, head_dim=128, alibi=False),
}
CACHE_LEN, FILLED, BATCH = 2048, (128, 1536), (1, 8, 32)
SMOKE_MODELS = {
    "idefics-tiny": dict(heads=4, kv_heads=4, head_dim=16, alibi=False),
    "openflamingo-tiny": dict(heads=4, kv_heads=2, head_dim=16, alibi=True),
}
SMOKE_CACHE_LEN, SMOKE_FILLED, SMOKE_BATCH = 64, (8, 40), (1, 3)
MAX_PAD = 16

FORMULAS = {
    "flops": "4 * heads * head_dim * sum_b len_b",
    "bytes": "elem * (2*B*heads*head_dim + 2*kv_heads*head_dim*sum_b len_b) + index bytes",
}


def work(lengths: torch.Tensor, H: int, KV: int, dh: int, elem: int) -> tuple[float, float]:
    B, keys = lengths.numel(), float(lengths.sum())
    return 4.0 * H * dh * keys, float(elem) * (2 * B * H * dh + 2 * KV * dh * keys) + 16.0 * B


def make_inputs(spec: dict, B: int, S: int, filled: int, dtype, device, n_sets: int) -> list[tuple]:
    """(q, k_cache, v_cache, key_start, key_end, slopes, dense_bias, prefix) per set. The slots
    outside the ranges hold random values (not NaN): the SDPA baselines would spread NaN."""
    from lmmrt.models.decoder import alibi_slopes

    H, KV, dh = spec["heads"], spec["kv_heads"], spec["head_dim"]
    slopes = alibi_slopes(H, device=device) if spec["alibi"] else None
    slots = torch.arange(S, device=device)
    sets = []
    for _ in range(n_sets):
        q = torch.randn(B, H, dh, device=device, dtype=dtype)
        kv = torch.randn(2, B, KV, S, dh, device=device, dtype=dtype)
        start = torch.randint(0, min(MAX_PAD, S - filled + 1), (B,), device=device, dtype=torch.int32)
        end = start + filled
        allowed = (slots >= start[:, None]) & (slots < end[:, None])  # (B, S)
        if slopes is None:
            bias = allowed[:, None, None, :]
        else:
            dist = (slots[None, :] - (end[:, None] - 1)).float()
            bias = (slopes[None, :, None, None] * dist[:, None, None, :]).to(dtype)
            bias = bias.masked_fill(~allowed[:, None, None, :], float("-inf"))
        prefix = int(end.max())  # the host read the sdpa-prefix baseline needs, made here
        sets.append((q, kv[0], kv[1], start, end, slopes, bias, prefix))
    return sets


def sdpa_dense(q, k, v, start, end, slopes, bias, prefix):
    out = F.scaled_dot_product_attention(q[:, :, None], k, v, attn_mask=bias, enable_gqa=k.shape[1] != q.shape[1])
    return out[:, :, 0]


def sdpa_prefix(q, k, v, start, end, slopes, bias, prefix):
    out = F.scaled_dot_product_attention(q[:, :, None], k[:, :, :prefix], v[:, :, :prefix],
                                         attn_mask=bias[..., :prefix], enable_gqa=k.shape[1] != q.shape[1])
    return out[:, :, 0]


def impls(device: torch.device, *, use_compile: bool, compiled=None) -> list[Impl]:
    from lmmrt.kernels.decode_attention import decode_attention

    def lm(backend):
        return lambda q, k, v, s, e, slopes, *_: decode_attention(q, k, v, s, e, alibi_slopes=slopes,
                                                                   backend=backend)

    out = [Impl("eager", lm("torch"), graph=True)]  # the reference is capturable too
    out += [Impl(b, lm(b), kind="lmmrt", graph=True) for b in lmmrt_backends("decode_attention", device)]
    out += [Impl("sdpa-dense-mask", sdpa_dense, graph=True), Impl("sdpa-prefix", sdpa_prefix)]
    if use_compile and compiled is not None:
        out.append(Impl("compile", lambda q, k, v, s, e, slopes, *_: compiled(q, k, v, s, e, alibi_slopes=slopes),
                        compiled=True))
    return out


def run(*, device: torch.device, dtype: torch.dtype, out_dir: Path, smoke: bool, budget_s: float,
        ceilings: dict | None = None, use_compile: bool = True) -> dict:
    from lmmrt.kernels.decode_attention import decode_attention_reference

    torch.manual_seed(0)
    b = BenchRun("decode_attention", device=device, dtype=dtype, smoke=smoke, out_dir=out_dir,
                 budget_s=budget_s, ceilings=ceilings, formulas=FORMULAS, description=__doc__.split("\n\n")[0])
    models = SMOKE_MODELS if smoke else MODELS
    S, fills, batches = (SMOKE_CACHE_LEN, SMOKE_FILLED, SMOKE_BATCH) if smoke else (CACHE_LEN, FILLED, BATCH)
    if device.type != "cuda":
        b.notes.append("CPU run: the triton backend is not timed (the Triton interpreter is too slow to time)")
    compiled = torch.compile(decode_attention_reference) if use_compile else None
    imps = impls(device, use_compile=use_compile, compiled=compiled)
    elem = torch.tensor([], dtype=dtype).element_size()
    for B in batches:
        for filled in fills:
            for name, spec in models.items():
                H, KV, dh = spec["heads"], spec["kv_heads"], spec["head_dim"]
                label = f"{name} B={B} filled={filled}/{S}"
                shape = dict(model=name, batch=B, cache_len=S, filled=filled, heads=H, kv_heads=KV,
                             head_dim=dh, alibi=spec["alibi"])
                if b.elapsed > budget_s:
                    b.skip_case("decode", label, shape, [i.name for i in imps], "time budget spent")
                    continue
                flops, nbytes = work(torch.full((B,), filled), H, KV, dh, elem)
                alloc = elem * (2 * B * KV * S * dh + B * H * S)
                sets = rotation_sets(nbytes, device, alloc_bytes_per_set=alloc, smoke=smoke)
                inputs = make_inputs(spec, B, S, filled, dtype, device, sets)
                b.case("decode", label, shape, imps, inputs, flops, nbytes)
                del inputs
    return b.finish()


if __name__ == "__main__":
    import sys

    from bench.run import main

    sys.exit(main(["--only", "decode_attention", *sys.argv[1:]]))
