"""The CUDA kernels against the torch references (GPU only; skipped without a device).

Truth is computed in float32/float64 from the same low-precision inputs; a kernel passes when its
error is within twice the error of the torch reference run in the low precision, plus a floor
(`err <= 2 * err_torch_lowp + floor`). Outputs and workspaces are pre-filled with NaN so an
unwritten element fails. Tests named *sanitize* are the small set bench/cuda_checks.sh runs under
compute-sanitizer.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from lmmrt.kernels import backend as _backend
from lmmrt.kernels import masked_cross_attention_cuda as mxa
from lmmrt.kernels import norms
from lmmrt.kernels.masked_cross_attention import MODES, masked_cross_attention_reference

DEV = "cuda"
pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available() or _backend.cuda_extension() is None,
                       reason="needs a CUDA device and the lmmrt._C extension"),
]

FLOOR = {torch.float32: 5e-5, torch.float16: 1e-3, torch.bfloat16: 8e-3}
LOWP = [torch.bfloat16, torch.float16]


def assert_within(got, truth, torch_lowp, what: str):
    got32, truth = got.float(), truth.float()
    nan = torch.isnan(got32)
    assert not nan.any(), f"{what}: NaN (unwritten?) at {nan.nonzero()[:5].tolist()}"
    err = (got32 - truth).abs()
    err_t = (torch_lowp.float() - truth).abs().max().item() if truth.numel() else 0.0
    bound = 2 * err_t + FLOOR[got.dtype]
    if err.numel() and err.max().item() > bound:
        bad = (err > bound).nonzero()[:5].tolist()
        pytest.fail(f"{what}: max err {err.max().item():.3g}, mean {err.mean().item():.3g} > bound {bound:.3g} "
                    f"(torch low-precision err {err_t:.3g}); first mismatches at {bad}")


# ---- decode masked cross-attention -----------------------------------------------------------------

def make_decode_case(B, L, H, D, dtype, seed, max_media=7):
    """Packed media of B sequences (sequence 1 has none when B >= 3) and three text_time variants
    covering: before any media (0), every ordinal, and past the last media (zeros when immediate)."""
    g = torch.Generator().manual_seed(seed)
    counts = torch.randint(1, max_media + 1, (B,), generator=g)
    if B >= 3:
        counts[1] = 0
    starts = torch.cumsum(counts, 0) - counts
    N = max(int(counts.sum()), 1)
    q = torch.randn(B, 1, H, D, generator=g).to(DEV, dtype)
    k = torch.randn(N, L, H, D, generator=g).to(DEV, dtype)
    v = torch.randn(N, L, H, D, generator=g).to(DEV, dtype)
    variants = []
    for shift in range(3):
        tt = [(b * 3 + shift + seed) % (int(counts[b]) + 2) for b in range(B)]
        if shift == 2:
            tt[0] = int(counts[0])  # the last media item: cumulative sees all of them
        variants.append(torch.tensor(tt, dtype=torch.int64, device=DEV)[:, None])
    return dict(q=q, k=k, v=v, media_start=starts.to(DEV, torch.int32), media_count=counts.to(DEV, torch.int64),
                variants=variants)


def decode_truth(q, k, v, tt, ms, mc, mode):
    truth = masked_cross_attention_reference(q.float(), k.float(), v.float(), tt, ms, mc, mode=mode)
    lowp = masked_cross_attention_reference(q, k, v, tt, ms, mc, mode=mode)
    return truth, lowp


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("B", [1, 3, 7])
@pytest.mark.parametrize("L", [64, 257])
@pytest.mark.parametrize("D", [64, 96, 128])
@pytest.mark.parametrize("dtype", LOWP, ids=str)
def test_decode_matches_reference(dtype, D, L, B, mode):
    c = make_decode_case(B, L, 5, D, dtype, seed=B * 1000 + L + D)
    for i, tt in enumerate(c["variants"]):
        got = mxa.masked_cross_attention_decode(c["q"], c["k"], c["v"], tt, c["media_start"], c["media_count"],
                                                mode=mode)
        truth, lowp = decode_truth(c["q"], c["k"], c["v"], tt, c["media_start"], c["media_count"], mode)
        assert_within(got, truth, lowp, f"decode {mode} variant {i} text_time={tt.flatten().tolist()}")


@pytest.mark.parametrize("num_splits", [1, 2, 3, 7, 64])
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("D", [64, 96, 128])
def test_decode_forced_splits_nan_prefilled(D, mode, num_splits):
    c = make_decode_case(3, 257, 5, D, torch.bfloat16, seed=7 + num_splits)
    q = c["q"]
    B, _, H, _ = q.shape
    for tt in c["variants"]:
        out = torch.full_like(q, float("nan"))
        ws = torch.full((mxa.workspace_numel(B, H, D, num_splits),), float("nan"), device=DEV)
        mxa.launch_decode(out, q, c["k"], c["v"], tt, c["media_start"], c["media_count"],
                          ws if num_splits > 1 else None, cumulative=mode == "cumulative", scale=D**-0.5,
                          num_splits=num_splits)
        truth, lowp = decode_truth(q, c["k"], c["v"], tt, c["media_start"], c["media_count"], mode)
        assert_within(out, truth, lowp, f"decode {mode} splits={num_splits}")


def test_decode_index_dtypes_and_strides():
    c = make_decode_case(7, 64, 4, 128, torch.float16, seed=3)
    B = c["q"].shape[0]
    tt = c["variants"][1]
    wide = torch.zeros(B, 4, dtype=torch.int32, device=DEV)
    wide[:, 2] = tt[:, 0].to(torch.int32)
    starts = torch.zeros(2 * B, dtype=torch.int64, device=DEV)
    starts[::2] = c["media_start"].long()
    variants = [
        (tt.to(torch.int32), c["media_start"], c["media_count"].to(torch.int32)),
        (tt[:, 0], c["media_start"].long(), c["media_count"]),
        (wide[:, 2:3], starts[::2], c["media_count"]),  # strided index tensors are read in place
    ]
    for mode in MODES:
        truth, lowp = decode_truth(c["q"], c["k"], c["v"], tt, c["media_start"], c["media_count"], mode)
        for i, (t, s, n) in enumerate(variants):
            got = mxa.masked_cross_attention_decode(c["q"], c["k"], c["v"], t, s, n, mode=mode)
            assert_within(got, truth, lowp, f"index variant {i} {mode}")


def test_decode_custom_scale_and_dispatch():
    from lmmrt.kernels.masked_cross_attention import masked_cross_attention

    c = make_decode_case(3, 64, 8, 64, torch.bfloat16, seed=11)
    tt = c["variants"][0]
    args = (c["q"], c["k"], c["v"], tt, c["media_start"], c["media_count"])
    assert _backend.resolve_name("masked_cross_attention", "cuda", c["q"].device) == "cuda"
    got = masked_cross_attention(*args, mode="cumulative", scale=0.3, backend="cuda")
    truth = masked_cross_attention_reference(*(a.float() if a.is_floating_point() else a for a in args),
                                             mode="cumulative", scale=0.3)
    lowp = masked_cross_attention_reference(*args, mode="cumulative", scale=0.3)
    assert_within(got, truth, lowp, "dispatcher, scale 0.3")


def test_decode_no_media_anywhere_gives_zeros():
    q = torch.randn(2, 1, 4, 128, device=DEV, dtype=torch.bfloat16)
    k = torch.randn(1, 64, 4, 128, device=DEV, dtype=torch.bfloat16)
    zeros = torch.zeros(2, dtype=torch.int32, device=DEV)
    for mode in MODES:
        for tt in (torch.zeros(2, 1, dtype=torch.int64, device=DEV), torch.ones(2, 1, dtype=torch.int64, device=DEV)):
            out = mxa.masked_cross_attention_decode(q, k, k, tt, zeros, zeros, mode=mode)
            assert torch.equal(out, torch.zeros_like(out))


@pytest.mark.parametrize("mode", MODES)
def test_decode_cuda_graph_capture_and_replay(mode):
    # IDEFICS-9B cross-attention shape, long cumulative range -> several splits and the combine.
    c = make_decode_case(3, 64, 32, 128, torch.bfloat16, seed=5, max_media=7)
    q, k, v, ms, mc = c["q"], c["k"], c["v"], c["media_start"], c["media_count"]
    tt = c["variants"][0].clone()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up outside the capture, as torch recommends
        mxa.masked_cross_attention_decode(q, k, v, tt, ms, mc, mode=mode)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = mxa.masked_cross_attention_decode(q, k, v, tt, ms, mc, mode=mode)
    for step, new_tt in enumerate(c["variants"] * 2):
        tt.copy_(new_tt)
        q.copy_(torch.randn_like(q))
        out.fill_(float("nan"))
        graph.replay()
        torch.cuda.synchronize()
        truth, lowp = decode_truth(q, k, v, tt, ms, mc, mode)
        assert_within(out, truth, lowp, f"graph replay {step} ({mode})")


def test_decode_under_torch_compile():
    c = make_decode_case(3, 64, 8, 96, torch.float16, seed=9)
    tt = c["variants"][2]

    def f(q, k, v, tt, ms, mc):
        return mxa.masked_cross_attention_decode(q * 1.0, k, v, tt, ms, mc, mode="cumulative") + 0.0

    compiled = torch.compile(f, fullgraph=True)
    got = compiled(c["q"], c["k"], c["v"], tt, c["media_start"], c["media_count"])
    truth, lowp = decode_truth(c["q"], c["k"], c["v"], tt, c["media_start"], c["media_count"], "cumulative")
    assert_within(got, truth, lowp, "torch.compile")


def test_sanitize_decode():
    """Small decode cases for compute-sanitizer: head_dim 96 (idle lanes), 257 keys (ragged tail),
    several splits, an empty sequence, both modes."""
    c = make_decode_case(3, 257, 3, 96, torch.bfloat16, seed=1, max_media=3)
    q = c["q"]
    B, _, H, D = q.shape
    for mode in MODES:
        for tt in c["variants"]:
            for num_splits in (1, 3):
                out = torch.full_like(q, float("nan"))
                ws = torch.full((mxa.workspace_numel(B, H, D, num_splits),), float("nan"), device=DEV)
                mxa.launch_decode(out, q, c["k"], c["v"], tt, c["media_start"], c["media_count"],
                                  ws if num_splits > 1 else None, cumulative=mode == "cumulative", scale=D**-0.5,
                                  num_splits=num_splits)
                truth, lowp = decode_truth(q, c["k"], c["v"], tt, c["media_start"], c["media_count"], mode)
                assert_within(out, truth, lowp, f"sanitize decode {mode} splits={num_splits}")


# ---- norms and the gated residual ------------------------------------------------------------------

NORM_OPS = ["rms", "layer", "layer_nobias", "add_rms", "add_layer"]


def make_norm_case(op, dtype, rows, D, wdtype, seed=0, misalign=False):
    g = torch.Generator().manual_seed(seed)
    # An offset mean makes LayerNorm's variance cancellation visible.
    x = (torch.randn(rows, D, generator=g) * 2 + 0.75).to(DEV, dtype)
    r = torch.randn(rows, D, generator=g).to(DEV, dtype)
    if misalign:  # contiguous rows that do not start on 16 bytes: the element-wise path
        buf = torch.empty(rows * D + 1, device=DEV, dtype=dtype)
        buf[1:].copy_(x.flatten())
        x = buf[1:].view(rows, D)
    w = (1 + 0.5 * torch.randn(D, generator=g)).to(DEV, wdtype)
    b = torch.randn(D, generator=g).to(DEV, wdtype) if op in ("layer", "add_layer") else None
    return x, (r if op.startswith("add") else None), w, b


def norm_truth(op, x, r, w, b, eps):
    h = x + r if r is not None else x  # rounded to x's dtype, as the reference does
    hd = h.double()
    if op.endswith("rms"):
        y = hd * torch.rsqrt(hd.pow(2).mean(-1, keepdim=True) + eps) * w.double()
    else:
        y = F.layer_norm(hd, (hd.shape[-1],), w.double(), None if b is None else b.double(), eps)
    return y, h


def norm_lowp(op, x, r, w, b, eps):
    if op == "rms":
        return norms.rms_norm_reference(x, w, eps)
    if op.startswith("layer"):
        return norms.layer_norm_reference(x, w, b, eps)
    if op == "add_rms":
        return norms.add_rms_norm_reference(x, r, w, eps)[0]
    return norms.add_layer_norm_reference(x, r, w, b, eps)[0]


@pytest.mark.parametrize("wdtype", ["same", "float32"])
@pytest.mark.parametrize("D", [4096, 1000, 97])
@pytest.mark.parametrize("rows", [1, 3, 7])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
@pytest.mark.parametrize("op", NORM_OPS)
def test_norm_matches_reference(op, dtype, rows, D, wdtype):
    eps = 1e-6 if op.endswith("rms") else 1e-5
    x, r, w, b = make_norm_case(op, dtype, rows, D, dtype if wdtype == "same" else torch.float32, seed=rows + D)
    out = torch.full_like(x, float("nan"))
    h = torch.full_like(x, float("nan")) if r is not None else None
    norms.launch_norm(out, h, x, r, w, b, eps, layer_norm="layer" in op)
    truth, h_truth = norm_truth(op, x, r, w, b, eps)
    assert_within(out, truth, norm_lowp(op, x, r, w, b, eps), f"{op} {dtype} rows={rows} D={D} w={wdtype}")
    if h is not None:
        assert torch.equal(h, h_truth), f"{op}: x + residual differs from torch's add in {dtype}"


@pytest.mark.parametrize("op", NORM_OPS)
@pytest.mark.parametrize("D", [4096, 1000])
def test_norm_misaligned_rows_take_the_elementwise_path(op, D):
    eps = 1e-6
    x, r, w, b = make_norm_case(op, torch.bfloat16, 3, D, torch.bfloat16, seed=1, misalign=True)
    if r is not None:
        out, h = (norms.add_rms_norm_cuda(x, r, w, eps) if op == "add_rms" else norms.add_layer_norm_cuda(x, r, w, b, eps))
    else:
        out, h = (norms.rms_norm_cuda(x, w, eps) if op == "rms" else norms.layer_norm_cuda(x, w, b, eps)), None
    truth, h_truth = norm_truth(op, x, r, w, b, eps)
    assert_within(out, truth, norm_lowp(op, x, r, w, b, eps), f"misaligned {op}")
    if h is not None:
        assert torch.equal(h, h_truth)


def test_norm_public_api_uses_cuda_and_keeps_shapes():
    x = torch.randn(2, 3, 4096, device=DEV, dtype=torch.bfloat16)
    r = torch.randn_like(x)
    w = torch.randn(4096, device=DEV, dtype=torch.bfloat16)
    b = torch.randn(4096, device=DEV, dtype=torch.bfloat16)
    for op in ("rms_norm", "layer_norm", "add_rms_norm", "add_layer_norm", "gated_residual"):
        assert _backend.resolve_name(op, "cuda", x.device) == "cuda"
    y = norms.rms_norm(x, w, 1e-6, backend="cuda")
    assert y.shape == x.shape
    torch.testing.assert_close(y, norms.rms_norm_reference(x, w, 1e-6), atol=3e-2, rtol=2e-2)
    y, h = norms.add_layer_norm(x, r, w, b, 1e-5, backend="cuda")
    assert torch.equal(h, x + r)
    torch.testing.assert_close(y, norms.layer_norm_reference(x + r, w, b, 1e-5), atol=3e-2, rtol=2e-2)
    # A non-contiguous activation is made contiguous by the backend entry.
    xt = x.transpose(0, 1)
    torch.testing.assert_close(norms.rms_norm(xt, w, 1e-6, backend="cuda"), norms.rms_norm_reference(xt, w, 1e-6),
                               atol=3e-2, rtol=2e-2)
    g = torch.tensor([0.3], device=DEV)
    torch.testing.assert_close(norms.gated_residual(x, r, g, backend="cuda"),
                               norms.gated_residual_reference(x, r, g), atol=3e-2, rtol=2e-2)


@pytest.mark.parametrize("gate_kind", ["scalar0d", "one", "per_channel"])
@pytest.mark.parametrize("gdtype", ["same", "float32"])
@pytest.mark.parametrize("D", [4096, 1000, 97])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
def test_gated_residual_matches_reference(dtype, D, gdtype, gate_kind):
    g = torch.Generator().manual_seed(D)
    x = torch.randn(7, D, generator=g).to(DEV, dtype)
    br = torch.randn(7, D, generator=g).to(DEV, dtype)
    shape = {"scalar0d": (), "one": (1,), "per_channel": (D,)}[gate_kind]
    gate = torch.randn(shape, generator=g).to(DEV, dtype if gdtype == "same" else torch.float32)
    out = torch.full_like(x, float("nan"))
    norms.launch_gated_residual(out, x, br, gate)
    truth = x.double() + torch.tanh(gate.double()) * br.double()
    assert_within(out, truth, norms.gated_residual_reference(x, br, gate), f"gated {dtype} D={D} {gate_kind}")
    torch.testing.assert_close(norms.gated_residual_cuda(x, br, gate), out, atol=0, rtol=0)


def test_norms_capture_in_cuda_graph():
    x = torch.randn(4, 1000, device=DEV, dtype=torch.float16)
    r = torch.randn_like(x)
    w = torch.randn(1000, device=DEV, dtype=torch.float32)
    gate = torch.randn(1000, device=DEV, dtype=torch.float16)
    norms.add_rms_norm_cuda(x, r, w, 1e-6)  # warm-up
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y, h = norms.add_rms_norm_cuda(x, r, w, 1e-6)
        z = norms.gated_residual_cuda(h, y, gate)
    for _ in range(2):
        x.copy_(torch.randn_like(x))
        graph.replay()
        torch.cuda.synchronize()
        y_ref, h_ref = norms.add_rms_norm_reference(x, r, w, 1e-6)
        assert torch.equal(h, h_ref)
        torch.testing.assert_close(y, y_ref, atol=4e-3, rtol=4e-3)
        torch.testing.assert_close(z, norms.gated_residual_reference(h_ref, y, gate), atol=4e-3, rtol=4e-3)


def test_sanitize_norms():
    """Small norm / gated cases for compute-sanitizer: vector and element-wise paths, ragged D."""
    for D in (97, 1000):
        for op in NORM_OPS:
            x, r, w, b = make_norm_case(op, torch.bfloat16, 3, D, torch.float32, seed=D)
            out = torch.full_like(x, float("nan"))
            h = torch.full_like(x, float("nan")) if r is not None else None
            norms.launch_norm(out, h, x, r, w, b, 1e-5, layer_norm="layer" in op)
            truth, _ = norm_truth(op, x, r, w, b, 1e-5)
            assert_within(out, truth, norm_lowp(op, x, r, w, b, 1e-5), f"sanitize {op} D={D}")
        x = torch.randn(3, D, device=DEV, dtype=torch.float16)
        gate = torch.randn(D, device=DEV)
        out = torch.full_like(x, float("nan"))
        norms.launch_gated_residual(out, x, x, gate)
        assert_within(out, x.double() + torch.tanh(gate.double()) * x.double(),
                      norms.gated_residual_reference(x, x, gate), f"sanitize gated D={D}")

