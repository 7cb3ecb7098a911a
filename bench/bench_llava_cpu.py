"""CPU proxy for LLaVA: lmmrt against transformers' `generate` on a small LLaVA-1.5, side by side.

A small LLaVA — LLaMA 8 x 512 (8 heads, 2 KV heads, FFN 1376, vocab 32064), CLIP vision 4 x 256 at
224 px / 14 (256 feature tokens per image, penultimate layer, class token dropped), GELU projector —
in float32 with random weights, built by transformers and converted with `lmmrt convert llava`, so
both engines run the same weights. One CPU thread. Per batch (1, 4): every row one image and a
64-token prompt (the marker expanded to 256 feature positions on both sides), greedy, a fixed
number of new tokens with no EOS. Timed runs alternate lmmrt / transformers pair by pair; the
greedy tokens must be identical in every pair. Reported per batch: median decode tokens/s of each
engine and the median of the per-pair ratios.

    python -m bench.bench_llava_cpu [--pairs 3] [--new-tokens 32] [--out bench/results/llava-cpu.json] [--quick]
    python -m bench.run --only llava_cpu    # the same through bench.run: bench-llava_cpu.json and the report
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

import torch

from bench import idefics_engines as gen

VISION = dict(model_type="clip_vision_model", hidden_size=256, intermediate_size=1024, num_hidden_layers=4,
              num_attention_heads=4, image_size=224, patch_size=14, hidden_act="quick_gelu")
TEXT = dict(model_type="llama", vocab_size=32064, hidden_size=512, intermediate_size=1376, num_hidden_layers=8,
            num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=2048, bos_token_id=1,
            eos_token_id=2, pad_token_id=0, tie_word_embeddings=False)
IMAGE_ID = 32000  # llava-hf's <image>
BATCHES = (1, 4)
ENGINES = ("lmmrt", "transformers")  # the key prefixes of measure's results
# --quick / bench.run --smoke: a tiny LLaVA (16 feature tokens), 1 pair, 4 tokens, to prove the script runs
QUICK_VISION = dict(VISION, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                    image_size=28, patch_size=7)
QUICK_TEXT = dict(TEXT, hidden_size=64, intermediate_size=112, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2)


def build(seed: int = 0, *, quick: bool = False):
    """(transformers model, lmmrt model) with the same random weights; quick: the tiny shapes."""
    from transformers import LlavaConfig, LlavaForConditionalGeneration

    import lmmrt
    from lmmrt.convert.llava import convert_llava

    torch.manual_seed(seed)
    vision, text = (QUICK_VISION, QUICK_TEXT) if quick else (VISION, TEXT)
    cfg = LlavaConfig(vision_config=vision, text_config=text, image_token_id=IMAGE_ID, vision_feature_layer=-2,
                      vision_feature_select_strategy="default", pad_token_id=0)
    hf = LlavaForConditionalGeneration(cfg).eval()
    with torch.no_grad():  # transformers initialises norms to 1 and biases to 0: make them matter
        g = torch.Generator().manual_seed(seed + 1)
        for name, p in hf.named_parameters():
            if p.dim() == 1:
                p.add_(0.05 * torch.randn(p.shape, generator=g))
    with tempfile.TemporaryDirectory() as d:
        hf.save_pretrained(Path(d) / "src")
        convert_llava(Path(d) / "src", Path(d) / "out", progress=False)
        model = lmmrt.load(Path(d) / "out", device="cpu")
    return hf, model


def hf_inputs(prompts, images, n_features: int) -> dict:
    ids = torch.tensor([[t for x in p for t in ([x] * n_features if x == IMAGE_ID else [x])] for p in prompts])
    return dict(input_ids=ids, attention_mask=torch.ones_like(ids),
                pixel_values=torch.stack([per[0] for per in images]))


def measure(hf, model, B: int, *, pairs: int, new_tokens: int) -> dict:
    cfg = model.config
    prompts, images = gen.make_workload(B, cfg.decoder.vocab_size, IMAGE_ID, cfg.bos_token_id,
                                        cfg.vision.image_size, seed=B)
    inputs = hf_inputs(prompts, images, cfg.media_tokens)
    gen.run_lmmrt(model, prompts, images, new_tokens, warmup=False)  # warm-up
    gen.run_hf(hf, inputs, 2, torch.device("cpu"), warmup=False)
    lm, ref = [], []
    for _ in range(pairs):
        lm.append(gen.run_lmmrt(model, prompts, images, new_tokens, warmup=False))
        ref.append(gen.run_hf(hf, inputs, new_tokens, torch.device("cpu"), warmup=False))
        if lm[-1]["tokens"] != ref[-1]["tokens"]:
            raise AssertionError(f"greedy tokens differ at batch {B}")
    return {"batch": B, "prompt_positions": inputs["input_ids"].shape[1], "new_tokens": new_tokens, "pairs": pairs,
            "lmmrt_decode_tok_s": statistics.median(r["decode_tok_s"] for r in lm),
            "transformers_decode_tok_s": statistics.median(r["decode_tok_s"] for r in ref),
            "speedup_vs_hf": statistics.median(x["decode_tok_s"] / y["decode_tok_s"] for x, y in zip(lm, ref)),
            "lmmrt_ttft_ms": statistics.median(r["ttft_ms"] for r in lm),
            "transformers_ttft_ms": statistics.median(r["ttft_ms"] for r in ref), "tokens_equal": True}


def run(*, device: torch.device, dtype: torch.dtype, out_dir: Path, smoke: bool, budget_s: float,
        ceilings: dict | None = None, use_compile: bool = True) -> dict:
    """bench.run's entry point (device, dtype, ceilings and use_compile do not apply: always the CPU,
    float32, one thread, with CPU ceilings measured here). smoke: the --quick shapes and lengths.
    Per batch two rows (lmmrt, transformers) in bench_generate's row format; a token mismatch makes
    the batch's rows errors."""
    del device, dtype, ceilings, use_compile
    from bench.harness import BenchRun, short_error

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        b = BenchRun("llava_cpu", device=torch.device("cpu"), dtype=torch.float32, smoke=smoke, out_dir=out_dir,
                     budget_s=budget_s, description=__doc__.split("\n\n")[0])
        group = "llava-tiny" if smoke else "llava-cpu-proxy"
        hf, model = build(quick=smoke)
        for B in BATCHES:
            base = {"bench": "llava_cpu", "group": group, "case": f"{group} B={B}", "batch": B}
            if b.elapsed > b.budget_s:
                b.rows += [dict(base, engine=e, status="skipped", note="time budget spent") for e in ENGINES]
            else:
                try:
                    r = measure(hf, model, B, pairs=1 if smoke else 3, new_tokens=4 if smoke else 32)
                    b.rows += [dict(base, engine=e, status="ok", ttft_ms=r[f"{e}_ttft_ms"],
                                    decode_tok_s=r[f"{e}_decode_tok_s"], pairs=r["pairs"], new_tokens=r["new_tokens"],
                                    prompt_positions=r["prompt_positions"], tokens_equal=True) for e in ENGINES]
                    b.rows[-2]["speedup_vs_hf"] = r["speedup_vs_hf"]
                except Exception as e:
                    b.rows += [dict(base, engine=name, status="error", error=short_error(e)) for name in ENGINES]
            b.save()
        return b.finish()
    finally:
        torch.set_num_threads(threads)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--pairs", type=int, default=3)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--out", type=Path, default=None, help="write the rows as JSON here")
    ap.add_argument("--quick", action="store_true", help="a tiny LLaVA (proves the script runs; not a measurement)")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    hf, model = build(quick=args.quick)
    rows = []
    for B in BATCHES:
        row = measure(hf, model, B, pairs=args.pairs, new_tokens=args.new_tokens)
        rows.append(row)
        print(f"B={B}: lmmrt {row['lmmrt_decode_tok_s']:.1f} tok/s, transformers "
              f"{row['transformers_decode_tok_s']:.1f} tok/s, x{row['speedup_vs_hf']:.2f} (median of pairs); TTFT "
              f"{row['lmmrt_ttft_ms']:.0f} vs {row['transformers_ttft_ms']:.0f} ms", file=sys.stderr, flush=True)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(rows, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
