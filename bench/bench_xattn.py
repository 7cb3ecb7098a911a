"""Masked cross-attention microbenchmark (lmmrt.kernels.masked_cross_attention), prefill and decode.

Shapes (flamingo.md §4): text queries over the packed media K/V cache, L = 64 latents per media
item, immediate mode (each token sees the latents of its last media only).
OpenFlamingo-9B: 8 heads x 64 over a 4096-wide LM; IDEFICS-9B: 32 heads x 128.
- prefill: batch 1, T in {128, 1024, 4096} text tokens, N in {1, 8, 32} media items whose markers
  are spread evenly through the text (first at position 0, so every token sees a media item);
- decode (T = 1): batch B in {1, 8, 32}, N in {1, 8, 32} media per sequence, each row seeing a
  random one of its media.
After the perceiver a media item is 64 latents whatever its frame count, so frames do not change
these shapes (they multiply the perceiver's kv length instead; see bench_perceiver).
Llama-3.2-11B-Vision (Mllama) cases in the same groups: one image per sequence of 4 tile slots x
1601 keys (L = 6404), `tiles` of them valid (media_len), 32 query heads over 8 kv heads x 128,
mode "range"; decode at batch 1 and 16 with 4 tiles and with 1 (3 padding tiles never read),
prefill of 32 and 512 text tokens after the image. Baseline: SDPA over the image's keys with the
(B, 1, T, L) tile mask and enable_gqa (transformers' dense-mask SDPA path, without its repeat_kv).

Implementations, on the same rotating inputs:
- eager: lmmrt's torch backend, the reference (gathers each sequence's media, dense mask, fp32);
- sdpa-dense-mask: F.scaled_dot_product_attention in the input dtype over all of a sequence's
  media keys with the expanded (B, 1, T, N*L) boolean text-to-media mask. The mask is built
  outside the timed region (a model builds it once per forward for all its blocks): favourable
  to the baseline;
- compile: torch.compile of the reference;
- triton (prefill and decode), cuda (decode only: the CUDA kernel is decode-only, its prefill
  would fall back to triton): lmmrt kernels, GPU only.

Useful work (the same for every implementation; the dense baselines do more):
  keys(i) = L if text_time[i] > 0 else 0 (immediate) | L * text_time[i] (cumulative)
  FLOPs = 4 * H * dh * sum_i keys(i)
  bytes = e * (2 * B*T*H*dh + 2 * R * L*H*dh) + index bytes
          (read q, write out, read the K and V of the R media that some row attends to, once)
  Mllama: keys(i) = tiles * 1601; the K and V read are B * keys(i) * kv_heads * dh each.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from bench.bench_perceiver import lmmrt_backends
from bench.harness import BenchRun, Impl, rotation_sets

MODELS = {
    "openflamingo-9b": dict(lm_dim=4096, heads=8, head_dim=64, latents=64),
    "idefics-9b": dict(lm_dim=4096, heads=32, head_dim=128, latents=64),
}
PREFILL_TEXT, MEDIA, DECODE_BATCH = (128, 1024, 4096), (1, 8, 32), (1, 8, 32)
SMOKE_MODELS = {
    "openflamingo-tiny": dict(lm_dim=32, heads=2, head_dim=16, latents=8),
    "idefics-tiny": dict(lm_dim=64, heads=4, head_dim=16, latents=8),
}
SMOKE_TEXT, SMOKE_MEDIA, SMOKE_BATCH = (16, 48), (1, 3), (1, 3)
MODE = "immediate"
MLLAMA = {"mllama-11b": dict(heads=32, kv_heads=8, head_dim=128, tile_keys=1601, max_tiles=4)}
MLLAMA_DECODE, MLLAMA_PREFILL = [(1, 4), (16, 4), (16, 1)], (32, 512)  # (batch, tiles); text tokens
SMOKE_MLLAMA = {"mllama-tiny": dict(heads=4, kv_heads=2, head_dim=16, tile_keys=17, max_tiles=4)}
SMOKE_MLLAMA_DECODE, SMOKE_MLLAMA_PREFILL = [(2, 3)], (24,)

FORMULAS = {
    "flops": "4 * heads * head_dim * sum_i keys(i); keys(i) = L if text_time[i] > 0 else 0 (immediate)",
    "bytes": "elem * (2*B*T*heads*head_dim + 2*R*L*heads*head_dim) + index bytes; R = media some row attends to",
}


def prefill_text_time(B: int, T: int, N: int) -> torch.Tensor:
    """Markers at positions (j*T)//N: text_time[i] = markers at or before i (all >= 1)."""
    marks = (torch.arange(N) * T) // N
    tt = torch.searchsorted(marks, torch.arange(T), right=True).to(torch.int32)
    return tt[None].expand(B, T).contiguous()


def work(tt: torch.Tensor, L: int, H: int, dh: int, elem: int, mode: str = MODE) -> tuple[float, float]:
    tt = tt.cpu().long()
    B, T = tt.shape
    if mode == "immediate":
        keys = (tt > 0).sum().item() * L
        read = sum(len(set(row.tolist()) - {0}) for row in tt)
    else:
        keys = tt.sum().item() * L
        read = int(tt.max(dim=1).values.sum())
    flops = 4.0 * H * dh * keys
    nbytes = float(elem) * (2 * B * T * H * dh + 2 * read * L * H * dh) + 4.0 * (B * T + 2 * B)
    return flops, nbytes


def make_inputs(spec: dict, B: int, T: int, N: int, dtype, device, n_sets: int, *, decode: bool) -> list[tuple]:
    """(q, k, v, text_time, media_start, media_count, dense_mask, k_dense, v_dense) per set."""
    H, dh, L = spec["heads"], spec["head_dim"], spec["latents"]
    sets = []
    for _ in range(n_sets):
        q = torch.randn(B, T, H, dh, device=device, dtype=dtype)
        k = torch.randn(B * N, L, H, dh, device=device, dtype=dtype)
        v = torch.randn(B * N, L, H, dh, device=device, dtype=dtype)
        if decode:
            tt = torch.randint(1, N + 1, (B, 1), dtype=torch.int32)
        else:
            tt = prefill_text_time(B, T, N)
        tt = tt.to(device)
        start = torch.arange(B, dtype=torch.int32, device=device) * N
        count = torch.full((B,), N, dtype=torch.int32, device=device)
        key_media = torch.arange(N * L, device=device) // L + 1  # media ordinal of each dense key
        mask = (tt[:, :, None] == key_media[None, None, :]) if MODE == "immediate" else (tt[:, :, None] >= key_media)
        kd = k.view(B, N * L, H, dh).transpose(1, 2)  # sequences' media are contiguous: a view
        vd = v.view(B, N * L, H, dh).transpose(1, 2)
        sets.append((q, k, v, tt, start, count, mask[:, None], kd, vd))
    return sets


def sdpa_dense(q, k, v, tt, start, count, mask, kd, vd):
    return F.scaled_dot_product_attention(q.transpose(1, 2), kd, vd, attn_mask=mask).transpose(1, 2)


def impls(device: torch.device, *, decode: bool, use_compile: bool, compiled=None) -> list[Impl]:
    from lmmrt.kernels.masked_cross_attention import masked_cross_attention

    def lm(backend):
        return lambda q, k, v, tt, s, c, *_: masked_cross_attention(q, k, v, tt, s, c, mode=MODE, backend=backend)

    # eager first (the reference; it reads media_count.max() on the host, so it cannot be
    # captured in a CUDA graph), then the kernels, then the other baselines.
    out = [Impl("eager", lm("torch"))]
    exclude = () if decode else ("cuda",)
    out += [Impl(b, lm(b), kind="lmmrt", graph=True)
            for b in lmmrt_backends("masked_cross_attention", device, exclude=exclude)]
    out.append(Impl("sdpa-dense-mask", sdpa_dense, graph=True))
    if use_compile and compiled is not None:
        out.append(Impl("compile", lambda q, k, v, tt, s, c, *_: compiled(q, k, v, tt, s, c, mode=MODE),
                        compiled=True))
    return out


def mllama_inputs(spec: dict, B: int, T: int, tiles: int, dtype, device, n_sets: int) -> list[tuple]:
    """(q, k, v, text_time, media_start, media_count, text_time_first, media_len, tile_mask, k_dense,
    v_dense) per set: one image per sequence, every token after its marker (text_time = 1)."""
    H, KVH, dh = spec["heads"], spec["kv_heads"], spec["head_dim"]
    L = spec["tile_keys"] * spec["max_tiles"]
    sets = []
    for _ in range(n_sets):
        q = torch.randn(B, T, H, dh, device=device, dtype=dtype)
        k = torch.randn(B, L, KVH, dh, device=device, dtype=dtype)
        v = torch.randn(B, L, KVH, dh, device=device, dtype=dtype)
        tt = torch.ones(B, T, dtype=torch.int32, device=device)
        start = torch.arange(B, dtype=torch.int32, device=device)
        count = torch.ones(B, dtype=torch.int32, device=device)
        media_len = torch.full((B,), tiles * spec["tile_keys"], dtype=torch.int32, device=device)
        mask = (torch.arange(L, device=device) < media_len[:, None])[:, None, None, :]  # (B, 1, 1, L)
        sets.append((q, k, v, tt, start, count, tt, media_len, mask, k.transpose(1, 2), v.transpose(1, 2)))
    return sets


def mllama_impls(device: torch.device) -> list[Impl]:
    from lmmrt.kernels.masked_cross_attention import masked_cross_attention

    def lm(backend):
        return lambda q, k, v, tt, s, c, ttf, ml, *_: masked_cross_attention(
            q, k, v, tt, s, c, mode="range", text_time_first=ttf, media_len=ml, backend=backend)

    def sdpa(q, k, v, tt, s, c, ttf, ml, mask, kd, vd):
        return F.scaled_dot_product_attention(q.transpose(1, 2), kd, vd, attn_mask=mask,
                                              enable_gqa=True).transpose(1, 2)

    # the cuda backend hands Mllama's options to the Triton kernel: timed once, as "triton"
    out = [Impl("eager", lm("torch"))]
    out += [Impl(b, lm(b), kind="lmmrt", graph=True)
            for b in lmmrt_backends("masked_cross_attention", device, exclude=("cuda",))]
    return out + [Impl("sdpa-dense-mask", sdpa, graph=True)]


def mllama_cases(b: BenchRun, *, decode: bool, smoke: bool, device, dtype, elem: int, phase_end: float) -> None:
    group = "decode" if decode else "prefill"
    models = SMOKE_MLLAMA if smoke else MLLAMA
    if decode:
        grid = SMOKE_MLLAMA_DECODE if smoke else MLLAMA_DECODE
        grid = [(B, 1, tiles) for B, tiles in grid]
    else:
        tiles = 3 if smoke else 4
        grid = [(1, T, tiles) for T in (SMOKE_MLLAMA_PREFILL if smoke else MLLAMA_PREFILL)]
    imps = mllama_impls(device)
    for name, spec in models.items():
        H, KVH, dh, L = spec["heads"], spec["kv_heads"], spec["head_dim"], spec["tile_keys"] * spec["max_tiles"]
        for B, T, tiles in grid:
            label = f"{name} B={B} tiles={tiles}" if decode else f"{name} T={T} tiles={tiles}"
            shape = dict(model=name, batch=B, text=T, media=1, latents=L, valid_keys=tiles * spec["tile_keys"],
                         heads=H, kv_heads=KVH, head_dim=dh, mode="range")
            if b.elapsed > phase_end:
                b.skip_case(group, label, shape, [i.name for i in imps], "time budget spent")
                continue
            keys = tiles * spec["tile_keys"]
            flops = 4.0 * H * dh * B * T * keys
            nbytes = float(elem) * (2 * B * T * H * dh + 2 * B * keys * KVH * dh) + 4.0 * (2 * B * T + 3 * B)
            alloc = elem * (2 * B * T * H * dh + 2 * B * L * KVH * dh) + B * L
            sets = rotation_sets(nbytes, device, alloc_bytes_per_set=alloc, smoke=smoke)
            b.case(group, label, shape, imps, mllama_inputs(spec, B, T, tiles, dtype, device, sets), flops, nbytes)


def run(*, device: torch.device, dtype: torch.dtype, out_dir: Path, smoke: bool, budget_s: float,
        ceilings: dict | None = None, use_compile: bool = True) -> dict:
    from lmmrt.kernels.masked_cross_attention import masked_cross_attention_reference

    torch.manual_seed(0)
    b = BenchRun("xattn", device=device, dtype=dtype, smoke=smoke, out_dir=out_dir, budget_s=budget_s,
                 ceilings=ceilings, formulas=FORMULAS, description=__doc__.split("\n\n")[0])
    models = SMOKE_MODELS if smoke else MODELS
    texts, media, batches = (SMOKE_TEXT, SMOKE_MEDIA, SMOKE_BATCH) if smoke else (PREFILL_TEXT, MEDIA, DECODE_BATCH)
    if device.type != "cuda":
        b.notes.append("CPU run: triton/cuda backends not timed (the Triton interpreter is too slow to time)")
    compiled = torch.compile(masked_cross_attention_reference) if use_compile else None
    elem = torch.tensor([], dtype=dtype).element_size()
    # Half the budget each, so a slow prefill sweep cannot starve decode; decode first (the
    # memory-bound step that the CUDA kernel targets).
    phases = [("decode", [(B, 1, N) for B in batches for N in media]),
              ("prefill", [(1, T, N) for T in texts for N in media])]
    for pi, (group, grid) in enumerate(phases):
        decode = group == "decode"
        imps = impls(device, decode=decode, use_compile=use_compile, compiled=compiled)
        phase_end = budget_s * (pi + 1) / len(phases)
        # Mllama's few cases first: the GPU script's stage budget is a few seconds
        mllama_cases(b, decode=decode, smoke=smoke, device=device, dtype=dtype, elem=elem, phase_end=phase_end)
        for B, T, N in grid:
            for name, spec in models.items():
                H, dh, L = spec["heads"], spec["head_dim"], spec["latents"]
                label = f"{name} B={B} N={N}" if decode else f"{name} T={T} N={N}"
                shape = dict(model=name, batch=B, text=T, media=N, latents=L, heads=H, head_dim=dh, mode=MODE)
                if b.elapsed > phase_end:
                    b.skip_case(group, label, shape, [i.name for i in imps], "time budget spent")
                    continue
                tt = torch.randint(1, N + 1, (B, 1)) if decode else prefill_text_time(B, T, N)
                flops, nbytes = work(tt, L, H, dh, elem)
                alloc = elem * (2 * B * T * H * dh + 2 * B * N * L * H * dh) + B * T * N * L
                sets = rotation_sets(nbytes, device, alloc_bytes_per_set=alloc, smoke=smoke)
                inputs = make_inputs(spec, B, T, N, dtype, device, sets, decode=decode)
                b.case(group, label, shape, imps, inputs, flops, nbytes)
                del inputs
    return b.finish()


if __name__ == "__main__":
    import sys

    from bench.run import main

    sys.exit(main(["--only", "xattn", *sys.argv[1:]]))
