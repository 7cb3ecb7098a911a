"""Perceiver attention: reference vs an independent naive loop, Triton kernel vs float64 reference."""

from __future__ import annotations

import importlib
import math

import pytest
import torch

from lmmrt.kernels.perceiver_attention import perceiver_attention, perceiver_attention_reference

try:  # tests/kernels may or may not be a package, depending on how pytest imports it
    from .kernel_testing import DEVICE, DTYPES, KernelSpy, assert_close, gpu_only, nan_buffer, needs_triton
except ImportError:
    from kernel_testing import DEVICE, DTYPES, KernelSpy, assert_close, gpu_only, nan_buffer, needs_triton

# `lmmrt.kernels.perceiver_attention` the attribute is the function; the module is needed here.
pa_mod = importlib.import_module("lmmrt.kernels.perceiver_attention")
# The interpreter's own int(array) conversions (harmless with numpy < 2.4, see environment.md).
pytestmark = pytest.mark.filterwarnings("ignore:Conversion of an array with ndim:DeprecationWarning")


def _inputs(M, S, n_lat, H, dh, dtype, *, layout, norms, seed=0):
    """Random inputs. layout: "fused" = k/v halves of one (M, S, 2, H, dh) projection (what
    OpenFlamingo's to_kv produces); "heads_major" = storage (M, H, S, dh) seen as (M, S, H, dh);
    "contiguous". norms: which of q/k get a LayerNorm ("", "q", "k", "qk")."""
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape):
        return torch.randn(*shape, generator=g).to(dtype=dtype, device=DEVICE)

    if layout == "fused":
        kv_m, kv_l = rnd(M, S, 2, H, dh), rnd(M, n_lat, 2, H, dh)
        km, vm, kl, vl = kv_m[:, :, 0], kv_m[:, :, 1], kv_l[:, :, 0], kv_l[:, :, 1]
        q = rnd(M, n_lat, H, 2 * dh)[..., dh:]  # a slice of a wider projection
    elif layout == "heads_major":
        km, vm = rnd(M, H, S, dh).transpose(1, 2), rnd(M, H, S, dh).transpose(1, 2)
        kl, vl = rnd(M, H, n_lat, dh).transpose(1, 2), rnd(M, H, n_lat, dh).transpose(1, 2)
        q = rnd(M, H, n_lat, dh).transpose(1, 2)
    else:
        km, vm, kl, vl, q = rnd(M, S, H, dh), rnd(M, S, H, dh), rnd(M, n_lat, H, dh), rnd(M, n_lat, H, dh), \
            rnd(M, n_lat, H, dh)
    # LayerNorm params in fp32 (as a loader keeps them); weight away from 1 and a non-zero bias
    q_norm = (torch.randn(dh, generator=g).to(DEVICE) * 0.5 + 1, torch.randn(dh, generator=g).to(DEVICE)) \
        if "q" in norms else None
    k_norm = (torch.randn(dh, generator=g).to(DEVICE) * 0.5 + 1, torch.randn(dh, generator=g).to(DEVICE)) \
        if "k" in norms else None
    return (q, km, vm, kl, vl), q_norm, k_norm


def _f64(args, q_norm, k_norm):
    d = lambda n: None if n is None else tuple(t.double() for t in n)
    return [a.double() for a in args], d(q_norm), d(k_norm)


def _naive(q, km, vm, kl, vl, q_norm, k_norm, eps, scale):
    """flamingo.md §3 written out per media item, head and latent, in float64."""
    M, n, H, dh = q.shape
    out = torch.empty(q.shape, dtype=torch.float64)

    def ln(x, norm):
        if norm is None:
            return x
        mu = x.mean(-1, keepdim=True)
        var = ((x - mu) ** 2).mean(-1, keepdim=True)
        return (x - mu) / torch.sqrt(var + eps) * norm[0].double() + norm[1].double()

    for m in range(M):
        for h in range(H):
            keys = ln(torch.cat([km[m, :, h], kl[m, :, h]]).double(), k_norm)
            vals = torch.cat([vm[m, :, h], vl[m, :, h]]).double()
            for i in range(n):
                qi = ln(q[m, i, h].double(), q_norm)
                w = torch.exp((keys @ qi) * scale - ((keys @ qi) * scale).max())
                out[m, i, h] = (w[:, None] * vals).sum(0) / w.sum()
    return out


@pytest.mark.parametrize("norms", ["", "qk"])
def test_reference_matches_naive_loop(norms):
    (args, qn, kn) = _inputs(2, 7, 5, 2, 16, torch.float64, layout="fused", norms=norms)
    ref = perceiver_attention_reference(*args, q_norm=qn, k_norm=kn, norm_eps=1e-5)
    naive = _naive(*[a.cpu() for a in args], qn and tuple(t.cpu() for t in qn),
                   kn and tuple(t.cpu() for t in kn), 1e-5, 16**-0.5)
    torch.testing.assert_close(ref.cpu(), naive, atol=1e-12, rtol=1e-12)


# (media, media tokens S, latents, heads, head dim, layout, norms): kv lengths S + n_lat span
# 65 .. 1153; dh 96 exercises the padded (128-wide) head-dim tile; n_lat 19 and 97 the query masks.
CASES = [
    (1, 1, 64, 2, 64, "fused", ""),            # kv length 65
    (3, 256, 64, 2, 96, "fused", "qk"),        # IDEFICS-like, kv length 320
    (7, 1025, 64, 1, 128, "heads_major", ""),  # kv length 1089
    (3, 320, 19, 2, 96, "contiguous", "k"),
    (1, 97, 97, 2, 128, "fused", "q"),
]


@needs_triton
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(map(str, c)))
def test_kernel_matches_reference(case, dtype):
    M, S, n_lat, H, dh, layout, norms = case
    args, qn, kn = _inputs(M, S, n_lat, H, dh, dtype, layout=layout, norms=norms,
                              seed=M * 1000 + S + dh)
    storage, out = nan_buffer(args[0].shape, dtype, strided=layout != "contiguous")
    res = perceiver_attention(*args, q_norm=qn, k_norm=kn, backend="triton", out=out)
    assert res.data_ptr() == out.data_ptr()
    assert not torch.isnan(storage).any(), "kernel left elements of out unwritten"
    ref = perceiver_attention_reference(*_f64(args, qn, kn)[0], q_norm=_f64(args, qn, kn)[1],
                                        k_norm=_f64(args, qn, kn)[2])
    assert_close(out, ref, dtype, f"perceiver {case}")


@needs_triton
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("dh", [160, 256])
def test_gpu_tiles_of_wide_heads(monkeypatch, dh, dtype):
    # The tiles the GPU path picks for heads wider than 128 (32-key tiles; 32 query rows in fp32),
    # through the interpreter here (for real on a GPU): ragged key tails in both sources, padded
    # head dim.
    monkeypatch.setattr(pa_mod, "_interpreted", lambda device: False)
    monkeypatch.setattr(pa_mod, "_sm_count", lambda device: 132)
    cfg = pa_mod._perceiver_config(37, dh, dtype, 2, DEVICE)
    assert cfg["BLOCK_N"] == 32 and cfg["BLOCK_D"] == 256 and cfg["num_stages"] == 2
    args, qn, kn = _inputs(1, 45, 37, 2, dh, dtype, layout="fused", norms="qk", seed=dh)
    out = perceiver_attention(*args, q_norm=qn, k_norm=kn, backend="triton")
    a64, qn64, kn64 = _f64(args, qn, kn)
    assert_close(out, perceiver_attention_reference(*a64, q_norm=qn64, k_norm=kn64), dtype, f"perceiver dh={dh}")


@needs_triton
def test_kernel_custom_scale_and_eps_functional_call():
    args, qn, kn = _inputs(2, 70, 64, 2, 64, torch.float32, layout="fused", norms="qk", seed=3)
    out = perceiver_attention(*args, q_norm=qn, k_norm=kn, norm_eps=1e-3, scale=0.3, backend="triton")
    a64, q64, k64 = _f64(args, qn, kn)
    ref = perceiver_attention_reference(*a64, q_norm=q64, k_norm=k64, norm_eps=1e-3, scale=0.3)
    assert out.dtype == torch.float32 and out.is_contiguous()
    assert_close(out, ref, torch.float32, "perceiver scale/eps")


@needs_triton
def test_float64_falls_back_to_reference():
    args, _, _ = _inputs(1, 5, 4, 1, 16, torch.float64, layout="contiguous", norms="")
    out = perceiver_attention(*args, backend="triton")
    torch.testing.assert_close(out, perceiver_attention_reference(*args))


@needs_triton
def test_dispatch(monkeypatch):
    args, _, _ = _inputs(1, 9, 16, 1, 16, torch.float32, layout="contiguous", norms="")
    spy = KernelSpy(pa_mod._perceiver_attention_kernel)
    monkeypatch.setattr(pa_mod, "_perceiver_attention_kernel", spy)
    perceiver_attention(*args, backend="torch")
    assert spy.launches == 0, "backend='torch' launched the triton kernel"
    perceiver_attention(*args, backend="triton")
    assert spy.launches == 1, "backend='triton' did not launch the triton kernel"
    if DEVICE.type == "cpu":
        monkeypatch.setenv("TRITON_INTERPRET", "0")  # no interpreter, no GPU: the reference runs
        perceiver_attention(*args, backend="triton")
        assert spy.launches == 1


def test_bad_shapes_are_reported():
    q = torch.randn(2, 8, 2, 16)
    km = torch.randn(2, 5, 2, 16)
    kl = torch.randn(2, 8, 2, 16)
    with pytest.raises(ValueError, match="q must be"):
        perceiver_attention(q[0], km, km, kl, kl)
    with pytest.raises(ValueError, match="k_media has shape"):
        perceiver_attention(q, km[:, :, :1], km, kl, kl)
    with pytest.raises(ValueError, match="k_latents has shape"):
        perceiver_attention(q, km, km, kl[:, :3], kl)
    with pytest.raises(ValueError, match="lengths differ"):
        perceiver_attention(q, km, km[:, :4], kl, kl)
    with pytest.raises(ValueError, match="v_media is torch.float16"):
        perceiver_attention(q, km, km.half(), kl, kl)
    with pytest.raises(ValueError, match="q_norm must be"):
        perceiver_attention(q, km, km, kl, kl, q_norm=(torch.ones(8), torch.zeros(8)))
    with pytest.raises(ValueError, match="out is"):
        perceiver_attention(q, km, km, kl, kl, out=torch.empty(2, 8, 2, 15))


@needs_triton
def test_torch_compile_fullgraph():
    # Inductor treats the custom op as one opaque extern call; no graph break allowed.
    args, qn, kn = _inputs(2, 30, 16, 2, 32, torch.float32, layout="fused", norms="qk", seed=5)
    fn = lambda *a: perceiver_attention(*a, q_norm=qn, k_norm=kn, backend="triton")
    out = torch.compile(fn, fullgraph=True)(*args)
    a64, q64, k64 = _f64(args, qn, kn)
    assert_close(out, perceiver_attention_reference(*a64, q_norm=q64, k_norm=k64), torch.float32, "compiled")


@gpu_only
@needs_triton
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_cuda_graph_capture(dtype):
    args, qn, kn = _inputs(4, 256, 64, 16, 96, dtype, layout="fused", norms="qk", seed=7)
    fn = lambda: perceiver_attention(*args, q_norm=qn, k_norm=kn, backend="triton")
    fn()  # compile outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fn()
    graph.replay()
    torch.cuda.synchronize()
    a64, q64, k64 = _f64(args, qn, kn)
    assert_close(out, perceiver_attention_reference(*a64, q_norm=q64, k_norm=k64), dtype, "graph")


@gpu_only
@needs_triton
@pytest.mark.parametrize("frames", [1, 8])
def test_gpu_long_video_kv(frames):
    # IDEFICS shapes: 257 tokens per frame, 16 heads, dh 96; kv length frames * 257 + 64 > 2048.
    args, qn, kn = _inputs(3, frames * 257, 64, 16, 96, torch.bfloat16, layout="fused", norms="qk", seed=11)
    out = perceiver_attention(*args, q_norm=qn, k_norm=kn, backend="triton")
    a64, q64, k64 = _f64(args, qn, kn)
    assert_close(out, perceiver_attention_reference(*a64, q_norm=q64, k_norm=k64), torch.bfloat16,
                 f"video F={frames}")
    assert math.isfinite(out.float().abs().max().item())
