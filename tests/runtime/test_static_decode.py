"""The fixed-shape decode step (the one captured as a CUDA graph on a GPU) computes what the eager
decode does. Logits are compared step by step under teacher forcing (robust to near-ties in a
random model); on the CPU the step runs eagerly and greedy tokens must also be identical."""

from __future__ import annotations

import pytest
import torch

import lmmrt
from lmmrt.demo import demo_images, demo_model
from lmmrt.runtime.batch import build_batch
from lmmrt.runtime.decode_plan import DecodePlan, gather_media
from lmmrt.runtime.generate import run_prefill
from lmmrt.runtime.kv_cache import KVCache
from lmmrt.runtime.static_decode import StaticDecodeStep, graph_capturable

PROMPTS = ["a<image>b", "<image>c<image>dd e", "no image"]


def _images():
    im = demo_images()
    return [[im[0]], im, []]


@pytest.fixture(scope="module")
def model():
    return demo_model(device="cpu", backend="torch")


def _run(model, graph, **kw):
    model.cuda_graph = graph
    try:
        return lmmrt.generate(model, PROMPTS, _images(), max_new_tokens=12, ignore_eos=True, **kw)
    finally:
        model.cuda_graph = False


@torch.inference_mode()
def _teacher_forced_logits(model, tokens: torch.Tensor, static: bool) -> list[torch.Tensor]:
    """Next-token logits after the prompt and after each of tokens[:, i] (B, n)."""
    batch = build_batch(model, PROMPTS, _images(), max_new_tokens=tokens.shape[1])
    T = batch.tokens.shape[1]
    cache = KVCache.allocate(model.config.decoder, batch.size, T + tokens.shape[1], model.dtype, model.device)
    logits, media = run_prefill(model, batch, cache)
    step = StaticDecodeStep(model, cache, media, batch.pad, use_graph=True) if static else None
    if not static:
        media.gathered = gather_media(model.module, media, model.backend)
        plan = DecodePlan(model.module, batch)
    out = [logits.float().cpu()]
    for i in range(tokens.shape[1]):
        tok = tokens[:, i].to(model.device)
        if step is not None:
            logits = step(tok, T + i)
        else:
            ctx = plan.decode_context(T + i)
            logits = model.module(tok[:, None], ctx, cache, media, logits_for="last")
        out.append(logits.float().cpu().clone())
    return out


def _check_step_logits(model):
    ref = _run(model, False)
    tokens = torch.tensor([r.token_ids for r in ref])
    eager = _teacher_forced_logits(model, tokens, static=False)
    static = _teacher_forced_logits(model, tokens, static=True)
    for i, (a, b) in enumerate(zip(eager, static)):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-4, msg=lambda m, i=i: f"decode step {i}: {m}")


def test_static_step_logits_match_eager_decode(model):
    _check_step_logits(model)


@pytest.mark.parametrize("kw", [{}, {"temperature": 0.8, "seed": 3}])
def test_static_step_tokens_match_eager_decode(model, kw):
    eager = _run(model, False, **kw)
    static = _run(model, True, **kw)
    assert [r.token_ids for r in eager] == [r.token_ids for r in static]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_cuda_graph_decode_matches_eager_on_gpu():
    m = demo_model(device="cuda", backend="auto")
    assert graph_capturable(m), "the cross-attention op must resolve to a kernel on CUDA"
    _check_step_logits(m)


@pytest.mark.parametrize("family", ["llama", "mpt", "neox"])
@pytest.mark.parametrize("xattn_head_dim", [128, 32])  # the CUDA decode kernel / the Triton op
def test_static_step_has_no_host_sync_or_host_copy(monkeypatch, family, xattn_head_dim):
    """What CUDA-graph capture forbids, checked without a GPU: the whole fixed-shape step runs on the
    meta device (where `.item()` fails and a host tensor shows up as a CPU -> meta copy), with the
    ops resolved as on CUDA (backend auto: the CUDA / Triton custom ops run their fake impls)."""
    import dataclasses

    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_leaves

    from lmmrt.demo import demo_config
    from lmmrt.kernels import backend as _backend
    from lmmrt.kernels import masked_cross_attention_cuda as mxa
    from lmmrt.kernels import norms
    from lmmrt.models.flamingo import FlamingoModel
    from lmmrt.models.xattn import MediaContext
    from lmmrt.runtime.batch import Batch
    from lmmrt.runtime.kv_cache import KVCache
    from lmmrt.runtime.static_decode import StaticDecodeStep

    if not _backend.available("masked_cross_attention")[1:]:
        pytest.skip("neither triton nor the CUDA extension is installed")
    resolve_name = _backend.resolve_name
    monkeypatch.setattr(_backend, "resolve_name", lambda op, backend, device: resolve_name(
        op, backend, torch.device("cuda") if getattr(device, "type", device) == "meta" else device))
    monkeypatch.setattr(mxa, "check_decode_args", lambda *a: None)  # they insist on CUDA tensors
    monkeypatch.setattr(norms, "_check_cuda_args", lambda *a, **k: None)

    cfg = demo_config(120)
    extra = {"mpt": dict(alibi=True, norm_bias=False, act="gelu"),
             "neox": dict(rotary_pct=0.25, parallel_residual=True, norm_bias=True, act="gelu"),
             "llama": dict(kv_heads=2)}[family]
    cfg = dataclasses.replace(cfg, decoder=dataclasses.replace(cfg.decoder, family=family, **extra),
                              xattn=dataclasses.replace(cfg.xattn, head_dim=xattn_head_dim))
    with torch.device("meta"):
        module = FlamingoModel(cfg).to(torch.bfloat16).eval().requires_grad_(False)
    module.set_backend("auto")

    class _Model:
        pass

    model = _Model()
    model.module, model.device, model.backend = module, module.device, "auto"
    B, T, N, dev = 3, 5, 4, "meta"
    batch = Batch(tokens=torch.zeros(B, T, dtype=torch.long, device=dev), pad=torch.zeros(B, dtype=torch.long, device=dev),
                  lengths=[T] * B, text_time=torch.zeros(B, T, dtype=torch.int32, device=dev), media=[],
                  media_start=torch.zeros(B, dtype=torch.int32, device=dev),
                  media_count=torch.zeros(B, dtype=torch.int32, device=dev),
                  media_time=torch.zeros(N, dtype=torch.long, device=dev))
    xc = cfg.xattn
    kv = [(torch.empty(N, 64, xc.heads, xc.head_dim, dtype=torch.bfloat16, device=dev),) * 2 for _ in xc.layers]
    media = MediaContext(kv=kv, text_time=batch.text_time[:, -1:].contiguous(), media_start=batch.media_start,
                         media_count=batch.media_count, any_media=True)
    cache = KVCache.allocate(cfg.decoder, B, T + 4, torch.bfloat16, dev)
    step = StaticDecodeStep(model, cache, media, batch.pad, use_graph=False)

    class Spy(TorchDispatchMode):
        bad: list = []
        ops: set = set()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            name = str(func)
            self.ops.add(name)
            host = [t for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor) and t.device.type == "cpu"]
            if "_local_scalar_dense" in name or (host and any(t.dim() > 0 for t in host)):
                self.bad.append(name)
            return func(*args, **kwargs)

    spy = Spy()
    with torch.inference_mode(), spy:
        logits = step._forward()
    assert logits.shape == (B, cfg.decoder.vocab_size)
    assert not spy.bad, f"host syncs / host tensors inside the captured step: {spy.bad}"
    assert any(op.startswith("lmmrt.masked_cross_attention") for op in spy.ops), sorted(spy.ops)
