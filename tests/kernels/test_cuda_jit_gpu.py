"""The NVRTC JIT path of the CUDA kernels on a GPU (bench/device.sh; skipped without one): the JIT
launches give the extension's results bit for bit for every kernel and dtype, take and return CuPy
arrays, run inside a captured CUDA-graph decode step; first-use compile and cached load times are
printed and recorded in the junit XML.

Bit for bit assumes NVRTC and the nvcc that built lmmrt._C generate the same code: the same CUDA
release on the device machine (both from its toolkit).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import time

import pytest
import torch

from lmmrt.kernels import backend as _backend
from lmmrt.kernels import cuda_jit, norms
from lmmrt.kernels import masked_cross_attention_cuda as mxa
from lmmrt.kernels.cuda_jit.launcher import JitKernels


def _jit_unusable() -> str | None:
    if not torch.cuda.is_available():
        return "no CUDA device"
    if importlib.util.find_spec("cupy") is None:
        return "CuPy is not installed"
    if _backend.cuda_extension() is None:
        return "no lmmrt._C extension to compare with"
    return cuda_jit.jit_unusable_reason()


_WHY_NOT = _jit_unusable()
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(_WHY_NOT is not None, reason=f"JIT GPU tests: {_WHY_NOT}")]


# ---- GPU: the JIT against the extension ---------------------------------------------------------

@pytest.fixture
def use_kernels(monkeypatch):
    def use(kind):
        monkeypatch.setattr(_backend, "cuda_kernels", (lambda: _backend.cuda_extension()) if kind == "ext"
                            else cuda_jit.jit_kernels)
    return use


def _both(use_kernels, fn):
    use_kernels("ext")
    a = fn()
    torch.cuda.synchronize()
    use_kernels("jit")
    b = fn()
    torch.cuda.synchronize()
    return a, b


def _assert_bitwise(a, b, what):
    for x, y in zip(a if isinstance(a, tuple) else (a,), b if isinstance(b, tuple) else (b,)):
        assert x.dtype == y.dtype and x.shape == y.shape
        assert torch.equal(x.view(torch.uint8) if x.is_floating_point() else x,
                           y.view(torch.uint8) if y.is_floating_point() else y), f"{what}: JIT differs from _C"


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("head_dim", [64, 96, 128])
@pytest.mark.parametrize("mode", ["immediate", "cumulative"])
@pytest.mark.parametrize("num_splits", [1, 3])
def test_gpu_decode_jit_equals_extension(use_kernels, dtype, head_dim, mode, num_splits):
    g = torch.Generator().manual_seed(head_dim)
    B, H, N, L = 3, 5, 7, 19
    q = torch.randn(B, 1, H, head_dim, generator=g).cuda().to(dtype)
    k, v = (torch.randn(N, L, H, head_dim, generator=g).cuda().to(dtype) for _ in range(2))
    tt = torch.tensor([[1], [3], [0]], device="cuda")
    ms, mc = torch.tensor([0, 2, 4], device="cuda"), torch.tensor([2, 3, 3], device="cuda")
    a, b = _both(use_kernels, lambda: mxa.masked_cross_attention_decode(q, k, v, tt, ms, mc, mode=mode,
                                                                         num_splits=num_splits))
    _assert_bitwise(a, b, f"decode {dtype} dh {head_dim} {mode} splits {num_splits}")


@pytest.mark.parametrize("dtype, wdtype", [(torch.float32, torch.float32), (torch.float16, torch.float16),
                                           (torch.float16, torch.float32), (torch.bfloat16, torch.bfloat16),
                                           (torch.bfloat16, torch.float32)])
@pytest.mark.parametrize("dim", [64, 97, 4096])
def test_gpu_norms_jit_equal_extension(use_kernels, dtype, wdtype, dim):
    g = torch.Generator().manual_seed(dim)
    x, r = (torch.randn(5, dim, generator=g).cuda().to(dtype) for _ in range(2))
    w, bias = (torch.randn(dim, generator=g).cuda().to(wdtype) for _ in range(2))
    gate = torch.randn(dim, generator=g).cuda().to(wdtype)
    for what, fn in [("rms", lambda: norms.rms_norm_cuda(x, w, 1e-6)),
                     ("layer", lambda: norms.layer_norm_cuda(x, w, bias, 1e-5)),
                     ("add_rms", lambda: norms.add_rms_norm_cuda(x, r, w, 1e-6)),
                     ("add_layer", lambda: norms.add_layer_norm_cuda(x, r, w, bias, 1e-5)),
                     ("gated", lambda: norms.gated_residual_cuda(x, r, gate)),
                     ("gated1", lambda: norms.gated_residual_cuda(x, r, gate[:1]))]:
        a, b = _both(use_kernels, fn)
        _assert_bitwise(a, b, f"{what} {dtype}/{wdtype} dim {dim}")


def test_gpu_cupy_arrays_in_cupy_arrays_out(use_kernels):
    import cupy

    use_kernels("jit")
    x = cupy.random.standard_normal((4, 128), dtype=cupy.float32).astype(cupy.float16)
    w = cupy.ones(128, dtype=cupy.float16)
    out = norms.rms_norm_cuda(x, w, 1e-6)
    assert isinstance(out, cupy.ndarray) and out.dtype == cupy.float16
    ref = norms.rms_norm_reference(torch.from_dlpack(x), torch.from_dlpack(w), 1e-6)
    assert torch.equal(torch.from_dlpack(out), norms.rms_norm_cuda(torch.from_dlpack(x), torch.from_dlpack(w), 1e-6))
    assert (torch.from_dlpack(out).float() - ref.float()).abs().max().item() < 1e-2


def test_gpu_first_use_compile_and_cached_load_times(tmp_path, record_property):
    x = torch.randn(2, 64, device="cuda", dtype=torch.float16)
    w = torch.ones(64, device="cuda", dtype=torch.float16)
    times = {}
    for run in ("first_use", "cached"):
        k = JitKernels(cache_dir=tmp_path)
        t0 = time.perf_counter()
        k.fused_norm(x.data_ptr(), 0, x.data_ptr(), 0, w.data_ptr(), 0, rows=2, dim=64, eps=1e-6, layer_norm=False,
                     dtype="float16", weight_dtype="float16", stream=torch.cuda.current_stream().cuda_stream)
        torch.cuda.synchronize()
        times[run] = time.perf_counter() - t0
        dev = torch.cuda.current_device()
        assert k.compiled[dev] == (run == "first_use")
    record_property("jit_first_use_s", round(times["first_use"], 3))
    record_property("jit_cached_load_s", round(times["cached"], 3))
    print(f"\nJIT first use (compile + load, both groups): {times['first_use']:.2f} s; "
          f"cached load: {times['cached']:.3f} s")
    assert times["cached"] < times["first_use"]


def test_gpu_jit_decode_kernel_inside_captured_step(tmp_path, use_kernels, monkeypatch):
    """The JIT decode kernel inside the captured CUDA-graph decode step gives the extension's tokens."""
    import lmmrt
    from lmmrt.api import Model
    from lmmrt.demo import char_tokenizer, demo_config, demo_images
    from lmmrt.models.random_init import random_model
    from lmmrt.runtime.tokenizer import Tokenizer

    tok = char_tokenizer()
    cfg = demo_config(tok.get_vocab_size())
    cfg = dataclasses.replace(cfg, xattn=dataclasses.replace(cfg.xattn, heads=2, head_dim=128))
    Model(random_model(cfg, seed=7, device="cpu", dtype=torch.bfloat16, std=0.2), cfg, Tokenizer(tok),
          backend="torch", path="").save(tmp_path / "m")
    images = [[demo_images()[0]], demo_images()]
    tokens, captured = {}, []
    launch = JitKernels.masked_cross_attention_decode

    def spy(self, *a, **k):
        captured.append(torch.cuda.is_current_stream_capturing())
        return launch(self, *a, **k)

    for kind in ("ext", "jit"):
        use_kernels(kind)
        if kind == "jit":
            monkeypatch.setattr(JitKernels, "masked_cross_attention_decode", spy)
        model = lmmrt.load(tmp_path / "m", device="cuda", dtype=torch.bfloat16, backend="cuda", cuda_graph=True)
        ids = [model.tokenizer.encode(p) for p in ("a<image>b", "<image>c<image>dd e")]
        tokens[kind] = [r.token_ids for r in lmmrt.generate(model, ids, images, max_new_tokens=8, ignore_eos=True)]
    assert any(captured), "the JIT decode kernel was never launched inside a graph capture"
    assert tokens["jit"] == tokens["ext"]
