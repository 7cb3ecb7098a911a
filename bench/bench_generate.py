"""End-to-end generation: lmmrt against transformers' IdeficsForVisionText2Text, same weights.

An IDEFICS-9B-shaped model (LLaMA-7B decoder 32 x 4096, ViT-H/14 32 x 1280 at 224 px, perceiver
6 x 16 x 96 with 64 latents, a gated cross-attention block every 4 layers) is built with random
weights on the device, in bf16, by transformers itself (no download); its state dict is converted
in memory to lmmrt (config_from_hf / weight_map / convert_state, the converter's own path), so both
engines run exactly the same weights. Workload per row: 1 image + a 64-token prompt (BOS, the
image marker, 62 random text tokens), greedy decoding of `new_tokens` tokens, EOS ignored, at
batch 1, 8 and 32 (each row its own image and text).

Measured per engine and batch, after a short warm-up generate of the same shapes:
- TTFT: call start -> first token (media encoding + prompt forward + first sampling);
- decode tokens/s = batch * steps / decode time, ms/step (steps after the first token);
  transformers: a logits processor that synchronizes and timestamps every step;
- achieved GB/s = bytes one decode step must read / step time, with
    bytes/step = decoder weights (all layers, final norm, LM head; B rows of the embedding)
               + cross-attention block weights except the media K/V projection (cached at prefill)
               + KV cache: 2 * layers * B * kv_heads * kv_len * head_dim * e (kv_len averaged
                 over the decode steps)
               + media K/V: 2 * blocks * B * 64 * heads * head_dim * e (one image per row)
  the same formula for both engines (transformers really reads more: it re-projects the image
  states every step), and its fraction of the copy ceiling measured in the same run;
- peak memory: the allocator's peak during the call minus what was allocated before it, plus
  the engine's weights;
- agreement: lmmrt's greedy tokens against transformers' for the first steps of every row
  (reported, never asserted: bf16 rounding differs between the two and random weights give
  near-ties).
An OpenFlamingo-9B-shaped lmmrt model (MPT-7B decoder) is timed too when lmmrt has the MPT family;
there is no transformers baseline for it.
"""

from __future__ import annotations

import gc
import time
from pathlib import Path

import torch

from bench.harness import BenchRun, short_error

IDEFICS_9B = dict(
    vocab_size=32000, additional_vocab_size=2, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
    num_attention_heads=32, max_position_embeddings=2048, cross_layer_interval=4, qk_layer_norms=False,
    alpha_type="float", alpha_initializer="zeros", use_resampler=True, tie_word_embeddings=False,
    bos_token_id=1, eos_token_id=2, pad_token_id=0,
    vision_config=dict(embed_dim=1280, image_size=224, patch_size=14, num_hidden_layers=32, num_attention_heads=16,
                       intermediate_size=5120, hidden_act="gelu"),
    perceiver_config=dict(use_resampler=True, resampler_n_latents=64, resampler_depth=6, resampler_n_heads=16,
                          resampler_head_dim=96, qk_layer_norms_perceiver=False),
)
IDEFICS_TINY = dict(
    IDEFICS_9B, vocab_size=96, hidden_size=64, intermediate_size=112, num_hidden_layers=4, num_attention_heads=4,
    max_position_embeddings=256, cross_layer_interval=2,
    vision_config=dict(embed_dim=48, image_size=28, patch_size=7, num_hidden_layers=2, num_attention_heads=4,
                       intermediate_size=96, hidden_act="gelu"),
    perceiver_config=dict(use_resampler=True, resampler_n_latents=8, resampler_depth=2, resampler_n_heads=2,
                          resampler_head_dim=16, qk_layer_norms_perceiver=False),
)
BATCHES, SMOKE_BATCHES = (1, 8, 32), (1, 2)
PROMPT_LEN, NEW_TOKENS, SMOKE_NEW_TOKENS = 64, 32, 6
AGREE_STEPS = 8
FIRST_TEXT_ID = 3  # random text avoids pad/bos/eos

FORMULAS = {
    "bytes_per_step": "decoder weights (B embedding rows) + xattn weights except wkv + 2*layers*B*kv_heads*kv_len*head_dim*e "
                      "+ 2*blocks*B*latents*heads*head_dim*e",
    "decode_tok_s": "batch * decode steps / decode seconds (steps after the first token)",
    "ttft": "generate call -> first token, media encoding included",
}


# ---------------------------------------------------------------------------------------------
# models
# ---------------------------------------------------------------------------------------------


def build_hf_idefics(spec: dict, device: torch.device, dtype: torch.dtype, seed: int = 0):
    """IdeficsForVisionText2Text with transformers' random init, built directly on `device` in
    `dtype`; gates (zeros at construction: alpha_initializer="normal" crashes) set non-zero."""
    from transformers import IdeficsConfig, IdeficsForVisionText2Text

    torch.manual_seed(seed)
    cfg = IdeficsConfig(**spec)
    prev = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = IdeficsForVisionText2Text(cfg)
    finally:
        torch.set_default_dtype(prev)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("alpha_cross_attn", "alpha_dense")):
                v = (torch.rand(p.shape, generator=g) * 0.6 + 0.3) * torch.sign(torch.randn(p.shape, generator=g))
                p.copy_(v.to(p.dtype))
    return model.to(dtype).eval()


def lmmrt_from_hf(hf_model, backend: str = "auto"):
    """Convert the transformers model's state dict in memory with lmmrt's IDEFICS converter."""
    from lmmrt.api import Model
    from lmmrt.convert.common import SourceWeights, convert_state
    from lmmrt.convert.idefics import IGNORED, config_from_hf, weight_map
    from lmmrt.models.flamingo import FlamingoModel

    hf = hf_model.config.to_dict()
    image_id = hf["vocab_size"] + hf.get("additional_vocab_size", 0) - 1  # IDEFICS: the last extra token
    cfg = config_from_hf(hf, image_id)
    sd = hf_model.state_dict()
    wmap = weight_map(cfg, hf)
    state = convert_state(SourceWeights.from_state_dict(sd), wmap, cfg, ignored_prefixes=IGNORED, progress=False,
                          reshape={k: (cfg.decoder.dim,) if cfg.xattn.gate_type == "vector" else (1,)
                                   for k in wmap if k.endswith("_gate")})
    # Tensors taken over unchanged still share storage with transformers' model, and lmmrt folds
    # its gates into wo / ff_w2 in place: give lmmrt its own copy of those.
    src_ptrs = {t.untyped_storage().data_ptr() for t in sd.values()}
    state = {k: v.clone() if v.untyped_storage().data_ptr() in src_ptrs else v for k, v in state.items()}
    with torch.device("meta"):
        module = FlamingoModel(cfg)
    module.load_state_dict(state, assign=True)
    return Model(module, cfg, None, backend=backend, path="<converted in memory>")


def openflamingo_config(smoke: bool):
    """OpenFlamingo-9B shapes (MPT-7B decoder, ViT-L/14, perceiver 8 x 64, xattn every 4th layer)."""
    from lmmrt.models.config import DecoderConfig, ModelConfig, PerceiverConfig, VisionConfig, XAttnConfig

    if smoke:
        vis = VisionConfig(image_size=28, patch_size=7, width=32, layers=2, heads=2, mlp_dim=64, act="quick_gelu",
                           output="patch_tokens", resize="resize_crop")
        per = PerceiverConfig(dim=32, depth=2, heads=2, head_dim=16, n_latents=8, mlp_dim=64, mlp_act="gelu")
        d, layers, heads, ffn, vocab, xh, xdh = 64, 4, 4, 256, 128, 2, 16
    else:
        vis = VisionConfig(image_size=224, patch_size=14, width=1024, layers=24, heads=16, mlp_dim=4096,
                           act="quick_gelu", output="patch_tokens", resize="resize_crop")
        per = PerceiverConfig(dim=1024, depth=6, heads=8, head_dim=64, n_latents=64, mlp_dim=4096, mlp_act="gelu")
        d, layers, heads, ffn, vocab, xh, xdh = 4096, 32, 32, 16384, 50280, 8, 64
    dec = DecoderConfig(family="mpt", vocab_size=vocab, dim=d, layers=layers, heads=heads, ffn_dim=ffn, act="gelu",
                        norm_eps=1e-5, norm_bias=False, alibi=True, tie_embeddings=True, max_seq_len=2048)
    xat = XAttnConfig(style="openflamingo", layers=[i for i in range(layers) if (i + 1) % 4 == 0], heads=xh,
                      head_dim=xdh, media_dim=vis.width, ffn_dim=4 * d, norm_eps=1e-5, mask_mode="immediate")
    return ModelConfig(vision=vis, perceiver=per, decoder=dec, xattn=xat, family="openflamingo",
                       image_token_id=vocab - 2, bos_token_id=None, eos_token_id=0, pad_token_id=vocab - 1,
                       end_of_chunk_token_id=vocab - 3, reset_media_after_eos=False)


# ---------------------------------------------------------------------------------------------
# workload and accounting
# ---------------------------------------------------------------------------------------------


def make_workload(B: int, vocab: int, image_id: int, bos_id: int | None, image_size: int, seed: int):
    """B prompts of PROMPT_LEN ids (BOS, image marker, random text) and one random image each
    (normalized float pixels (3, S, S))."""
    g = torch.Generator().manual_seed(seed)
    prompts, images = [], []
    for _ in range(B):
        head = ([bos_id] if bos_id is not None else []) + [image_id]
        text = torch.randint(FIRST_TEXT_ID, min(vocab - 3, 32000), (PROMPT_LEN - len(head),), generator=g).tolist()
        prompts.append(head + text)
        images.append(torch.randn(3, image_size, image_size, generator=g))
    return prompts, images


def decode_step_bytes(model, B: int, kv_len: float) -> float:
    cfg, module = model.config, model.module
    e = module.dtype.itemsize if hasattr(module.dtype, "itemsize") else torch.tensor([], dtype=module.dtype).element_size()
    w = 0
    for name, p in module.named_parameters():
        if name.startswith("decoder.embed."):
            w += p.numel() if cfg.decoder.tie_embeddings else B * p.shape[1]
        elif name.startswith("decoder."):
            w += p.numel()
        elif name.startswith("xattn.") and ".wkv." not in name and ".k_norm." not in name:
            w += p.numel()
    dc, xc = cfg.decoder, cfg.xattn
    kv = 2 * dc.layers * B * dc.kv_heads * kv_len * dc.head_dim
    media = 2 * len(xc.layers) * B * cfg.media_tokens * xc.heads * xc.head_dim
    return float(e) * (w + kv + media)


def weights_gib(module) -> float:
    return sum(p.numel() * p.element_size() for p in module.parameters()) / 2**30


class _Mem:
    """Peak allocator memory of a call above what was allocated before it (CUDA only)."""

    def __init__(self, device):
        self.device, self.peak_extra_gib = device, None

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.base = torch.cuda.memory_allocated(self.device)
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak_extra_gib = (torch.cuda.max_memory_allocated(self.device) - self.base) / 2**30


def run_lmmrt(model, prompts, images, new_tokens: int) -> dict:
    import lmmrt

    lmmrt.generate(model, prompts, images, max_new_tokens=min(4, new_tokens), ignore_eos=True)  # warm-up
    with _Mem(model.device) as mem:
        out = lmmrt.generate(model, prompts, images, max_new_tokens=new_tokens, ignore_eos=True)
    s = model.last_stats
    return dict(ttft_ms=1e3 * s.prefill_s, decode_tok_s=s.decode_tokens_per_s, ms_per_step=s.ms_per_step,
                decode_steps=s.decode_steps, peak_extra_gib=mem.peak_extra_gib,
                tokens=[r.token_ids for r in out])


def hf_inputs(prompts, images, image_id: int, device, dtype) -> dict:
    ids = torch.tensor(prompts, dtype=torch.long)
    B, T = ids.shape
    seen = torch.cumsum((ids == image_id).long(), dim=1)  # text_time: 0 before the marker, 1 after
    return dict(input_ids=ids.to(device), attention_mask=torch.ones_like(ids).to(device),
                pixel_values=torch.stack(images)[:, None].to(device=device, dtype=dtype),
                image_attention_mask=(seen > 0).long()[:, :, None].to(device))


def run_hf(hf_model, inputs: dict, new_tokens: int, device) -> dict:
    from transformers import LogitsProcessor, LogitsProcessorList

    class StepClock(LogitsProcessor):
        """Called once per step right after the forward: synchronize and timestamp."""

        def __init__(self):
            self.times: list[float] = []

        def __call__(self, input_ids, scores):
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            self.times.append(time.perf_counter())
            return scores

    def gen(n, clock=None):
        kw = dict(max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0)
        if clock is not None:
            kw["logits_processor"] = LogitsProcessorList([clock])
        with torch.inference_mode():
            return hf_model.generate(**inputs, **kw)

    gen(min(4, new_tokens))  # warm-up
    clock = StepClock()
    with _Mem(device) as mem:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        out = gen(new_tokens, clock)
    B, T = inputs["input_ids"].shape
    steps = len(clock.times) - 1
    decode_s = clock.times[-1] - clock.times[0] if steps > 0 else float("nan")
    return dict(ttft_ms=1e3 * (clock.times[0] - t0), decode_tok_s=B * steps / decode_s if steps > 0 else float("nan"),
                ms_per_step=1e3 * decode_s / steps if steps > 0 else float("nan"), decode_steps=steps,
                peak_extra_gib=mem.peak_extra_gib, tokens=out[:, T:].tolist())


def agreement(a: list[list[int]], b: list[list[int]], k: int) -> dict:
    lead = []
    for x, y in zip(a, b):
        n = 0
        for s, t in zip(x[:k], y[:k]):
            if s != t:
                break
            n += 1
        lead.append(n)
    return {"steps_compared": k, "rows": len(lead), "rows_agreeing": sum(n == k for n in lead),
            "mean_leading_match": sum(lead) / max(len(lead), 1), "leading_match": lead}


# ---------------------------------------------------------------------------------------------
# the benchmark
# ---------------------------------------------------------------------------------------------


def run(*, device: torch.device, dtype: torch.dtype, out_dir: Path, smoke: bool, budget_s: float,
        ceilings: dict | None = None, use_compile: bool = True) -> dict:
    b = BenchRun("generate", device=device, dtype=dtype, smoke=smoke, out_dir=out_dir, budget_s=budget_s,
                 ceilings=ceilings, formulas=FORMULAS, description=__doc__.split("\n\n")[0])
    batches = SMOKE_BATCHES if smoke else BATCHES
    new_tokens = SMOKE_NEW_TOKENS if smoke else NEW_TOKENS
    engines = ["auto"] if device.type != "cuda" else ["auto", "torch"]
    status = "ok"
    try:
        _idefics(b, device, dtype, smoke, batches, new_tokens, engines)
    except Exception as e:
        status = "error"
        b.notes.append(f"idefics: {short_error(e)}")
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    try:
        _openflamingo(b, device, dtype, smoke, batches, new_tokens)
    except Exception as e:
        b.notes.append(f"openflamingo: {short_error(e)}")
    b.save()
    return b.finish(status)


def _row(b: BenchRun, model_name: str, engine: str, B: int, **kw) -> dict:
    row = {"bench": "generate", "group": model_name, "case": f"{model_name} B={B}", "engine": engine, "batch": B,
           "prompt_tokens": PROMPT_LEN, "dtype": str(b.dtype).replace("torch.", ""), "status": "ok", **kw}
    b.rows.append(row)
    b.save()
    return row


def _account(b: BenchRun, row: dict, model, B: int, new_tokens: int) -> None:
    kv_len = PROMPT_LEN + (1 + new_tokens) / 2  # mean cache length over the timed decode steps
    nbytes = decode_step_bytes(model, B, kv_len)
    row["bytes_per_step"] = nbytes
    if row.get("ms_per_step"):
        row["gbps"] = nbytes / (row["ms_per_step"] * 1e-3) / 1e9
        row["roofline_frac"] = row["gbps"] / b.ceilings["copy_gbps"]


def _idefics(b: BenchRun, device, dtype, smoke, batches, new_tokens, engines) -> None:
    name = "idefics-tiny" if smoke else "idefics-9b"
    t = time.perf_counter()
    hf_model = build_hf_idefics(IDEFICS_TINY if smoke else IDEFICS_9B, device, dtype)
    model = lmmrt_from_hf(hf_model)
    b.notes.append(f"{name}: built transformers model + converted to lmmrt in {time.perf_counter() - t:.1f}s; "
                   f"attention implementation of transformers: {getattr(hf_model.config, '_attn_implementation', '?')}")
    cfg = model.config
    hf_w, lm_w = weights_gib(hf_model), weights_gib(model.module)
    results: dict[tuple[str, int], dict] = {}
    # transformers first, then free it: lmmrt's runs (batch 32 included) then have the memory.
    for B in batches:
        prompts, images = make_workload(B, cfg.decoder.vocab_size, cfg.image_token_id, cfg.bos_token_id,
                                        cfg.vision.image_size, seed=B)
        if b.elapsed > b.budget_s:
            _row(b, name, "hf-eager", B, status="skipped", note="time budget spent")
            continue
        try:
            r = run_hf(hf_model, hf_inputs(prompts, images, cfg.image_token_id, device, dtype), new_tokens, device)
            results[("hf-eager", B)] = r
            row = _row(b, name, "hf-eager", B, weights_gib=hf_w, **{k: v for k, v in r.items() if k != "tokens"},
                       first_tokens=r["tokens"][0][:AGREE_STEPS])
            _account(b, row, model, B, new_tokens)
        except Exception as e:
            _row(b, name, "hf-eager", B, status="error", error=short_error(e))
            if device.type == "cuda":
                torch.cuda.empty_cache()
    del hf_model
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    for engine in engines:
        model.module.set_backend(engine)
        model.backend = engine
        for B in batches:
            label = f"lmmrt[{engine}]"
            if b.elapsed > b.budget_s:
                _row(b, name, label, B, status="skipped", note="time budget spent")
                continue
            prompts, images = make_workload(B, cfg.decoder.vocab_size, cfg.image_token_id, cfg.bos_token_id,
                                            cfg.vision.image_size, seed=B)
            try:
                r = run_lmmrt(model, prompts, images, new_tokens)
                row = _row(b, name, label, B, weights_gib=lm_w, **{k: v for k, v in r.items() if k != "tokens"},
                           first_tokens=r["tokens"][0][:AGREE_STEPS])
                _account(b, row, model, B, new_tokens)
                hf = results.get(("hf-eager", B))
                if hf is not None:
                    row["agreement"] = agreement(r["tokens"], hf["tokens"], min(AGREE_STEPS, new_tokens))
                    if hf.get("decode_tok_s") and row.get("decode_tok_s"):
                        row["speedup_vs_hf"] = row["decode_tok_s"] / hf["decode_tok_s"]
                    if hf.get("ttft_ms") and row.get("ttft_ms"):
                        row["ttft_speedup_vs_hf"] = hf["ttft_ms"] / row["ttft_ms"]
            except Exception as e:
                _row(b, name, label, B, status="error", error=short_error(e))
                if device.type == "cuda":
                    torch.cuda.empty_cache()
    del model
    gc.collect()


def _openflamingo(b: BenchRun, device, dtype, smoke, batches, new_tokens) -> None:
    from lmmrt.models.decoder import LAYERS

    name = "openflamingo-tiny" if smoke else "openflamingo-9b"
    if "mpt" not in LAYERS:
        b.notes.append(f"{name}: skipped (lmmrt has no MPT decoder family)")
        return
    if b.elapsed > 0.8 * b.budget_s:
        b.notes.append(f"{name}: skipped (time budget)")
        return
    from lmmrt.api import Model
    from lmmrt.models.random_init import random_model

    cfg = openflamingo_config(smoke)
    model = Model(random_model(cfg, seed=0, device=device, dtype=dtype), cfg, None, backend="auto",
                  path="<random openflamingo>")
    for B in batches:
        if b.elapsed > b.budget_s:
            _row(b, name, "lmmrt[auto]", B, status="skipped", note="time budget spent")
            continue
        prompts, images = make_workload(B, cfg.decoder.vocab_size, cfg.image_token_id, cfg.bos_token_id,
                                        cfg.vision.image_size, seed=B)
        try:
            r = run_lmmrt(model, prompts, images, new_tokens)
            row = _row(b, name, "lmmrt[auto]", B, weights_gib=weights_gib(model.module),
                       **{k: v for k, v in r.items() if k != "tokens"}, first_tokens=r["tokens"][0][:AGREE_STEPS])
            _account(b, row, model, B, new_tokens)
        except Exception as e:
            _row(b, name, "lmmrt[auto]", B, status="error", error=short_error(e))
    del model


if __name__ == "__main__":
    import sys

    from bench.run import main

    sys.exit(main(["--only", "generate", *sys.argv[1:]]))
