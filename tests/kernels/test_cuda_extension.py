"""The CUDA extension without a GPU: it builds, imports, reports its build, turns CUDA failures into
Python exceptions, and every argument check fires before anything is launched.

The kernels' numerics are in test_cuda_kernels.py (GPU only).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from lmmrt.kernels import backend as _backend
from lmmrt.kernels import masked_cross_attention_cuda as mxa
from lmmrt.kernels import norms
from lmmrt.kernels.masked_cross_attention import masked_cross_attention_reference

ext = _backend.cuda_extension()
needs_ext = pytest.mark.skipif(ext is None, reason="lmmrt was installed without its CUDA extension (no nvcc)")


def _nvcc() -> str | None:
    found = shutil.which("nvcc")
    if found:
        return found
    default = Path("/usr/local/cuda/bin/nvcc")
    return str(default) if default.exists() else None


def _nvcc_version() -> str | None:
    nvcc = _nvcc()
    if nvcc is None:
        return None
    m = re.search(r"V(\d+\.\d+\.\d+)", subprocess.run([nvcc, "--version"], capture_output=True, text=True).stdout)
    return m.group(1) if m else None


def _cuobjdump() -> str | None:
    found = shutil.which("cuobjdump")
    if found:
        return found
    try:  # triton wheels ship one
        import triton
    except Exception:
        return None
    bundled = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    return str(bundled) if bundled.exists() else None


def _driverless() -> bool:
    """True where no CUDA device can be used, so a launch fails before touching any pointer."""
    if ext is None or torch.cuda.is_available():
        return False
    try:
        return ext.device_count() == 0
    except RuntimeError:
        return True


def test_extension_is_built_when_nvcc_is_present():
    if _nvcc() is None or os.environ.get("LMMRT_CUDA", "AUTO").upper() == "OFF":
        pytest.skip("no nvcc here (or LMMRT_CUDA=OFF): the pure-Python install is expected")
    assert ext is not None, "nvcc is present but lmmrt._C did not import: the CUDA build was skipped or failed"


@needs_ext
def test_build_info_reports_archs_and_cuda_version():
    info = ext.build_info()
    expected_archs = os.environ.get("LMMRT_CUDA_ARCHS", "80;90").replace(";", ",")
    assert info["cuda_archs"] == expected_archs
    assert re.fullmatch(r"\d+\.\d+\.\d+", info["cuda_version"]), info
    nvcc_version = _nvcc_version()
    if nvcc_version is not None:
        assert info["cuda_version"] == nvcc_version
    if nvcc_version is not None and nvcc_version.startswith("13."):
        assert info["cuda_version"].startswith("13.")
    assert info["decode_min_keys_per_split"] == mxa.MIN_KEYS_PER_SPLIT
    assert _backend.cuda_build_info() == {"archs": info["cuda_archs"], "cuda_version": info["cuda_version"]}


def test_cuda_build_info_is_none_without_extension(monkeypatch):
    monkeypatch.setattr(_backend, "cuda_extension", lambda: None)
    assert _backend.cuda_build_info() is None


@needs_ext
def test_binary_holds_sass_for_every_arch():
    tool = _cuobjdump()
    if tool is None:
        pytest.skip("no cuobjdump")
    listing = subprocess.run([tool, "--list-elf", ext.__file__], capture_output=True, text=True, check=True).stdout
    for arch in os.environ.get("LMMRT_CUDA_ARCHS", "80;90").split(";"):
        for unit in ("masked_cross_attention_decode", "norms"):
            assert f"{unit}.sm_{arch}.cubin" in listing, listing


@needs_ext
def test_cuda_backends_registered():
    for op in ("masked_cross_attention", "rms_norm", "layer_norm", "add_rms_norm", "add_layer_norm", "gated_residual"):
        assert "cuda" in _backend.available(op), op


# ---- CUDA errors become Python exceptions ----------------------------------------------------------

_FAKE = 1 << 20  # a 16-byte aligned address; never dereferenced (the launch fails first)


@needs_ext
@pytest.mark.skipif(not _driverless(), reason="a usable CUDA device is present")
def test_driverless_calls_raise_runtime_error_with_cuda_name():
    with pytest.raises(RuntimeError, match=r"cudaGetDeviceCount: cudaError\w+"):
        ext.device_count()
    with pytest.raises(RuntimeError, match=r"masked_cross_attention_decode: cudaError\w+ \(.+\)"):
        ext.masked_cross_attention_decode(
            _FAKE, _FAKE, _FAKE, _FAKE, _FAKE, _FAKE, _FAKE, _FAKE, batch=2, heads=4, head_dim=128, latents=64,
            num_media=3, q_strides=(512, 128), out_strides=(512, 128), kv_strides=(512, 128),
            index_strides=(1, 1, 1), index_int64=(True, True, True), cumulative=True, scale=0.088,
            num_splits=4, dtype="bfloat16", stream=0)
    with pytest.raises(RuntimeError, match=r"fused_norm: cudaError\w+"):
        ext.fused_norm(_FAKE, _FAKE, _FAKE, _FAKE, _FAKE, _FAKE, rows=3, dim=97, eps=1e-6, layer_norm=True,
                       dtype="float16", weight_dtype="float32", stream=0)
    with pytest.raises(RuntimeError, match=r"gated_residual: cudaError\w+"):
        ext.gated_residual(_FAKE, _FAKE, _FAKE, _FAKE, numel=4096, dim=4096, gate_numel=1, dtype="bfloat16",
                           gate_dtype="float32", stream=0)


# ---- binding-side checks (C++): ValueError before any CUDA call -----------------------------------

def _decode_kwargs(**over):
    kw = dict(batch=2, heads=4, head_dim=64, latents=64, num_media=3, q_strides=(256, 64), out_strides=(256, 64),
              kv_strides=(256, 64), index_strides=(1, 1, 1), index_int64=(False, False, False), cumulative=False,
              scale=0.125, num_splits=1, dtype="float16", stream=0)
    kw.update(over)
    return kw


@needs_ext
@pytest.mark.parametrize("ptrs,over,match", [
    ({}, {"dtype": "float32"}, "float32 is not supported"),
    ({}, {"dtype": "int8"}, "dtype must be"),
    ({}, {"head_dim": 80}, "head_dim must be 64, 96 or 128"),
    ({}, {"num_splits": 0}, "num_splits"),
    ({}, {"kv_strides": (256, 60)}, "multiples of 8"),
    ({"q": _FAKE + 8}, {}, "q must be 16-byte aligned"),
    ({"k": 0}, {}, "k is a null pointer"),
    ({"workspace": 0}, {"num_splits": 3}, "workspace is a null pointer"),
])
def test_decode_binding_rejects_bad_arguments(ptrs, over, match):
    p = dict(out=_FAKE, q=_FAKE, k=_FAKE, v=_FAKE, text_time=_FAKE, media_start=_FAKE, media_count=_FAKE,
             workspace=_FAKE)
    p.update(ptrs)
    with pytest.raises(ValueError, match=match):
        ext.masked_cross_attention_decode(*p.values(), **_decode_kwargs(**over))


@needs_ext
def test_norm_bindings_reject_bad_arguments():
    base = dict(rows=3, dim=97, eps=1e-6, layer_norm=False, dtype="bfloat16", weight_dtype="bfloat16", stream=0)
    with pytest.raises(ValueError, match="residual and h_out"):
        ext.fused_norm(_FAKE, 0, _FAKE, _FAKE, _FAKE, 0, **base)
    with pytest.raises(ValueError, match="bias is only valid"):
        ext.fused_norm(_FAKE, 0, _FAKE, 0, _FAKE, _FAKE, **base)
    with pytest.raises(ValueError, match="weight_dtype must equal"):
        ext.fused_norm(_FAKE, 0, _FAKE, 0, _FAKE, 0, **{**base, "weight_dtype": "float16"})
    with pytest.raises(ValueError, match="x is a null pointer"):
        ext.fused_norm(_FAKE, 0, 0, 0, _FAKE, 0, **base)
    with pytest.raises(ValueError, match="gate must hold 1 or dim"):
        ext.gated_residual(_FAKE, _FAKE, _FAKE, _FAKE, numel=970, dim=97, gate_numel=5, dtype="float32",
                           gate_dtype="float32", stream=0)
    with pytest.raises(ValueError, match="multiple of dim"):
        ext.gated_residual(_FAKE, _FAKE, _FAKE, _FAKE, numel=971, dim=97, gate_numel=1, dtype="float32",
                           gate_dtype="float32", stream=0)


# ---- Python-side checks: shape, dtype, layout, then device (CPU and meta tensors) --------------------

def _decode_inputs(device="cpu", dtype=torch.bfloat16, B=2, H=4, D=64, N=3, L=64):
    g = torch.Generator().manual_seed(0)
    q = torch.randn(B, 1, H, D, generator=g).to(device=device, dtype=dtype)
    k = torch.randn(N, L, H, D, generator=g).to(device=device, dtype=dtype)
    v = torch.randn(N, L, H, D, generator=g).to(device=device, dtype=dtype)
    tt = torch.tensor([[1], [2]][:B], device=device)
    ms = torch.tensor([0, 1][:B], device=device, dtype=torch.int32)
    mc = torch.tensor([1, 2][:B], device=device, dtype=torch.int32)
    return dict(q=q, k=k, v=v, text_time=tt, media_start=ms, media_count=mc)


def _noncontig(t):
    return torch.cat([t, t], dim=-1)[..., : t.shape[-1]]


@pytest.mark.parametrize("change,match", [
    (lambda a: {"q": a["q"].expand(2, 3, 4, 64)}, r"q must be \(batch, 1, heads, head_dim\)"),
    (lambda a: {"q": a["q"].float()}, "q must be float16 or bfloat16"),
    (lambda a: {"q": a["q"][..., :32]}, "head_dim must be one of"),
    (lambda a: {"k": a["k"][:, :, :2]}, r"k must be \(media, latents, 4, 64\)"),
    (lambda a: {"v": a["v"].half()}, "v must have q's dtype"),
    (lambda a: {"v": a["v"][:, :32]}, "k .* and v .* must have the same shape"),
    (lambda a: {"text_time": a["text_time"].expand(2, 3)}, r"text_time must be \(2, 1\)"),
    (lambda a: {"media_start": a["media_start"][:1]}, r"media_start must be \(2,\)"),
    (lambda a: {"media_count": a["media_count"].float()}, "media_count must be int32 or int64"),
    (lambda a: {"q": _noncontig(a["q"])}, "q must be contiguous"),
    (lambda a: {"k": a["k"].transpose(0, 1).contiguous().transpose(0, 1)}, "k must be contiguous"),
    (lambda a: {}, "q must be a CUDA tensor"),
])
def test_decode_python_checks(change, match):
    args = _decode_inputs()
    args.update(change(args))
    with pytest.raises(ValueError, match=match):
        mxa.masked_cross_attention_decode(**args)


def test_decode_python_checks_mode_and_meta():
    with pytest.raises(ValueError, match="mode must be one of"):
        mxa.masked_cross_attention_decode(**_decode_inputs(), mode="causal")
    with pytest.raises(ValueError, match="q must be a CUDA tensor, got device meta"):
        mxa.masked_cross_attention_decode(**_decode_inputs(device="meta"))
    with pytest.raises(ValueError, match=r"num_splits must be in \[1, 65535\], got 0"):
        mxa.masked_cross_attention_decode(**_decode_inputs(), num_splits=0)


def test_decode_fake_impl_gives_shape_on_meta():
    a = _decode_inputs(device="meta")
    out = torch.ops.lmmrt.masked_cross_attention_decode(a["q"], a["k"], a["v"], a["text_time"], a["media_start"],
                                                        a["media_count"], True, 0.125, 0)
    assert out.shape == a["q"].shape and out.dtype == a["q"].dtype and out.device.type == "meta"


def test_decode_router_falls_back_for_prefill(monkeypatch):
    """T > 1 (or another dtype / head_dim) is not the decode kernel's: Triton if registered, else torch."""
    monkeypatch.delitem(_backend._REGISTRY["masked_cross_attention"], "triton", raising=False)
    g = torch.Generator().manual_seed(1)
    q = torch.randn(2, 3, 4, 64, generator=g)
    a = _decode_inputs(dtype=torch.float32)
    tt = torch.tensor([[0, 1, 1], [1, 2, 3]])
    args = (q, a["k"], a["v"], tt, a["media_start"], a["media_count"])
    got = mxa.masked_cross_attention_cuda(*args, mode="cumulative")
    torch.testing.assert_close(got, masked_cross_attention_reference(*args, mode="cumulative"))

    calls = []
    monkeypatch.setitem(_backend._REGISTRY["masked_cross_attention"], "triton",
                        lambda *a, **kw: calls.append(kw) or "triton")
    assert mxa.masked_cross_attention_cuda(*args, mode="immediate", scale=0.5) == "triton"
    assert calls == [{"mode": "immediate", "text_time_first": None, "media_len": None, "scale": 0.5}]


def test_pick_num_splits():
    # IDEFICS immediate decode: one 64-key media item -> no split, no combine launch.
    assert mxa.pick_num_splits(1, 32, 64, 132) == 1
    # A long cumulative range on a small batch splits, never below 64 keys a split.
    s = mxa.pick_num_splits(1, 32, 8 * 64, 132)
    assert 1 < s <= 8
    assert mxa.pick_num_splits(1, 1, 1 << 20, 132) == mxa.MAX_SPLITS
    # Enough (sequence, head) pairs fill the GPU by themselves.
    assert mxa.pick_num_splits(32, 32, 1 << 16, 132) == 1
    assert mxa.pick_num_splits(0, 32, 1 << 16, 132) == 1
    assert mxa.workspace_numel(2, 4, 64, 1) == 0
    assert mxa.workspace_numel(2, 4, 64, 3) == 2 * 4 * 3 * 66


def _norm_inputs(device="cpu", dtype=torch.bfloat16, D=97, wdtype=None):
    g = torch.Generator().manual_seed(2)
    x = torch.randn(3, 5, D, generator=g).to(device=device, dtype=dtype)
    r = torch.randn(3, 5, D, generator=g).to(device=device, dtype=dtype)
    w = torch.randn(D, generator=g).to(device=device, dtype=wdtype or dtype)
    b = torch.randn(D, generator=g).to(device=device, dtype=wdtype or dtype)
    return x, r, w, b


@pytest.mark.parametrize("call,match", [
    (lambda x, r, w, b: norms.rms_norm_cuda(x.double(), w, 1e-6), "x must be float32, float16 or bfloat16"),
    (lambda x, r, w, b: norms.rms_norm_cuda(x, w[:-1], 1e-6), r"weight must be \(97,\)"),
    (lambda x, r, w, b: norms.rms_norm_cuda(x, w.half(), 1e-6), "weight must be torch.bfloat16 or float32"),
    (lambda x, r, w, b: norms.rms_norm_cuda(_noncontig(x), w, 1e-6), "x must be contiguous"),
    (lambda x, r, w, b: norms.rms_norm_cuda(x, w, 1e-6), "x must be a CUDA tensor"),
    (lambda x, r, w, b: norms.layer_norm_cuda(x, w, b.to(torch.int32), 1e-5), "bias must be"),
    (lambda x, r, w, b: norms.layer_norm_cuda(x, w, b, 1e-5), "x must be a CUDA tensor"),
    (lambda x, r, w, b: norms.add_rms_norm_cuda(x, r[:2], w, 1e-6), "residual must have x's shape"),
    (lambda x, r, w, b: norms.add_rms_norm_cuda(x, r.half(), w, 1e-6), "residual must have x's dtype"),
    (lambda x, r, w, b: norms.add_layer_norm_cuda(x, _noncontig(r), w, b, 1e-5), "residual must be contiguous"),
    (lambda x, r, w, b: norms.add_layer_norm_cuda(x, r, w, None, 1e-5), "x must be a CUDA tensor"),
    (lambda x, r, w, b: norms.gated_residual_cuda(x, r, w[:5]), r"gate must be \(97,\)"),
    (lambda x, r, w, b: norms.gated_residual_cuda(x, r.float(), w[:1]), "branch must have x's dtype"),
    (lambda x, r, w, b: norms.gated_residual_cuda(x, r, w[:1].half()), "gate must be torch.bfloat16 or float32"),
    (lambda x, r, w, b: norms.gated_residual_cuda(x, _noncontig(r), w), "branch must be contiguous"),
    (lambda x, r, w, b: norms.gated_residual_cuda(x, r, w[:1]), "x must be a CUDA tensor"),
    (lambda x, r, w, b: norms.gated_residual_cuda(x, r, w), "x must be a CUDA tensor"),
])
def test_norm_python_checks(call, match):
    with pytest.raises(ValueError, match=match):
        call(*_norm_inputs())


def test_norm_python_checks_meta_device():
    x, r, w, b = _norm_inputs(device="meta", wdtype=torch.float32)
    with pytest.raises(ValueError, match="x must be a CUDA tensor, got device meta"):
        norms.add_layer_norm_cuda(x, r, w, b, 1e-5)


def test_norm_fake_impls_give_shapes_on_meta():
    x, r, w, b = _norm_inputs(device="meta")
    assert torch.ops.lmmrt.norm(x, w, b, 1e-5, True).shape == x.shape
    y, h = torch.ops.lmmrt.add_norm(x, r, w, None, 1e-6, False)
    assert y.shape == h.shape == x.shape
    assert torch.ops.lmmrt.gated_residual(x, r, w[:1]).shape == x.shape


def test_norm_backend_entries_fall_back_for_other_dtypes():
    x, r, w, b = (t.double() for t in _norm_inputs())
    torch.testing.assert_close(norms._rms_norm_backend(x, w, 1e-6), norms.rms_norm_reference(x, w, 1e-6))
    torch.testing.assert_close(norms._add_layer_norm_backend(x, r, w, b, 1e-5),
                               norms.add_layer_norm_reference(x, r, w, b, 1e-5))
    torch.testing.assert_close(norms._gated_residual_backend(x, r, w), norms.gated_residual_reference(x, r, w))


def test_launchers_run_the_binding_on_the_tensors_device(monkeypatch):
    """The binding launches on the thread's current device; each launcher must make it the tensors'
    device (a cuda:1 stream used while cuda:0 is current fails to launch). Mocked: no GPU here."""
    current = []

    class FakeDevice:
        def __init__(self, d):
            self.d = torch.device(d)

        def __enter__(self):
            current.append(self.d)

        def __exit__(self, *exc):
            current.pop()

    class FakeStream:
        cuda_stream = 1234

    calls = []

    class FakeExt:
        def __getattr__(self, name):
            def launch(*args, **kw):
                assert kw["stream"] == 1234
                calls.append((name, current[-1] if current else None))
            return launch

    monkeypatch.setattr(_backend, "cuda_extension", lambda: FakeExt())
    monkeypatch.setattr(torch.cuda, "device", FakeDevice)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: FakeStream())
    dev = torch.device("cuda", 1)
    x = torch.zeros(2, 64, dtype=torch.bfloat16)
    w = torch.ones(64, dtype=torch.bfloat16)
    # CPU stand-ins claiming cuda:1: the launchers only read data_ptr, shapes, strides and .device.
    monkeypatch.setattr(torch.Tensor, "device", property(lambda self: dev))
    norms.launch_norm(torch.empty_like(x), None, x, None, w, None, 1e-5, False)
    norms.launch_gated_residual(torch.empty_like(x), x, x, w)
    q = torch.zeros(2, 1, 4, 64, dtype=torch.bfloat16)
    k = torch.zeros(3, 8, 4, 64, dtype=torch.bfloat16)
    idx = torch.zeros(2, dtype=torch.int32)
    mxa.launch_decode(torch.empty_like(q), q, k, k, idx[:, None], idx, idx, None, cumulative=False,
                      scale=0.125, num_splits=1)
    assert calls == [("fused_norm", dev), ("gated_residual", dev), ("masked_cross_attention_decode", dev)]


def test_cuda_router_hands_the_kernel_contiguous_tensors(monkeypatch):
    """The "cuda" backend entry takes any strides (as the Triton one does): a strided decode query
    is made contiguous before the kernel's strict checks, instead of raising."""
    seen = []
    monkeypatch.setattr(mxa, "masked_cross_attention_decode",
                        lambda q, k, v, *a, **kw: seen.append([t.is_contiguous() for t in (q, k, v)]) or q)
    q = torch.zeros(2, 1, 8, 64, dtype=torch.bfloat16)[:, :, ::2]  # (2, 1, 4, 64), every other head
    k = torch.zeros(3, 8, 4, 64, dtype=torch.bfloat16)
    assert not q.is_contiguous() and mxa.supports(q, k)
    idx = torch.zeros(2, dtype=torch.int32)
    mxa.masked_cross_attention_cuda(q, k, k, idx[:, None], idx, idx)
    assert seen == [[True, True, True]]
