"""End-to-end generation of Llama 3.2 Vision: lmmrt against transformers on Llama-3.2-11B-Vision
shapes, the same random weights on both sides.

The transformers model (MllamaForConditionalGeneration: tiled ViT-H/14 at 560 px, 4 tiles of
1601 tokens, 32 local + 8 global layers, features of 5 intermediate layers; LLaMA 3.1-8B-style
text model, 40 layers of which 8 cross-attention layers, GQA 32/8, llama3 RoPE) is built with
random weights directly on the device in bf16 by transformers itself (no download; its zero
tanh gates set to +-0.4..1.2, 1-d parameters perturbed, so every branch matters) and converted in
memory by lmmrt's own Mllama converter, so both engines run exactly the same weights. Workload per
row: one image of max_num_tiles tiles (a random 2x2-tile 1120x1120 picture) and a 64-token prompt
(the <|image|> marker, BOS, random text), greedy decoding of `new_tokens` tokens, EOS ignored.
Cases: batch 1, then batch 16, each lmmrt's default path (on CUDA: decode replayed as a CUDA graph)
then transformers `generate`; the JSON is rewritten after every case, so a run stopped at its cap
keeps its data. transformers gets the tiles lmmrt's image processor made (its own processor is
tested equal to them on the CPU), and its cross-attention mask from its processor's functions.

Measured per engine and batch (the method of bench/bench_generate.py):
- TTFT: call start -> first token; lmmrt's includes tiling the image on the device, transformers'
  starts from the tiles (its processor's time is not counted);
- decode tokens/s = batch * steps / decode time, ms/step (steps after the first token);
- achieved GB/s = bytes one decode step must read / step time (decoder and cross-attention weights,
  B embedding rows, the KV cache at the mean cache length of the timed steps, every image's valid
  cross-attention keys and values), the same formula for both engines, and its fraction of the
  copy ceiling measured in the same run;
- peak memory: the allocator's peak during the call above what was allocated before it, plus the
  engine's weights;
- agreement: lmmrt's greedy tokens against transformers' for the first steps of every row
  (reported, never asserted: bf16 rounding differs between the engines).

    python -m bench.bench_mllama [--smoke] [--out DIR] [--budget-s S]
"""

from __future__ import annotations

import gc
import tempfile
import time
import warnings
from pathlib import Path
from unittest import mock

import numpy as np
import torch

from bench.harness import BenchRun, short_error
from bench.idefics_engines import FIRST_TEXT_ID, PROMPT_LEN, run_hf, run_lmmrt, run_lmmrt_and_hf, weights_gib

BATCHES, SMOKE_BATCHES = (1, 16), (1, 2)
NEW_TOKENS, SMOKE_NEW_TOKENS = 32, 6
AGREE_STEPS = 8

MLLAMA_11B = dict(  # meta-llama/Llama-3.2-11B-Vision(-Instruct)
    vision_config=dict(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_global_layers=8,
                       attention_heads=16, image_size=560, patch_size=14, max_num_tiles=4,
                       intermediate_layers_indices=[3, 7, 15, 23, 30], vision_output_dim=7680, norm_eps=1e-5,
                       supported_aspect_ratios=[[1, 1], [1, 2], [1, 3], [1, 4], [2, 1], [2, 2], [3, 1], [4, 1]]),
    text_config=dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=40,
                     num_attention_heads=32, num_key_value_heads=8, rms_norm_eps=1e-5,
                     max_position_embeddings=131072, cross_attention_layers=[3, 8, 13, 18, 23, 28, 33, 38],
                     rope_parameters=dict(rope_type="llama3", rope_theta=500000.0, factor=8.0, low_freq_factor=1.0,
                                          high_freq_factor=4.0, original_max_position_embeddings=8192),
                     bos_token_id=128000, eos_token_id=128001, pad_token_id=128004, tie_word_embeddings=False),
    image_token_index=128256)
MLLAMA_TINY = dict(
    vision_config=dict(MLLAMA_11B["vision_config"], hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                       num_global_layers=2, attention_heads=4, image_size=28, patch_size=7, max_num_tiles=2,
                       intermediate_layers_indices=[0, 2], vision_output_dim=96,
                       supported_aspect_ratios=[[1, 1], [1, 2], [2, 1]]),
    text_config=dict(MLLAMA_11B["text_config"], vocab_size=128, hidden_size=64, intermediate_size=112,
                     num_hidden_layers=5, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                     cross_attention_layers=[1, 3], bos_token_id=1, eos_token_id=2, pad_token_id=0,
                     rope_parameters=dict(MLLAMA_11B["text_config"]["rope_parameters"],
                                          original_max_position_embeddings=64)),
    image_token_index=126)

FORMULAS = {
    "bytes_per_step": "decoder + cross-attention weights (B embedding rows) + 2*layers*B*kv_heads*kv_len*head_dim*e "
                      "+ 2*xattn_layers*B*valid_keys*kv_heads*head_dim*e, kv_len = prompt + mean new-token count "
                      "of the timed steps, valid_keys = tiles * (patches + 1)",
    "decode_tok_s": "batch * decode steps / decode seconds (steps after the first token)",
    "ttft": "generate call -> first token, vision encoder included (lmmrt: image tiling on the device too)",
}


# ---------------------------------------------------------------------------------------------
# models
# ---------------------------------------------------------------------------------------------


def build_hf(spec: dict, device: torch.device, dtype: torch.dtype, seed: int = 0):
    """MllamaForConditionalGeneration with random weights, built directly on `device` in `dtype`.
    transformers initialises every tanh gate to 0 (the cross-attention layers would be skipped in
    effect), norms to 1 and biases to 0: gates set to +-0.4..1.2, 1-d parameters perturbed."""
    from transformers import MllamaConfig, MllamaForConditionalGeneration

    torch.manual_seed(seed)
    prev = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = MllamaForConditionalGeneration(MllamaConfig(**spec))
    finally:
        torch.set_default_dtype(prev)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("gate", "gate_attn", "gate_ffn")):
                mag = 0.4 + 0.8 * torch.rand(p.shape, generator=g)
                p.copy_(torch.where(torch.rand(p.shape, generator=g) < 0.5, -mag, mag).to(p))
            elif p.dim() == 1:
                p.add_((0.05 * torch.randn(p.shape, generator=g)).to(p))
    return model.to(dtype).eval()


def lmmrt_from_hf(hf_model, backend: str = "auto"):
    """Convert with the converter's own reader (mllama_source): only config.json goes to a temporary
    directory; the weights are the transformers model's tensors, read in place (SourceWeights.open
    answers with them), so no gigabytes pass through a disk. The lmmrt module is built on the meta
    device and takes the converted tensors as they are (load_state_dict(assign=True))."""
    from lmmrt.api import Model
    from lmmrt.convert.common import SourceWeights
    from lmmrt.convert.mllama_files import mllama_source
    from lmmrt.models.splice import build_model

    weights = SourceWeights.from_state_dict(hf_model.state_dict())
    with tempfile.TemporaryDirectory() as d, mock.patch.object(SourceWeights, "open", staticmethod(lambda src: weights)), \
            warnings.catch_warnings():
        warnings.simplefilter("ignore")  # no tokenizer.json here: token-id prompts only, as intended
        hf_model.config.to_json_file(Path(d) / "config.json")
        cfg, state = mllama_source(d, progress=False)[:2]
    param = next(hf_model.parameters())
    state = {k: v.to(device=param.device, dtype=param.dtype) for k, v in state.items()}
    with torch.device("meta"):
        module = build_model(cfg)
    module.load_state_dict(state, assign=True)
    return Model(module, cfg, None, backend=backend, path="<mllama converted in memory>")


def workload(model, B: int):
    """(lmmrt prompts, images, transformers inputs) for B rows of one max_num_tiles-tile image each."""
    from transformers.models.mllama.processing_mllama import (
        convert_sparse_cross_attention_mask_to_dense,
        get_cross_attention_token_mask,
    )

    from lmmrt.models.config import MLLAMA_EXTRA_EMBEDDINGS
    from lmmrt.runtime.mllama_image import preprocess_mllama_images

    cfg, device = model.config, model.device
    vc = cfg.vision
    rows, cols = max(((r, c) for r, c in vc.supported_aspect_ratios), key=lambda rc: (rc[0] * rc[1], rc[0] == rc[1]))
    rng = np.random.default_rng(B)
    g = torch.Generator().manual_seed(B)
    vocab = cfg.decoder.vocab_size - MLLAMA_EXTRA_EMBEDDINGS  # text tokens only, not the embedding's extra rows
    prompts, images = [], []
    for _ in range(B):
        text = torch.randint(FIRST_TEXT_ID, min(vocab - 3, 32000), (PROMPT_LEN - 2,), generator=g).tolist()
        prompts.append([cfg.image_token_id, cfg.bos_token_id, *text])
        images.append([(rng.random((rows * vc.image_size, cols * vc.image_size, 3)) * 255).astype(np.uint8)])
    px = preprocess_mllama_images([per[0] for per in images], vc, device, where="images")
    mask = convert_sparse_cross_attention_mask_to_dense(
        [get_cross_attention_token_mask(p, cfg.image_token_id) for p in prompts], [[n] for n in px.num_tiles],
        vc.max_num_tiles, PROMPT_LEN)
    ids = torch.tensor(prompts, device=device)
    inputs = dict(input_ids=ids, attention_mask=torch.ones_like(ids),
                  pixel_values=px.pixels[:, None].to(model.dtype), aspect_ratio_ids=px.aspect_ratio_ids[:, None],
                  aspect_ratio_mask=px.aspect_ratio_mask[:, None],
                  cross_attention_mask=torch.from_numpy(mask).to(device))
    return prompts, images, inputs, px.num_tiles[0] * vc.tile_tokens


def decode_step_bytes(model, B: int, kv_len: float, media_keys: int) -> float:
    """Bytes one decode step must read: see FORMULAS["bytes_per_step"]."""
    cfg, module = model.config, model.module
    e = torch.tensor([], dtype=module.dtype).element_size()
    w = 0
    for name, p in module.named_parameters():
        if name.startswith("decoder.embed."):
            w += B * p.shape[1]
        elif name.startswith("decoder.") or (name.startswith("xattn.") and ".wkv." not in name
                                             and ".k_norm." not in name):
            w += p.numel()
    dc, xc = cfg.decoder, cfg.xattn
    kv = 2 * dc.layers * B * dc.kv_heads * kv_len * dc.head_dim
    media = 2 * len(xc.layers) * B * media_keys * xc.kv_heads * xc.head_dim
    return float(e) * (w + kv + media)


# ---------------------------------------------------------------------------------------------
# the benchmark
# ---------------------------------------------------------------------------------------------


def run(*, device: torch.device, dtype: torch.dtype, out_dir: Path, smoke: bool, budget_s: float,
        ceilings: dict | None = None, use_compile: bool = True) -> dict:
    """bench.run's entry point (use_compile does not apply: no torch.compile baseline here)."""
    del use_compile
    b = BenchRun("mllama", device=device, dtype=dtype, smoke=smoke, out_dir=out_dir, budget_s=budget_s,
                 ceilings=ceilings, formulas=FORMULAS, description=__doc__.split("\n\n")[0])
    name, spec = ("mllama-tiny", MLLAMA_TINY) if smoke else ("llama-3.2-11b-vision", MLLAMA_11B)
    new_tokens = SMOKE_NEW_TOKENS if smoke else NEW_TOKENS
    t = time.perf_counter()
    try:
        hf_model = build_hf(spec, device, dtype)
        model = lmmrt_from_hf(hf_model)
    except Exception as e:
        b.notes.append(f"{name}: could not be built: {short_error(e)}")
        return b.finish("error")
    b.notes.append(f"{name}: built transformers model + converted to lmmrt in {time.perf_counter() - t:.1f}s; "
                   f"attention implementation of transformers: {getattr(hf_model.config, '_attn_implementation', '?')}; "
                   f"lmmrt cuda_graph={model.cuda_graph!r} (its default)")
    b.save()
    hf_w, lm_w = weights_gib(hf_model), weights_gib(model.module)
    for B in SMOKE_BATCHES if smoke else BATCHES:
        _pair(b, name, hf_model, model, hf_w, lm_w, B, new_tokens)
    del hf_model, model
    gc.collect()
    return b.finish("ok")


def _row(b: BenchRun, name: str, engine: str, B: int, **kw) -> dict:
    row = {"bench": "mllama", "group": name, "case": f"{name} B={B}", "engine": engine, "batch": B,
           "dtype": str(b.dtype).replace("torch.", ""), "status": "ok", **kw}
    b.rows.append(row)
    b.save()
    return row


def _pair(b: BenchRun, name: str, hf_model, model, hf_w: float, lm_w: float, B: int, new_tokens: int) -> None:
    """lmmrt's default path, then transformers generate, on the same B rows; then their agreement."""
    try:
        prompts, images, inputs, media_keys = workload(model, B)
    except Exception as e:
        _row(b, name, "lmmrt[auto]", B, status="error", error=f"workload: {short_error(e)}")
        return
    weights = {"lmmrt[auto]": lm_w, "hf": hf_w}

    def measure(engine: str, r: dict) -> dict:
        peak = r.get("peak_extra_gib")
        nbytes = decode_step_bytes(model, B, PROMPT_LEN + (1 + new_tokens) / 2, media_keys)
        gbps = nbytes / (r["ms_per_step"] * 1e-3) / 1e9 if r.get("ms_per_step") else None
        w = weights[engine]
        return _row(b, name, engine, B, prompt_tokens=PROMPT_LEN, media_keys=media_keys, weights_gib=w,
                    peak_gib=w + peak if peak is not None else None, bytes_per_step=nbytes, gbps=gbps,
                    roofline_frac=gbps / b.ceilings["copy_gbps"] if gbps else None,
                    first_tokens=r["tokens"][0][:AGREE_STEPS], **{k: v for k, v in r.items() if k != "tokens"})

    run_lmmrt_and_hf(b, (("lmmrt[auto]", lambda: run_lmmrt(model, prompts, images, new_tokens)),
                         ("hf", lambda: run_hf(hf_model, inputs, new_tokens, model.device))),
                     row=lambda engine, **kw: _row(b, name, engine, B, **kw), measure=measure,
                     device=model.device, steps=min(AGREE_STEPS, new_tokens))

if __name__ == "__main__":
    import sys

    from bench.run import main

    sys.exit(main(["--only", "mllama", *sys.argv[1:]]))
