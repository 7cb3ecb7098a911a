"""Masked cross-attention: reference vs an independent per-row loop of flamingo.md §4.1, Triton
prefill / decode kernels vs the float64 reference."""

from __future__ import annotations

import importlib

import pytest
import torch

from lmmrt.kernels.masked_cross_attention import masked_cross_attention, masked_cross_attention_reference

try:  # tests/kernels may or may not be a package, depending on how pytest imports it
    from .kernel_testing import DEVICE, DTYPES, KernelSpy, assert_close, gpu_only, nan_buffer, needs_triton
except ImportError:
    from kernel_testing import DEVICE, DTYPES, KernelSpy, assert_close, gpu_only, nan_buffer, needs_triton

# `lmmrt.kernels.masked_cross_attention` the attribute is the function; the module is needed here.
mx = importlib.import_module("lmmrt.kernels.masked_cross_attention")
# The interpreter's own int(array) conversions (harmless with numpy < 2.4, see environment.md).
pytestmark = pytest.mark.filterwarnings("ignore:Conversion of an array with ndim:DeprecationWarning")


def _inputs(B, T, H, dh, L, counts, dtype, *, tt_kind, layout, index_dtype=torch.int64, seed=0):
    """Random inputs. Media are packed in reverse sequence order with two unused media items
    (garbage a kernel must not read) at both ends. tt_kind: "prompt" = non-decreasing media ordinals
    starting with text before any media; "reset" = arbitrary ordinals in [0, count] (IDEFICS resets
    to no media after an end-of-sequence token); "wild" = also out-of-range ordinals (-1, count+1).
    layout: "fused" (q a slice of a wider projection, k/v halves of one (N, L, 2, H, dh) tensor,
    text_time a strided view), "heads_major" (storage (.., H, seq, dh)), "contiguous"."""
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape):
        return torch.randn(*shape, generator=g).to(dtype=dtype, device=DEVICE)

    N = sum(counts) + 2
    starts, nxt = [0] * B, 1
    for b in reversed(range(B)):
        starts[b], nxt = nxt, nxt + counts[b]
    if layout == "fused":
        q = rnd(B, T, H, 2 * dh)[..., :dh]
        kv = rnd(N, L, 2, H, dh)
        k, v = kv[:, :, 0], kv[:, :, 1]
    elif layout == "heads_major":
        q = rnd(B, H, T, dh).transpose(1, 2)
        k, v = rnd(N, H, L, dh).transpose(1, 2), rnd(N, H, L, dh).transpose(1, 2)
    else:
        q, k, v = rnd(B, T, H, dh), rnd(N, L, H, dh), rnd(N, L, H, dh)
    rows = []
    for c in counts:
        if tt_kind == "prompt":
            rows.append(torch.sort(torch.randint(0, c + 1, (T,), generator=g)).values)
        elif tt_kind == "reset":
            rows.append(torch.randint(0, c + 1, (T,), generator=g))
        else:
            rows.append(torch.randint(-1, c + 2, (T,), generator=g))
    tt = torch.stack(rows).to(index_dtype)
    if layout == "fused":  # a strided view
        tt = torch.stack([tt, tt], dim=-1)[..., 0]
    idx = dict(text_time=tt.to(DEVICE), media_start=torch.tensor(starts, dtype=index_dtype, device=DEVICE),
               media_count=torch.tensor(counts, dtype=index_dtype, device=DEVICE))
    return q, k, v, idx


def _ref64(q, k, v, idx, mode, scale=None):
    return masked_cross_attention_reference(q.double(), k.double(), v.double(), idx["text_time"],
                                            idx["media_start"], idx["media_count"], mode=mode, scale=scale)


def _naive(q, k, v, tt, start, count, mode, scale):
    """flamingo.md §4.1, one text row and head at a time, in float64."""
    B, T, H, dh = q.shape
    L = k.shape[1]
    out = torch.zeros(q.shape, dtype=torch.float64)
    for b in range(B):
        s, c = int(start[b]), int(count[b])
        for t in range(T):
            o = int(tt[b, t])
            if mode == "immediate":
                media = [o] if 1 <= o <= c else []
            else:
                media = list(range(1, min(o, c) + 1))
            for h in range(H):
                if mode == "cumulative" and o == 0:
                    # OpenFlamingo: every score masked alike -> uniform over all the sequence's keys
                    if c:
                        out[b, t, h] = v[s:s + c, :, h].double().reshape(c * L, dh).mean(0)
                    continue
                if not media:
                    continue  # zero row
                keys = torch.cat([k[s + j - 1, :, h] for j in media]).double()
                vals = torch.cat([v[s + j - 1, :, h] for j in media]).double()
                w = torch.softmax(keys @ q[b, t, h].double() * scale, 0)
                out[b, t, h] = w @ vals
    return out


@pytest.mark.parametrize("mode", ["immediate", "cumulative"])
@pytest.mark.parametrize("tt_kind", ["prompt", "reset", "wild"])
def test_reference_matches_naive_loop(mode, tt_kind):
    q, k, v, idx = _inputs(4, 9, 2, 8, 5, [2, 0, 3, 1], torch.float64, tt_kind=tt_kind, layout="fused", seed=1)
    ref = masked_cross_attention_reference(q, k, v, **idx, mode=mode)
    naive = _naive(*(t.cpu() for t in (q, k, v, idx["text_time"], idx["media_start"], idx["media_count"])),
                   mode, 8**-0.5)
    torch.testing.assert_close(ref.cpu(), naive, atol=1e-12, rtol=1e-12)


def test_reference_no_media_anywhere_is_zero():
    q, k, v, idx = _inputs(2, 5, 1, 8, 4, [0, 0], torch.float32, tt_kind="prompt", layout="contiguous")
    for mode in ("immediate", "cumulative"):
        assert (masked_cross_attention_reference(q, k, v, **idx, mode=mode) == 0).all()


# (B, T, H, dh, L, per-sequence media counts, mode, text_time kind, layout, index dtype)
PREFILL = [
    (3, 97, 2, 64, 64, [1, 3, 7], "immediate", "prompt", "fused", torch.int64),
    (3, 97, 2, 64, 64, [1, 3, 7], "cumulative", "prompt", "fused", torch.int32),
    (2, 19, 2, 96, 257, [3, 0], "immediate", "reset", "contiguous", torch.int32),   # IDEFICS w/o perceiver
    (2, 19, 2, 96, 257, [3, 0], "cumulative", "reset", "heads_major", torch.int64),
    (1, 97, 1, 128, 320, [7], "cumulative", "reset", "fused", torch.int64),      # 2240 keys
    (4, 19, 2, 128, 64, [0, 1, 7, 3], "immediate", "wild", "heads_major", torch.int64),
    (4, 19, 1, 64, 65, [0, 1, 7, 3], "cumulative", "wild", "contiguous", torch.int32),
]
DECODE = [
    (3, 1, 2, 64, 64, [1, 3, 7], "immediate", "prompt", "fused", torch.int64),
    (3, 1, 2, 64, 64, [1, 3, 7], "cumulative", "prompt", "fused", torch.int32),   # split path
    (2, 1, 2, 96, 1089, [3, 0], "immediate", "reset", "heads_major", torch.int64),  # video, split
    (4, 1, 2, 128, 257, [0, 1, 7, 3], "cumulative", "reset", "contiguous", torch.int64),
]


def _run_case(case, dtype, **kw):
    B, T, H, dh, L, counts, mode, tt_kind, layout, idt = case
    q, k, v, idx = _inputs(B, T, H, dh, L, counts, dtype, tt_kind=tt_kind, layout=layout, index_dtype=idt,
                           seed=sum(counts) * 31 + T + dh)
    storage, out = nan_buffer(q.shape, dtype, strided=layout != "contiguous")
    if kw:
        res = mx.masked_cross_attention_triton(q, k, v, **idx, mode=mode, out=out, **kw)
    else:
        res = masked_cross_attention(q, k, v, **idx, mode=mode, backend="triton", out=out)
    assert res.data_ptr() == out.data_ptr()
    assert not torch.isnan(storage).any(), "kernel left elements of out unwritten"
    assert_close(out, _ref64(q, k, v, idx, mode), dtype, f"xattn {case}")


@needs_triton
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", PREFILL + DECODE, ids=lambda c: "-".join(map(str, c[:9])))
def test_kernel_matches_reference(case, dtype):
    _run_case(case, dtype)


@needs_triton
@pytest.mark.parametrize("num_splits", [1, 3, 16])
@pytest.mark.parametrize("case", [DECODE[1], DECODE[2]], ids=["cumulative", "video"])
def test_decode_forced_splits(case, num_splits):
    # more splits than key blocks leaves some splits empty: the combine must ignore them
    _run_case(case, torch.float32, num_splits=num_splits)


@needs_triton
@pytest.mark.parametrize("mode", ["immediate", "cumulative"])
def test_rows_without_media(mode):
    # Explicit: text before the first image (0), sequence without media, decode and prefill.
    B, H, dh, L = 3, 2, 64, 64
    q, k, v, idx = _inputs(B, 19, H, dh, L, [2, 0, 1], torch.float32, tt_kind="prompt", layout="contiguous")
    idx["text_time"] = torch.tensor([[0] * 10 + [1] * 5 + [2] * 4, [0] * 19, [0] * 18 + [1]], device=DEVICE)
    out = masked_cross_attention(q, k, v, **idx, mode=mode, backend="triton")
    ref = _ref64(q, k, v, idx, mode)
    assert_close(out, ref, torch.float32, mode)
    assert (out[1] == 0).all()  # no media at all: zero in both modes
    if mode == "immediate":
        assert (out[0, :10] == 0).all() and (out[2, :18] == 0).all()
    else:  # OpenFlamingo: mean of V over the sequence's media keys
        s = int(idx["media_start"][0])
        mean = v[s:s + 2].double().reshape(2 * L, H, dh).mean(0)
        assert_close(out[0, :10], mean.expand(10, H, dh), torch.float32, "uniform rows")
    # decode of each sequence's last token (sequence 2's last token is its first media marker)
    t1 = idx["text_time"][:, -1:].contiguous()
    out1 = masked_cross_attention(q[:, -1:], k, v, t1, idx["media_start"], idx["media_count"], mode=mode,
                                  backend="triton")
    assert_close(out1, ref[:, -1:], torch.float32, f"decode {mode}")
    t0 = torch.zeros_like(t1)  # decode before any media
    out0 = masked_cross_attention(q[:, -1:], k, v, t0, idx["media_start"], idx["media_count"], mode=mode,
                                  backend="triton")
    assert_close(out0, _ref64(q[:, -1:], k, v, dict(idx, text_time=t0), mode), torch.float32, f"decode0 {mode}")


@needs_triton
@pytest.mark.parametrize("mode", ["immediate", "cumulative"])
@pytest.mark.parametrize("T", [19, 1], ids=["prefill", "decode"])
def test_strided_media_index(mode, T):
    # media_start / media_count as strided views (columns of one (B, 2) index table): the kernels
    # must read them through their strides, not as contiguous arrays.
    q, k, v, idx = _inputs(3, T, 2, 32, 16, [2, 0, 3], torch.float32, tt_kind="reset", layout="contiguous")
    idx["text_time"][:, -1] = torch.tensor([2, 0, 3])  # the decode row sees media in both modes
    table = torch.stack([idx["media_start"], idx["media_count"]], dim=1)  # (B, 2)
    strided = dict(idx, media_start=table[:, 0], media_count=table[:, 1])
    assert strided["media_start"].stride() == (2,)
    out = masked_cross_attention(q, k, v, **strided, mode=mode, backend="triton")
    assert_close(out, _ref64(q, k, v, idx, mode), torch.float32, f"{mode} T={T}")


@needs_triton
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("dh", [160, 256])
def test_gpu_tiles_of_wide_heads(monkeypatch, dh, dtype):
    # The prefill tiles the GPU path picks for heads wider than 128 (32-key tiles; 32 query rows in
    # fp32), through the interpreter here (for real on a GPU): several query blocks, media of 37 keys
    # (ragged tiles).
    monkeypatch.setattr(mx, "_interpreted", lambda device: False)
    monkeypatch.setattr(mx, "_sm_count", lambda device: 132)
    cfg = mx._prefill_config(45, dh, dtype, DEVICE)
    assert cfg["BLOCK_N"] == 32 and cfg["BLOCK_D"] == 256 and cfg["num_stages"] == 2
    q, k, v, idx = _inputs(2, 45, 1, dh, 37, [2, 3], dtype, tt_kind="prompt", layout="fused", seed=dh)
    for mode in ("immediate", "cumulative"):
        out = masked_cross_attention(q, k, v, **idx, mode=mode, backend="triton")
        assert_close(out, _ref64(q, k, v, idx, mode), dtype, f"{mode} dh={dh}")


@needs_triton
def test_custom_scale():
    q, k, v, idx = _inputs(2, 19, 2, 32, 16, [2, 3], torch.float32, tt_kind="reset", layout="fused")
    for mode in ("immediate", "cumulative"):
        out = masked_cross_attention(q, k, v, **idx, mode=mode, scale=0.7, backend="triton")
        assert_close(out, _ref64(q, k, v, idx, mode, scale=0.7), torch.float32, mode)


@needs_triton
def test_float64_falls_back_to_reference():
    q, k, v, idx = _inputs(2, 3, 1, 8, 4, [1, 2], torch.float64, tt_kind="prompt", layout="contiguous")
    out = masked_cross_attention(q, k, v, **idx, backend="triton")
    torch.testing.assert_close(out, masked_cross_attention_reference(q, k, v, **idx))


@needs_triton
def test_dispatch(monkeypatch):
    spies = {n: KernelSpy(getattr(mx, n)) for n in ("_xattn_prefill_kernel", "_xattn_decode_kernel",
                                                      "_xattn_decode_combine_kernel")}
    for n, s in spies.items():
        monkeypatch.setattr(mx, n, s)
    launches = lambda: tuple(s.launches for s in spies.values())
    q, k, v, idx = _inputs(2, 19, 2, 32, 16, [2, 3], torch.float32, tt_kind="prompt", layout="contiguous")
    idx1 = dict(idx, text_time=idx["text_time"][:, -1:])
    masked_cross_attention(q, k, v, **idx, backend="torch")
    masked_cross_attention(q[:, -1:], k, v, **idx1, backend="torch")
    assert launches() == (0, 0, 0), "backend='torch' launched a triton kernel"
    masked_cross_attention(q, k, v, **idx, backend="triton")
    assert launches() == (1, 0, 0), "T > 1 must run the prefill kernel"
    mx.masked_cross_attention_triton(q[:, -1:], k, v, **idx1, num_splits=1)
    assert launches() == (1, 1, 0), "T == 1 must run the decode kernel"
    mx.masked_cross_attention_triton(q[:, -1:], k, v, **idx1, num_splits=2)
    assert launches() == (1, 2, 1), "split decode must combine"
    if DEVICE.type == "cpu":
        monkeypatch.setenv("TRITON_INTERPRET", "0")  # no interpreter, no GPU: the reference runs
        masked_cross_attention(q, k, v, **idx, backend="triton")
        assert launches() == (1, 2, 1)


def test_bad_inputs_are_reported():
    q, k, v, idx = _inputs(2, 5, 2, 8, 4, [1, 2], torch.float32, tt_kind="prompt", layout="contiguous")
    tt, ms, mc = idx["text_time"], idx["media_start"], idx["media_count"]
    with pytest.raises(ValueError, match="mode must be one of"):
        masked_cross_attention(q, k, v, tt, ms, mc, mode="causal")
    with pytest.raises(ValueError, match="q must be"):
        masked_cross_attention(q[0], k, v, tt, ms, mc)
    with pytest.raises(ValueError, match="k has shape"):
        masked_cross_attention(q, k[..., :4], v, tt, ms, mc)
    with pytest.raises(ValueError, match="differ"):
        masked_cross_attention(q, k, v[:, :3], tt, ms, mc)
    with pytest.raises(ValueError, match="text_time has shape"):
        masked_cross_attention(q, k, v, tt[:, :4], ms, mc)
    with pytest.raises(ValueError, match="media_count has shape"):
        masked_cross_attention(q, k, v, tt, ms, mc[:1])
    with pytest.raises(ValueError, match="text_time must be int32 or int64"):
        masked_cross_attention(q, k, v, tt.float(), ms, mc)
    with pytest.raises(ValueError, match="v is torch.float16"):
        masked_cross_attention(q, k, v.half(), tt, ms, mc)
    with pytest.raises(ValueError, match="out is"):
        masked_cross_attention(q, k, v, tt, ms, mc, out=torch.empty(2, 5, 2, 8, dtype=torch.float16))


@needs_triton
def test_torch_compile_fullgraph():
    # Inductor treats the custom op as one opaque extern call; no graph break allowed.
    q, k, v, idx = _inputs(2, 19, 2, 32, 16, [2, 3], torch.float32, tt_kind="reset", layout="fused")
    tt1 = idx["text_time"][:, -1:]

    def fn(q, k, v, tt, tt1, ms, mc):
        prefill = masked_cross_attention(q, k, v, tt, ms, mc, mode="cumulative", backend="triton")
        decode = masked_cross_attention(q[:, -1:], k, v, tt1, ms, mc, mode="immediate", backend="triton")
        return prefill, decode

    prefill, decode = torch.compile(fn, fullgraph=True)(q, k, v, idx["text_time"], tt1, idx["media_start"],
                                                        idx["media_count"])
    assert_close(prefill, _ref64(q, k, v, idx, "cumulative"), torch.float32, "compiled prefill")
    idx1 = dict(idx, text_time=tt1)
    assert_close(decode, _ref64(q[:, -1:], k, v, idx1, "immediate"), torch.float32, "compiled decode")


@gpu_only
@needs_triton
@pytest.mark.parametrize("mode", ["immediate", "cumulative"])
def test_cuda_graph_capture_decode(mode):
    # A decode step with many media (split path) captured and replayed with new text_time values.
    q, k, v, idx = _inputs(8, 1, 32, 128, 64, [1, 3, 7, 0, 16, 2, 5, 9], torch.bfloat16, tt_kind="reset",
                           layout="fused")
    fn = lambda: masked_cross_attention(q, k, v, **idx, mode=mode, backend="triton")
    fn()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fn()
    idx["text_time"].copy_(idx["media_count"][:, None])  # every sequence now sees its last media
    graph.replay()
    torch.cuda.synchronize()
    assert_close(out, _ref64(q, k, v, idx, mode), torch.bfloat16, f"graph {mode}")


@gpu_only
@needs_triton
@pytest.mark.parametrize("mode", ["immediate", "cumulative"])
def test_gpu_large_batch(mode):
    # Realistic prefill: 8 prompts of 1000 tokens, 32 heads, up to 20 images each.
    case = (8, 1000, 32, 128, 64, [20, 1, 0, 5, 13, 2, 7, 3], mode, "prompt", "fused", torch.int32)
    _run_case(case, torch.bfloat16)
