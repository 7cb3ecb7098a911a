"""End-to-end generation: lmmrt against transformers' IdeficsForVisionText2Text, same weights.

An IDEFICS-9B-shaped model (LLaMA-7B decoder 32 x 4096, ViT-H/14 32 x 1280 at 224 px, perceiver
6 x 16 x 96 with 64 latents, a gated cross-attention block every 4 layers) is built with random
weights on the device, in bf16, by transformers itself (no download) and converted in memory to
lmmrt (bench/idefics_engines.py), so both engines run exactly the same weights. Workload per row:
1 image + a 64-token prompt (BOS, the image marker, 62 random text tokens), greedy decoding of
`new_tokens` tokens, EOS ignored, at batch 1 and 16 (each row its own image and text). lmmrt runs
its default path (on CUDA: decode replayed as a CUDA graph; warnings of a failed capture are
recorded in the row), then transformers, batch by batch; lmmrt's torch backend follows if time is
left.

Measured per engine and batch, after a warm-up generate (lmmrt: of the same shapes, so the graph
of that batch size and cache-length bucket is captured before the timed call):
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
- per decode step at batch 1 (bench/profile_ops.py, GPU only): aten ops, kernel launches and
  CUDA-graph launches of both engines (lmmrt's default path should show one graph launch).
An OpenFlamingo-9B-shaped lmmrt model (MPT-7B decoder) is timed too when lmmrt has the MPT family;
there is no transformers baseline for it.
"""

from __future__ import annotations

import gc
import time
from pathlib import Path

import torch

from bench import profile_ops
from bench.harness import BenchRun, short_error
from bench.idefics_engines import (
    IDEFICS_9B,
    IDEFICS_TINY,
    PROMPT_LEN,
    account_decode_bytes,
    build_hf_idefics,
    compare_with_hf,
    hf_inputs,
    lmmrt_from_hf,
    make_workload,
    run_hf,
    run_lmmrt,
    weights_gib,
)

BATCHES, SMOKE_BATCHES = (1, 16), (1, 2)
NEW_TOKENS, SMOKE_NEW_TOKENS = 32, 6
AGREE_STEPS = 8

FORMULAS = {
    "bytes_per_step": "decoder weights (B embedding rows) + xattn weights except wkv + 2*layers*B*kv_heads*kv_len*head_dim*e "
                      "+ 2*blocks*B*latents*heads*head_dim*e",
    "decode_tok_s": "batch * decode steps / decode seconds (steps after the first token)",
    "ttft": "generate call -> first token, media encoding included",
}


# ---------------------------------------------------------------------------------------------
# models
# ---------------------------------------------------------------------------------------------


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


def _idefics(b: BenchRun, device, dtype, smoke, batches, new_tokens, engines) -> None:
    name = "idefics-tiny" if smoke else "idefics-9b"
    t = time.perf_counter()
    hf_model = build_hf_idefics(IDEFICS_TINY if smoke else IDEFICS_9B, device, dtype)
    model = lmmrt_from_hf(hf_model)
    b.notes.append(f"{name}: built transformers model + converted to lmmrt in {time.perf_counter() - t:.1f}s; "
                   f"attention implementation of transformers: {getattr(hf_model.config, '_attn_implementation', '?')}; "
                   f"lmmrt cuda_graph={getattr(model, 'cuda_graph', None)!r} (its default)")
    cfg = model.config
    hf_w, lm_w = weights_gib(hf_model), weights_gib(model.module)
    default, others = engines[0], engines[1:]
    # Per batch: lmmrt's default path, then transformers, back to back (what the comparison needs
    # most is measured first; a run cut short by its budget still has whole pairs).
    for B in batches:
        prompts, images = make_workload(B, cfg.decoder.vocab_size, cfg.image_token_id, cfg.bos_token_id,
                                        cfg.vision.image_size, seed=B)
        lm, lm_tokens = _lmmrt_case(b, name, model, default, B, prompts, images, new_tokens, lm_w)
        if b.elapsed > b.budget_s:
            _row(b, name, "hf-eager", B, status="skipped", note="time budget spent")
            continue
        try:
            hf = run_hf(hf_model, hf_inputs(prompts, images, cfg.image_token_id, device, dtype), new_tokens, device)
            row = _row(b, name, "hf-eager", B, weights_gib=hf_w, **{k: v for k, v in hf.items() if k != "tokens"},
                       first_tokens=hf["tokens"][0][:AGREE_STEPS])
            account_decode_bytes(b, row, model, B, new_tokens)
        except Exception as e:
            _row(b, name, "hf-eager", B, status="error", error=short_error(e))
            if device.type == "cuda":
                torch.cuda.empty_cache()
            continue
        if lm is not None:
            compare_with_hf(lm, lm_tokens, hf, hf["tokens"], min(AGREE_STEPS, new_tokens))
            b.save()
    if device.type == "cuda" and b.elapsed < b.budget_s:
        _count_launches(b, name, model, hf_model, default)
    del hf_model
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    for engine in others:
        for B in batches:
            prompts, images = make_workload(B, cfg.decoder.vocab_size, cfg.image_token_id, cfg.bos_token_id,
                                            cfg.vision.image_size, seed=B)
            _lmmrt_case(b, name, model, engine, B, prompts, images, new_tokens, lm_w)
    del model
    gc.collect()


def _lmmrt_case(b: BenchRun, name, model, engine, B, prompts, images, new_tokens, weights):
    """One lmmrt row (engine = backend): (row, tokens), or (None, None) on an error or a skip."""
    label = f"lmmrt[{engine}]"
    if b.elapsed > b.budget_s:
        _row(b, name, label, B, status="skipped", note="time budget spent")
        return None, None
    model.module.set_backend(engine)
    model.backend = engine
    try:
        r = run_lmmrt(model, prompts, images, new_tokens)
    except Exception as e:
        _row(b, name, label, B, status="error", error=short_error(e))
        if model.device.type == "cuda":
            torch.cuda.empty_cache()
        return None, None
    row = _row(b, name, label, B, weights_gib=weights, **{k: v for k, v in r.items() if k != "tokens"},
               first_tokens=r["tokens"][0][:AGREE_STEPS])
    account_decode_bytes(b, row, model, B, new_tokens)
    return row, r["tokens"]


def _count_launches(b: BenchRun, name, model, hf_model, engine) -> None:
    """Per decode step at batch 1 (bench/profile_ops.py): aten ops, kernel launches and CUDA-graph
    launches of lmmrt's default path (one graph replay per step expected) and of transformers."""
    import lmmrt

    cfg, device = model.config, model.device
    prompts, images = make_workload(1, cfg.decoder.vocab_size, cfg.image_token_id, cfg.bos_token_id,
                                    cfg.vision.image_size, seed=1)
    inputs = hf_inputs(prompts, images, cfg.image_token_id, device, model.dtype)
    model.module.set_backend(engine)
    model.backend = engine

    def hf_n(n):
        with torch.inference_mode():
            return hf_model.generate(**inputs, max_new_tokens=n, do_sample=False, pad_token_id=0, eos_token_id=None)

    launches: dict[str, dict] = {}
    for label, fn in ((f"lmmrt[{engine}]", lambda n: lmmrt.generate(model, prompts, images, max_new_tokens=n,
                                                                     ignore_eos=True)), ("hf-eager", hf_n)):
        try:
            counts = profile_ops.per_decode_step(fn, cuda=True)
            launches[label] = counts
        except Exception as e:
            launches[label] = {"error": short_error(e)}
    b.extra["per_decode_step_batch1"] = launches
    b.notes.append(f"{name}, batch 1, per decode step: " + "; ".join(
        f"{k}: " + ", ".join(f"{n} {v:g}" for n, v in c.items()) if "error" not in c else f"{k}: {c['error']}"
        for k, c in launches.items()))
    b.save()


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
            account_decode_bytes(b, row, model, B, new_tokens)
        except Exception as e:
            _row(b, name, "lmmrt[auto]", B, status="error", error=short_error(e))
    del model


if __name__ == "__main__":
    import sys

    from bench.run import main

    sys.exit(main(["--only", "generate", *sys.argv[1:]]))
