"""End-to-end generation of the splice models: lmmrt against transformers on LLaVA-1.5-7B and
BLIP-2-OPT-2.7B shapes, the same random weights on both sides.

The transformers models (LlavaForConditionalGeneration: CLIP ViT-L/14 at 336 px, 576 feature
tokens from the penultimate layer, GELU projector, LLaMA-7B 32 x 4096; Blip2ForConditionalGeneration:
EVA ViT-g/14 39 x 1408 at 224 px, Q-Former 12 x 768 with 32 queries, OPT-2.7B 32 x 2560) are built
with random weights directly on the device in bf16 by transformers itself (no download; 1-d
parameters perturbed so norms and biases matter) and converted in memory by lmmrt's own LLaVA /
BLIP-2 converters, so both engines run exactly the same weights. One model per family is built
and kept for all its cases. Workload per row: 1 image + a 64-token prompt (LLaVA: BOS, the image
marker, random text; BLIP-2: the marker first, then BOS and random text), the marker expanded to
the feature count in transformers' input_ids as its processors do, greedy decoding of
`new_tokens` tokens, EOS ignored. Cases run batch 1 of both families first, then batch 16, each
case lmmrt's default path (on CUDA: decode replayed as a CUDA graph) then transformers
`generate`; the JSON is rewritten after every case, so a run stopped at its cap keeps its data.

Measured per engine, family and batch (the method of bench/bench_generate.py):
- TTFT: call start -> first token (vision tower, connector, prompt forward, first sampling);
- decode tokens/s = batch * steps / decode time, ms/step (steps after the first token);
- achieved GB/s = bytes one decode step must read / step time, bytes/step = decoder weights
  (all layers, final norm, LM head; B rows of the embedding) + KV cache at the mean cache length
  of the timed steps (prompt positions = text + feature tokens), the same formula for both
  engines, and its fraction of the copy ceiling measured in the same run;
- peak memory: the allocator's peak during the call above what was allocated before it, plus
  the engine's weights;
- agreement: lmmrt's greedy tokens against transformers' for the first steps of every row
  (reported, never asserted: bf16 rounding differs between the engines and random weights give
  near-ties).

    python -m bench.bench_splice_generate [--smoke] [--out DIR] [--budget-s S]
"""

from __future__ import annotations

import gc
import tempfile
import time
from pathlib import Path
from unittest import mock

import torch

from bench.harness import BenchRun, short_error
from bench.idefics_engines import (
    PROMPT_LEN,
    decode_step_bytes,
    make_workload,
    run_hf,
    run_lmmrt,
    run_lmmrt_and_hf,
    weights_gib,
)

BATCHES, SMOKE_BATCHES = (1, 16), (1, 2)
NEW_TOKENS, SMOKE_NEW_TOKENS = 32, 6
AGREE_STEPS = 8

LLAVA_7B = dict(  # llava-hf/llava-1.5-7b-hf
    vision_config=dict(model_type="clip_vision_model", hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                       num_attention_heads=16, image_size=336, patch_size=14, hidden_act="quick_gelu",
                       projection_dim=768),
    text_config=dict(model_type="llama", vocab_size=32064, hidden_size=4096, intermediate_size=11008,
                     num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=4096,
                     rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2, pad_token_id=0, tie_word_embeddings=False),
    image_token_id=32000, vision_feature_layer=-2, vision_feature_select_strategy="default",
    projector_hidden_act="gelu", pad_token_id=0)
LLAVA_TINY = dict(
    LLAVA_7B,
    vision_config=dict(LLAVA_7B["vision_config"], hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                       num_attention_heads=4, image_size=28, patch_size=7, projection_dim=16),
    text_config=dict(LLAVA_7B["text_config"], vocab_size=128, hidden_size=64, intermediate_size=112,
                     num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256),
    image_token_id=126)
BLIP2_OPT_2_7B = dict(  # Salesforce/blip2-opt-2.7b
    vision_config=dict(hidden_size=1408, intermediate_size=6144, num_hidden_layers=39, num_attention_heads=16,
                       image_size=224, patch_size=14, layer_norm_eps=1e-6),
    qformer_config=dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072,
                        cross_attention_frequency=2, encoder_hidden_size=1408, vocab_size=30522),
    text_config=dict(model_type="opt", vocab_size=50272, hidden_size=2560, ffn_dim=10240, num_hidden_layers=32,
                     num_attention_heads=32, max_position_embeddings=2048, bos_token_id=2, eos_token_id=50118,
                     pad_token_id=1, activation_function="relu", do_layer_norm_before=True, word_embed_proj_dim=2560),
    num_query_tokens=32, image_token_index=50265)
BLIP2_TINY = dict(
    BLIP2_OPT_2_7B,
    vision_config=dict(BLIP2_OPT_2_7B["vision_config"], hidden_size=40, intermediate_size=56, num_hidden_layers=2,
                       num_attention_heads=4, image_size=28, patch_size=7),
    qformer_config=dict(BLIP2_OPT_2_7B["qformer_config"], hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=44, encoder_hidden_size=40, vocab_size=50),
    text_config=dict(BLIP2_OPT_2_7B["text_config"], vocab_size=128, hidden_size=48, ffn_dim=72, num_hidden_layers=2,
                     num_attention_heads=4, max_position_embeddings=256, eos_token_id=2, word_embed_proj_dim=48),
    num_query_tokens=5, image_token_index=126)

FORMULAS = {
    "bytes_per_step": "decoder weights (B embedding rows) + 2*layers*B*kv_heads*kv_len*head_dim*e, kv_len = prompt "
                      "positions (text + feature tokens) + mean new-token count of the timed steps",
    "decode_tok_s": "batch * decode steps / decode seconds (steps after the first token)",
    "ttft": "generate call -> first token, vision tower and connector included",
}


# ---------------------------------------------------------------------------------------------
# models
# ---------------------------------------------------------------------------------------------


def build_hf(family: str, spec: dict, device: torch.device, dtype: torch.dtype, seed: int = 0):
    """The transformers model of `family` ("llava" | "blip2") with random weights, built directly
    on `device` in `dtype`; transformers initialises norms to 1 and biases to 0: perturbed."""
    import transformers

    names = {"llava": ("LlavaConfig", "LlavaForConditionalGeneration"),
             "blip2": ("Blip2Config", "Blip2ForConditionalGeneration")}[family]
    config_cls, model_cls = (getattr(transformers, n) for n in names)
    torch.manual_seed(seed)
    prev = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = model_cls(config_cls(**spec))
    finally:
        torch.set_default_dtype(prev)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for _, p in model.named_parameters():
            if p.dim() == 1:
                p.add_((0.05 * torch.randn(p.shape, generator=g)).to(p))
    return model.to(dtype).eval()


def lmmrt_from_hf(family: str, hf_model, backend: str = "auto"):
    """Convert with the converter's own reader (llava_state / blip2_state): only config.json goes
    to a temporary directory; the weights are the transformers model's tensors, read in place
    (SourceWeights.open answers with them), so no gigabytes pass through a disk."""
    from lmmrt.api import Model
    from lmmrt.convert.blip2 import blip2_state
    from lmmrt.convert.common import SourceWeights
    from lmmrt.convert.llava import llava_state
    from lmmrt.models.splice import build_model

    read_state = {"llava": llava_state, "blip2": blip2_state}[family]
    weights = SourceWeights.from_state_dict(hf_model.state_dict())
    with tempfile.TemporaryDirectory() as d, mock.patch.object(SourceWeights, "open", staticmethod(lambda src: weights)):
        hf_model.config.to_json_file(Path(d) / "config.json")
        cfg, state = read_state(d, progress=False)[:2]
    # tensors the converter makes itself (BLIP-2's zero biases where the source has none) are CPU float32
    param = next(hf_model.parameters())
    state = {k: v.to(device=param.device, dtype=param.dtype) for k, v in state.items()}
    with torch.device("meta"):
        module = build_model(cfg)
    module.load_state_dict(state, assign=True)
    return Model(module, cfg, None, backend=backend, path=f"<{family} converted in memory>")


def workload(model, B: int):
    """(lmmrt prompts, images, transformers inputs) for B rows of one image each; transformers'
    input_ids have the marker expanded to the feature count, as its processors write them."""
    cfg = model.config
    prompts, images = make_workload(B, cfg.decoder.vocab_size, cfg.image_token_id, cfg.bos_token_id,
                                    cfg.vision.image_size, seed=B)
    if cfg.family == "blip2":  # BLIP-2's prompt: the image features first, then BOS and the text
        prompts = [[p[1], p[0], *p[2:]] for p in prompts]
    n, image_id = cfg.media_tokens, cfg.image_token_id
    ids = torch.tensor([[t for x in p for t in ([x] * n if x == image_id else [x])] for p in prompts])
    device = model.device
    inputs = dict(input_ids=ids.to(device), attention_mask=torch.ones_like(ids).to(device),
                  pixel_values=torch.stack([per[0] for per in images]).to(device=device, dtype=model.dtype))
    return prompts, images, inputs


# ---------------------------------------------------------------------------------------------
# the benchmark
# ---------------------------------------------------------------------------------------------


def run(*, device: torch.device, dtype: torch.dtype, out_dir: Path, smoke: bool, budget_s: float,
        ceilings: dict | None = None, use_compile: bool = True) -> dict:
    """bench.run's entry point (use_compile does not apply: no torch.compile baseline here)."""
    del use_compile
    b = BenchRun("splice_generate", device=device, dtype=dtype, smoke=smoke, out_dir=out_dir, budget_s=budget_s,
                 ceilings=ceilings, formulas=FORMULAS, description=__doc__.split("\n\n")[0])
    specs = {"llava": ("llava-tiny", LLAVA_TINY) if smoke else ("llava-1.5-7b", LLAVA_7B),
             "blip2": ("blip2-tiny", BLIP2_TINY) if smoke else ("blip2-opt-2.7b", BLIP2_OPT_2_7B)}
    new_tokens = SMOKE_NEW_TOKENS if smoke else NEW_TOKENS
    built: dict[str, tuple | None] = {}
    status = "ok"
    # batch 1 of both families before batch 16: a run cut short by its cap still compares both
    for B in SMOKE_BATCHES if smoke else BATCHES:
        for family, (name, spec) in specs.items():
            if b.elapsed > b.budget_s:
                for engine in ("lmmrt[auto]", "hf"):
                    _row(b, name, engine, B, status="skipped", note="time budget spent")
                continue
            if family not in built:
                built[family] = _build(b, family, name, spec, device, dtype)
                status = "error" if built[family] is None else status
            if built[family] is not None:
                _pair(b, name, *built[family], B, new_tokens)
    built.clear()
    gc.collect()
    return b.finish(status)


def _build(b: BenchRun, family: str, name: str, spec: dict, device, dtype):
    """(transformers model, lmmrt model, their weights in GiB), or None with a note on failure."""
    t = time.perf_counter()
    try:
        hf_model = build_hf(family, spec, device, dtype)
        model = lmmrt_from_hf(family, hf_model)
    except Exception as e:
        b.notes.append(f"{name}: could not be built: {short_error(e)}")
        b.save()
        return None
    b.notes.append(f"{name}: built transformers model + converted to lmmrt in {time.perf_counter() - t:.1f}s; "
                   f"attention implementation of transformers: {getattr(hf_model.config, '_attn_implementation', '?')}; "
                   f"lmmrt cuda_graph={getattr(model, 'cuda_graph', None)!r} (its default)")
    b.save()
    return hf_model, model, weights_gib(hf_model), weights_gib(model.module)


def _row(b: BenchRun, name: str, engine: str, B: int, **kw) -> dict:
    row = {"bench": "splice_generate", "group": name, "case": f"{name} B={B}", "engine": engine, "batch": B,
           "dtype": str(b.dtype).replace("torch.", ""), "status": "ok", **kw}
    b.rows.append(row)
    b.save()
    return row


def _measured(b: BenchRun, name: str, engine: str, B: int, r: dict, model, weights: float,
              prompt_positions: int, new_tokens: int) -> dict:
    """A timed row: its numbers, peak memory with the weights, and the decode step's GB/s."""
    peak = r.get("peak_extra_gib")
    nbytes = decode_step_bytes(model, B, prompt_positions + (1 + new_tokens) / 2)
    gbps = nbytes / (r["ms_per_step"] * 1e-3) / 1e9 if r.get("ms_per_step") else None
    return _row(b, name, engine, B, prompt_tokens=PROMPT_LEN, prompt_positions=prompt_positions,
                weights_gib=weights, peak_gib=weights + peak if peak is not None else None,
                bytes_per_step=nbytes, gbps=gbps, roofline_frac=gbps / b.ceilings["copy_gbps"] if gbps else None,
                first_tokens=r["tokens"][0][:AGREE_STEPS], **{k: v for k, v in r.items() if k != "tokens"})


def _pair(b: BenchRun, name: str, hf_model, model, hf_w: float, lm_w: float, B: int, new_tokens: int) -> None:
    """lmmrt's default path, then transformers generate, on the same B rows; then their agreement."""
    prompts, images, inputs = workload(model, B)
    positions = inputs["input_ids"].shape[1]
    weights = {"lmmrt[auto]": lm_w, "hf": hf_w}
    run_lmmrt_and_hf(b, (("lmmrt[auto]", lambda: run_lmmrt(model, prompts, images, new_tokens)),
                         ("hf", lambda: run_hf(hf_model, inputs, new_tokens, model.device))),
                     row=lambda engine, **kw: _row(b, name, engine, B, **kw),
                     measure=lambda engine, r: _measured(b, name, engine, B, r, model, weights[engine], positions,
                                                         new_tokens),
                     device=model.device, steps=min(AGREE_STEPS, new_tokens))

if __name__ == "__main__":
    import sys

    from bench.run import main

    sys.exit(main(["--only", "splice_generate", *sys.argv[1:]]))
