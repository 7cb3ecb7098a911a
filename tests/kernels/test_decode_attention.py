"""Decode self-attention over the KV cache: the reference vs SDPA with a dense mask, the reference's
freedom from host syncs, the Triton split-K kernel vs the float64 reference."""

from __future__ import annotations

import importlib

import pytest
import torch
import torch.nn.functional as F

from lmmrt.kernels.decode_attention import (
    decode_attention,
    decode_attention_reference,
    decode_attention_triton,
)

try:  # tests/kernels may or may not be a package, depending on how pytest imports it
    from .kernel_testing import DEVICE, DTYPES, KernelSpy, assert_close, gpu_only, needs_triton
except ImportError:
    from kernel_testing import DEVICE, DTYPES, KernelSpy, assert_close, gpu_only, needs_triton

# `lmmrt.kernels.decode_attention` the attribute is the function; the module is needed here.
da = importlib.import_module("lmmrt.kernels.decode_attention")
# The interpreter's own int(array) conversions (harmless with numpy < 2.4, see environment.md).
pytestmark = pytest.mark.filterwarnings("ignore:Conversion of an array with ndim:DeprecationWarning")


def _ranges(B, S, kind):
    """(key_start, key_end) lists. "mixed" cycles full cache / left-padded middle / one key at the
    end / one key at slot 0 / empty; "full" is [0, S) for every row."""
    if kind == "full":
        return [0] * B, [S] * B
    rows = [(0, S), (S // 3, S - 2), (S - 1, S), (0, 1), (S // 2, S // 2)]
    picked = [rows[(b + (2 if B == 1 else 0)) % len(rows)] for b in range(B)]  # B == 1: a padded row
    return [r[0] for r in picked], [r[1] for r in picked]


def _inputs(B, H, KV, S, dh, dtype, *, ranges="mixed", layout="layers", index_dtype=torch.int64, seed=0):
    """Random q and caches whose slots outside each row's range hold NaN (an uninitialised cache).
    layout: "layers" = one layer's view of a (layers, B, KV, S, dh) cache (K and V interleaved by
    layer), "seq_major" = storage (B, S, KV, dh) seen as (B, KV, S, dh), "contiguous"; q is a slice
    of a wider fused projection except for "contiguous"."""
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape):
        return torch.randn(*shape, generator=g).to(dtype=dtype, device=DEVICE)

    if layout == "layers":
        q = rnd(B, H, 2 * dh)[..., dh:]
        cache = rnd(3, 2, B, KV, S, dh)
        k, v = cache[1, 0], cache[1, 1]
    elif layout == "seq_major":
        q = rnd(B, 2 * H, dh)[:, ::2]
        k, v = rnd(B, S, KV, dh).transpose(1, 2), rnd(B, S, KV, dh).transpose(1, 2)
    else:
        q, k, v = rnd(B, H, dh), rnd(B, KV, S, dh), rnd(B, KV, S, dh)
    start, end = _ranges(B, S, ranges)
    for b in range(B):
        for t in (k, v):
            t[b, :, :start[b]] = float("nan")
            t[b, :, end[b]:] = float("nan")
    ks = torch.tensor(start, dtype=index_dtype, device=DEVICE)
    ke = torch.stack([torch.tensor(end, dtype=index_dtype), torch.zeros(B, dtype=index_dtype)], 1)[:, 0]
    slopes = (0.05 + torch.rand(H, generator=g)).to(DEVICE)
    return q, k, v, ks, ke.to(DEVICE), slopes


def _ref64(q, k, v, ks, ke, slopes=None, scale=None):
    ref = decode_attention_reference(q.double(), k.double(), v.double(), ks, ke, alibi_slopes=slopes, scale=scale)
    assert not torch.isnan(ref).any(), "NaN in the reference"  # assert_close would not see it
    return ref


# ---- the reference -------------------------------------------------------------------------------

@pytest.mark.parametrize("alibi", [False, True])
@pytest.mark.parametrize("B,H,KV,S,dh", [(3, 8, 2, 97, 64), (1, 4, 4, 19, 96), (3, 6, 1, 33, 32)])
def test_reference_matches_sdpa_with_mask(B, H, KV, S, dh, alibi):
    # NaN-free caches (SDPA would spread NaN from masked slots) and non-empty ranges (SDPA gives NaN).
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(*s, generator=g, dtype=torch.float64) for s in ((B, H, dh), (B, KV, S, dh), (B, KV, S, dh)))
    start = torch.randint(0, S, (B,), generator=g)
    end = start + 1 + (torch.rand(B, generator=g) * (S - start)).long()
    slopes = torch.rand(H, generator=g) if alibi else None
    slots = torch.arange(S)
    bias = torch.zeros(B, H, 1, S, dtype=torch.float64)
    if alibi:
        bias += slopes.double()[None, :, None, None] * (slots - (end[:, None] - 1))[:, None, None, :]
    allowed = (slots >= start[:, None]) & (slots < end[:, None])
    bias = bias.masked_fill(~allowed[:, None, None, :], float("-inf"))
    expected = F.scaled_dot_product_attention(q[:, :, None], k, v, attn_mask=bias, scale=0.3, enable_gqa=True)
    got = decode_attention_reference(q, k, v, start.int(), end.int(), alibi_slopes=slopes, scale=0.3)
    torch.testing.assert_close(got, expected[:, :, 0], rtol=1e-10, atol=1e-10)


def test_reference_empty_ranges_give_zeros_and_nan_slots_stay_out():
    q, k, v, ks, ke, slopes = _inputs(5, 4, 2, 23, 16, torch.float32)
    out = decode_attention_reference(q, k, v, ks, ke, alibi_slopes=slopes)
    assert not torch.isnan(out).any()
    assert torch.equal(out[4], torch.zeros_like(out[4]))  # row 4's range is empty
    assert out[:4].abs().sum(-1).min() > 0


def test_reference_has_no_host_sync():
    # On the meta device any .item()/bool() of a tensor raises and a host tensor would be a
    # CPU -> meta copy error: the reference must run, so it can serve inside a captured graph.
    B, H, KV, S, dh = 2, 8, 2, 40, 32
    with torch.device("meta"):
        q, k, v = torch.randn(B, H, dh), torch.randn(B, KV, S, dh), torch.randn(B, KV, S, dh)
        ks, ke = torch.zeros(B, dtype=torch.int32), torch.ones(B, dtype=torch.int32)
        slopes = torch.rand(H)
    out = decode_attention(q, k, v, ks, ke, alibi_slopes=slopes, backend="torch")
    assert out.shape == (B, H, dh) and out.device.type == "meta"
    # the Triton custom op's fake impl gives the same on meta (what torch.compile traces)
    out = decode_attention_triton(q.half(), k.half(), v.half(), ks, ke, alibi_slopes=slopes)
    assert out.shape == (B, H, dh) and out.dtype == torch.float16 and out.device.type == "meta"


@gpu_only
def test_reference_no_sync_under_cuda_sync_debug_mode():
    q, k, v, ks, ke, slopes = _inputs(3, 8, 2, 97, 64, torch.bfloat16)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        decode_attention(q, k, v, ks, ke, alibi_slopes=slopes, backend="torch")
        decode_attention(q, k, v, ks, ke, alibi_slopes=slopes, backend="triton")
    finally:
        torch.cuda.set_sync_debug_mode(0)


# ---- the Triton kernel ---------------------------------------------------------------------------

# (B, H, KV, S, dh, ranges, layout, index dtype, alibi, forced splits)
CASES = [
    (1, 4, 4, 19, 64, "mixed", "contiguous", torch.int64, False, 0),
    (3, 8, 2, 97, 96, "mixed", "layers", torch.int32, True, 0),
    (3, 4, 4, 130, 128, "mixed", "seq_major", torch.int64, False, 3),
    (1, 8, 2, 130, 128, "full", "layers", torch.int32, True, 3),
    (3, 6, 2, 19, 64, "full", "seq_major", torch.int64, True, 2),  # 3 query heads per kv head
    (3, 4, 4, 97, 64, "mixed", "layers", torch.int32, True, 5),
    (3, 8, 2, 97, 64, "mixed", "contiguous", torch.int64, True, 16),  # most splits find no keys
]


@needs_triton
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(map(str, c)))
def test_kernel_matches_reference(case, dtype):
    B, H, KV, S, dh, ranges, layout, index_dtype, alibi, splits = case
    q, k, v, ks, ke, slopes = _inputs(B, H, KV, S, dh, dtype, ranges=ranges, layout=layout, index_dtype=index_dtype)
    slopes = slopes if alibi else None
    storage = torch.full((H, B, dh), float("nan"), dtype=dtype, device=DEVICE)
    out = storage.transpose(0, 1)  # a strided, NaN-filled output: any unwritten element fails
    got = decode_attention_triton(q, k, v, ks, ke, alibi_slopes=slopes, out=out, num_splits=splits)
    assert got is out
    assert_close(out, _ref64(q, k, v, ks, ke, slopes), dtype, f"decode {case}")


@needs_triton
def test_kernel_empty_range_gives_zeros_with_splits():
    q, k, v, ks, ke, slopes = _inputs(5, 8, 2, 97, 64, torch.float32)
    spy = KernelSpy(da._decode_attention_combine_kernel)
    da._decode_attention_combine_kernel, orig = spy, da._decode_attention_combine_kernel
    try:
        out = torch.full((5, 8, 64), float("nan"))
        decode_attention_triton(q, k, v, ks, ke, alibi_slopes=slopes, out=out, num_splits=4)
    finally:
        da._decode_attention_combine_kernel = orig
    assert spy.launches == 1
    assert torch.equal(out[4], torch.zeros_like(out[4]))
    assert_close(out, _ref64(q, k, v, ks, ke, slopes), torch.float32, "empty row, 4 splits")


@needs_triton
def test_kernel_clamps_out_of_cache_ranges():
    # Index values are trusted, but a range reaching past the cache must not read past it.
    q, k, v, _, _, slopes = _inputs(3, 4, 2, 19, 32, torch.float32, ranges="full")
    ks, ke = torch.tensor([-4, 3, 25]), torch.tensor([7, 40, 30])  # row 2: wholly past the cache
    out = decode_attention_triton(q, k, v, ks, ke, alibi_slopes=slopes)
    assert_close(out, _ref64(q, k, v, ks, ke, slopes), torch.float32, "clamped")
    assert torch.equal(out[2], torch.zeros_like(out[2]))
    clamped = _ref64(q, k, v, ks.clamp(0, 19), ke.clamp(0, 19))
    assert_close(decode_attention_triton(q, k, v, ks, ke), clamped, torch.float32, "clamped, no alibi")


@needs_triton
def test_custom_scale_and_float64_fallback():
    q, k, v, ks, ke, slopes = _inputs(3, 8, 2, 19, 64, torch.float32)
    out = decode_attention_triton(q, k, v, ks, ke, alibi_slopes=slopes, scale=0.05)
    assert_close(out, _ref64(q, k, v, ks, ke, slopes, scale=0.05), torch.float32, "scale 0.05")
    q, k, v = q.double(), k.double(), v.double()
    out = decode_attention(q, k, v, ks, ke, backend="triton")  # no fp64 kernel: the exact reference
    assert out.dtype == torch.float64
    torch.testing.assert_close(out, _ref64(q, k, v, ks, ke), rtol=0, atol=0)


@needs_triton
def test_dispatch(monkeypatch):
    q, k, v, ks, ke, _ = _inputs(3, 4, 2, 19, 32, torch.float32)
    spy = KernelSpy(da._decode_attention_kernel)
    monkeypatch.setattr(da, "_decode_attention_kernel", spy)
    ref = _ref64(q, k, v, ks, ke)
    assert_close(decode_attention(q, k, v, ks, ke), ref, torch.float32, "auto")  # CPU: torch
    assert spy.launches == 0
    out = torch.full_like(q, float("nan"))
    assert decode_attention(q, k, v, ks, ke, backend="triton", out=out) is out
    assert spy.launches == 1
    assert_close(out, ref, torch.float32, "triton into out")
    out.fill_(float("nan"))
    assert decode_attention(q, k, v, ks, ke, backend="torch", out=out) is out
    assert_close(out, ref, torch.float32, "torch into out")


@needs_triton
def test_torch_compile_fullgraph():
    # The custom op (it mutates `out`) traces through dynamo and AOT autograd as one node: no graph
    # break, the fake impl gives the shapes, functionalization keeps the write.
    q, k, v, ks, ke, slopes = _inputs(3, 8, 2, 19, 32, torch.float32)
    fn = lambda q, k, v, ks, ke, slopes: decode_attention(q, k, v, ks, ke, alibi_slopes=slopes, backend="triton") * 2
    out = torch.compile(fn, fullgraph=True, backend="aot_eager")(q, k, v, ks, ke, slopes)
    assert_close(out, 2 * _ref64(q, k, v, ks, ke, slopes), torch.float32, "compiled")


def test_bad_inputs_are_reported():
    q, k, v = torch.randn(2, 8, 16), torch.randn(2, 2, 10, 16), torch.randn(2, 2, 10, 16)
    ks, ke = torch.zeros(2, dtype=torch.int32), torch.ones(2, dtype=torch.int32)
    with pytest.raises(ValueError, match="q must be"):
        decode_attention(q[0], k, v, ks, ke)
    with pytest.raises(ValueError, match="kv_heads dividing the 8 query heads"):
        decode_attention(q, torch.randn(2, 3, 10, 16), torch.randn(2, 3, 10, 16), ks, ke)
    with pytest.raises(ValueError, match="v_cache"):
        decode_attention(q, k, v[:, :, :5], ks, ke)
    with pytest.raises(ValueError, match="k_cache is torch.float16"):
        decode_attention(q, k.half(), v, ks, ke)
    with pytest.raises(ValueError, match="key_end must be a \\(2,\\) int32 or int64"):
        decode_attention(q, k, v, ks, ke.float())
    with pytest.raises(ValueError, match="key_start must be"):
        decode_attention(q, k, v, ks[:1], ke)
    with pytest.raises(ValueError, match="alibi_slopes must be a \\(8,\\) float32"):
        decode_attention(q, k, v, ks, ke, alibi_slopes=torch.rand(4))
    with pytest.raises(ValueError, match="out is"):
        decode_attention(q, k, v, ks, ke, out=torch.empty(2, 8, 16, dtype=torch.float16))
    with pytest.raises(ValueError, match="unknown backend"):
        decode_attention(q, k, v, ks, ke, backend="tpu")


# ---- on a GPU ------------------------------------------------------------------------------------

@gpu_only
@needs_triton
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("B,H,KV,dh,alibi", [(1, 32, 32, 128, False), (8, 32, 8, 128, True), (2, 16, 16, 256, False),
                                             (5, 40, 40, 80, True)])
def test_gpu_model_shapes(B, H, KV, dh, alibi, dtype):
    # LLaMA-7B / MPT-7B-sized heads over a 2048-slot cache with the planned split count
    S = 2048
    q, k, v, ks, ke, slopes = _inputs(B, H, KV, S, dh, dtype)
    slopes = slopes if alibi else None
    splits = da._decode_attention_config(B, KV, H // KV, S, dh, dtype, q.device)["NUM_SPLITS"]
    assert B * KV > 128 or splits > 1, "a small batch must be split along the keys to fill the GPU"
    out = decode_attention(q, k, v, ks, ke, alibi_slopes=slopes, backend="triton")
    assert_close(out, _ref64(q, k, v, ks, ke, slopes), dtype, f"B={B} H={H} KV={KV} dh={dh} splits={splits}")


@gpu_only
@needs_triton
def test_cuda_graph_capture_follows_key_end():
    # Captured once over a half-filled cache, replayed as the range grows: the graph reads the
    # length on the device, and the planned splits cover the whole allocated cache.
    B, H, KV, S, dh = 4, 32, 8, 2048, 128
    q, k, v, ks, ke, slopes = _inputs(B, H, KV, S, dh, torch.bfloat16, ranges="full")
    ks.copy_(torch.tensor([0, 7, 100, 1000]))
    ke.copy_(torch.tensor([900, 300, 101, 1001]))
    fn = lambda: decode_attention(q, k, v, ks, ke, alibi_slopes=slopes, backend="triton")
    fn()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fn()
    for end in ([901, 301, 102, 1002], [2048, 2000, 1500, 1001]):
        ke.copy_(torch.tensor(end))
        graph.replay()
        torch.cuda.synchronize()
        assert_close(out, _ref64(q, k, v, ks, ke, slopes), torch.bfloat16, f"graph replay key_end={end}")
