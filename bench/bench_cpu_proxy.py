"""CPU proxy of the decode engine: lmmrt against transformers' `generate` on a small IDEFICS, side by side.

A small IDEFICS — text 8 x 512 (8 heads, FFN 1376, 32k vocab), a gated cross-attention block every
2nd layer (4 blocks), vision 4 x 256 at 224 px / 14, perceiver 2 x 4 x 64 with 64 latents — in
float32 with random weights and non-zero gates, built by transformers and converted in memory
(bench/idefics_engines.py), so both engines run the same weights. One CPU
thread. Per batch (1, 4, 16): every row one image + a 64-token prompt, greedy, a fixed number of
new tokens with EOS ignored (transformers gets no EOS at all, so neither side masks it). After a
warm-up of each engine the timed runs alternate pair by pair (lmmrt, transformers, lmmrt, ...) so
load from other processes hits both sides alike. Reported per batch: the medians of decode
tokens/s and TTFT per engine, and the median over pairs of the per-pair ratio. The greedy tokens
of the two engines must be identical (checked every pair; a mismatch fails the case). Also: aten
ops per decode step (bench/profile_ops.py) for lmmrt's eager step, its fixed-shape step and
transformers, at batch 1.

    python -m bench.bench_cpu_proxy [--quick] [--out bench/results] [--name cpu-proxy-<commit>]

writes <out>/<name>.json, .md and .png. `--quick` (tiny model, 1 pair, 4 tokens) is the CI smoke
run. Registered in bench/run.py as `cpu_proxy` (always on the CPU, whatever --device says).
"""

from __future__ import annotations

import argparse
import gc
import os
import statistics
import sys
from pathlib import Path

import torch

from bench import idefics_engines as gen
from bench import profile_ops, report
from bench.harness import REPO, BenchRun, short_error

PROXY = dict(
    gen.IDEFICS_9B, hidden_size=512, intermediate_size=1376, num_hidden_layers=8, num_attention_heads=8,
    cross_layer_interval=2,
    vision_config=dict(embed_dim=256, image_size=224, patch_size=14, num_hidden_layers=4, num_attention_heads=4,
                       intermediate_size=1024, hidden_act="gelu"),
    perceiver_config=dict(use_resampler=True, resampler_n_latents=64, resampler_depth=2, resampler_n_heads=4,
                          resampler_head_dim=64, qk_layer_norms_perceiver=False),
)
BATCHES = (1, 4, 16)
PAIRS, QUICK_PAIRS = 3, 1
NEW_TOKENS, QUICK_NEW_TOKENS = 32, 4
OPS_N1, OPS_N2 = 2, 6  # generate lengths whose difference gives ops per decode step
TIMING_GROUP, OPS_GROUP = "idefics-proxy", "aten ops per decode step"
HF, LMMRT = "transformers", "lmmrt"

FORMULAS = {
    "decode_tok_s": "batch * decode steps / decode seconds (steps after the first token); median over pairs",
    "x transformers": "median over pairs of lmmrt decode tok/s / transformers decode tok/s (same pair)",
    "x transformers, best runs": "lmmrt's best decode tok/s of all pairs / transformers' best",
    "ttft": "generate call -> first token (media encoding included); median over pairs",
    "aten ops per step": "(aten:: events in a generate of 6 new tokens - in one of 2) / 4, torch.profiler, batch 1",
}


def _load() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def first_mismatch(a: list[list[int]], b: list[list[int]]) -> str | None:
    """None when every row of a equals b's, else where they first differ."""
    if len(a) != len(b):
        return f"{len(a)} rows vs {len(b)}"
    for r, (x, y) in enumerate(zip(a, b)):
        if x != y:
            s = next((i for i, (p, q) in enumerate(zip(x, y)) if p != q), min(len(x), len(y)))
            return f"row {r} differs first at step {s}: lmmrt {x[s:s + 4]} vs transformers {y[s:s + 4]}"
    return None


def _measure_batch(b: BenchRun, hf_model, model, B: int, *, pairs: int, new_tokens: int) -> None:
    cfg, cpu = model.config, torch.device("cpu")
    prompts, images = gen.make_workload(B, cfg.decoder.vocab_size, cfg.image_token_id, cfg.bos_token_id,
                                    cfg.vision.image_size, seed=B)
    inputs = gen.hf_inputs(prompts, images, cfg.image_token_id, cpu, torch.float32)
    gen.run_lmmrt(model, prompts, images, new_tokens, warmup=False)  # warm-up: caches sized, lazy init
    gen.run_hf(hf_model, inputs, 2, cpu, warmup=False)
    lm, hf, loads = [], [], []
    for _ in range(pairs):
        loads.append(_load())
        lm.append(gen.run_lmmrt(model, prompts, images, new_tokens, warmup=False))
        hf.append(gen.run_hf(hf_model, inputs, new_tokens, cpu, warmup=False))
        bad = first_mismatch(lm[-1]["tokens"], hf[-1]["tokens"])
        if bad is not None:
            raise AssertionError(f"greedy tokens differ at batch {B}: {bad}")
    rows = {}
    for engine, runs in ((LMMRT, lm), (HF, hf)):
        med = {k: statistics.median(r[k] for r in runs) for k in ("ttft_ms", "decode_tok_s", "ms_per_step")}
        rows[engine] = row = {"bench": "cpu_proxy", "group": TIMING_GROUP, "case": f"B={B}", "engine": engine,
                              "batch": B, "prompt_tokens": gen.PROMPT_LEN, "new_tokens": new_tokens, "pairs": pairs,
                              "dtype": "float32", "threads": torch.get_num_threads(), "status": "ok", **med,
                              "decode_tok_s_runs": [r["decode_tok_s"] for r in runs],
                              "ttft_ms_runs": [r["ttft_ms"] for r in runs]}
        gen.account_decode_bytes(b, row, model, B, new_tokens)
    ratios = [x["decode_tok_s"] / y["decode_tok_s"] for x, y in zip(lm, hf)]
    # A second estimator, robust to load that hit one side of a pair: the best run of each engine.
    rows[LMMRT].update(speedup_vs_hf=statistics.median(ratios), speedup_runs=ratios,
                       speedup_best_vs_hf=max(x["decode_tok_s"] for x in lm) / max(y["decode_tok_s"] for y in hf),
                       ttft_speedup_vs_hf=statistics.median(y["ttft_ms"] / x["ttft_ms"] for x, y in zip(lm, hf)),
                       tokens_equal=True, load_avg_runs=loads)
    b.rows += [rows[LMMRT], rows[HF]]
    b.save()
    print(f"  [cpu_proxy {b.elapsed:.0f}/{b.budget_s:.0f} s] B={B}: lmmrt {rows[LMMRT]['decode_tok_s']:.1f} tok/s, "
          f"transformers {rows[HF]['decode_tok_s']:.1f} tok/s, x{rows[LMMRT]['speedup_vs_hf']:.2f}; TTFT "
          f"{rows[LMMRT]['ttft_ms']:.0f} vs {rows[HF]['ttft_ms']:.0f} ms; load {loads[-1]}", file=sys.stderr, flush=True)


def _count_ops(b: BenchRun, hf_model, model) -> None:
    """aten ops per decode step at batch 1: lmmrt eager, lmmrt's fixed-shape step, transformers."""
    import lmmrt

    cfg, cpu = model.config, torch.device("cpu")
    prompts, images = gen.make_workload(1, cfg.decoder.vocab_size, cfg.image_token_id, cfg.bos_token_id,
                                    cfg.vision.image_size, seed=1)
    inputs = gen.hf_inputs(prompts, images, cfg.image_token_id, cpu, torch.float32)

    def lmmrt_n(n):
        return lmmrt.generate(model, prompts, images, max_new_tokens=n, ignore_eos=True)

    def hf_n(n):
        with torch.inference_mode():
            return hf_model.generate(**inputs, max_new_tokens=n, do_sample=False, pad_token_id=0, eos_token_id=None)

    # cuda_graph=True on the CPU runs the fixed-shape step eagerly (no graph): the step a GPU captures.
    saved = model.cuda_graph
    for engine, fn, graph_flag in (("lmmrt eager step", lmmrt_n, False), ("lmmrt fixed-shape step", lmmrt_n, True),
                                   (HF, hf_n, saved)):
        row = {"bench": "cpu_proxy", "group": OPS_GROUP, "case": "B=1", "engine": engine, "batch": 1, "status": "ok"}
        try:
            model.cuda_graph = graph_flag
            counts = profile_ops.per_decode_step(fn, n1=OPS_N1, n2=OPS_N2)
            row.update(aten_per_step=counts["aten"], aten_top_per_step=counts["aten_top"])
        except Exception as e:
            row.update(status="error", error=short_error(e))
        finally:
            model.cuda_graph = saved
        b.rows.append(row)
        b.save()


def run(*, device: torch.device, dtype: torch.dtype, out_dir: Path, smoke: bool, budget_s: float,
        ceilings: dict | None = None, use_compile: bool = True, file_stem: str | None = None,
        pairs: int | None = None, new_tokens: int | None = None, batches=BATCHES) -> dict:
    """bench.run's entry point (device, dtype and ceilings are ignored: always the CPU, float32,
    one thread, with CPU ceilings measured here). smoke = the quick mode."""
    del device, dtype, ceilings, use_compile
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _run(out_dir=out_dir, quick=smoke, budget_s=budget_s, file_stem=file_stem,
                    pairs=pairs or (QUICK_PAIRS if smoke else PAIRS),
                    new_tokens=new_tokens or (QUICK_NEW_TOKENS if smoke else NEW_TOKENS), batches=batches)
    finally:
        torch.set_num_threads(threads)


def _run(*, out_dir, quick, budget_s, file_stem, pairs, new_tokens, batches) -> dict:
    import transformers

    import lmmrt

    cpu = torch.device("cpu")
    b = BenchRun("cpu_proxy", device=cpu, dtype=torch.float32, smoke=quick, out_dir=out_dir, budget_s=budget_s,
                 formulas=FORMULAS, description=__doc__.split("\n\n")[0], file_stem=file_stem)
    b.key["transformers"] = transformers.__version__
    b.key["lmmrt_path"] = str(Path(lmmrt.__file__).parent)  # which tree was measured
    b.key["threads"] = torch.get_num_threads()
    b.notes.append(f"load average (1, 5, 15 min) at start: {_load()} on {os.cpu_count()} cores")
    hf_model = gen.build_hf_idefics(gen.IDEFICS_TINY if quick else PROXY, cpu, torch.float32)
    model = gen.lmmrt_from_hf(hf_model)
    c = model.config
    b.notes.append(f"{'idefics-tiny' if quick else 'idefics-proxy'}: text {c.decoder.layers} x {c.decoder.dim}, "
                   f"vocab {c.decoder.vocab_size}, {len(c.xattn.layers)} cross-attention blocks, vision "
                   f"{c.vision.layers} x {c.vision.width}; transformers attention "
                   f"{getattr(hf_model.config, '_attn_implementation', '?')}; lmmrt backend {model.backend}, "
                   f"cuda_graph={model.cuda_graph!r}")
    status = "ok"
    for B in batches:
        if b.elapsed > b.budget_s:
            b.rows.append({"bench": "cpu_proxy", "group": TIMING_GROUP, "case": f"B={B}", "engine": LMMRT,
                           "batch": B, "status": "skipped", "note": "time budget spent"})
            continue
        try:
            _measure_batch(b, hf_model, model, B, pairs=pairs, new_tokens=new_tokens)
        except Exception as e:
            status = "error"
            b.rows.append({"bench": "cpu_proxy", "group": TIMING_GROUP, "case": f"B={B}", "engine": LMMRT,
                           "batch": B, "status": "error", "error": short_error(e, 600)})
            b.save()
    _count_ops(b, hf_model, model)
    if any(r["status"] == "error" for r in b.rows):
        status = "error"
    b.notes.append(f"load average at end: {_load()}")
    del hf_model, model
    gc.collect()
    return b.finish(status)


def write_report(data: dict, out_dir: Path, name: str) -> list[Path]:
    """<name>.md (+ <name>.png) beside <name>.json."""
    timing = [r for r in data["rows"] if r.get("group") == TIMING_GROUP]
    return report.write_bench_report("cpu_proxy", data, out_dir, name,
                                     lambda png: report.plot_generate(timing, data["key"], png, title="CPU proxy, one thread"))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.bench_cpu_proxy", description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="tiny model, 1 pair, 4 tokens (CI smoke run)")
    ap.add_argument("--out", default=str(REPO / "bench" / "results"), help="output directory (default bench/results)")
    ap.add_argument("--name", help="file name stem (default cpu-proxy-<commit>, cpu-proxy-quick-<commit> with --quick)")
    ap.add_argument("--pairs", type=int, help=f"timed (lmmrt, transformers) pairs per batch (default {PAIRS})")
    ap.add_argument("--new-tokens", type=int, help=f"new tokens per generate (default {NEW_TOKENS})")
    ap.add_argument("--batches", default=",".join(map(str, BATCHES)), help="comma-separated batch sizes")
    ap.add_argument("--budget-s", type=float, default=1800.0, help="stop starting new batches after this long")
    args = ap.parse_args(argv)
    try:
        batches = [int(x) for x in args.batches.split(",") if x.strip()]
    except ValueError:
        ap.error(f"--batches must be comma-separated integers, got {args.batches!r}")
    if not batches or min(batches) < 1 or (args.pairs is not None and args.pairs < 1) \
            or (args.new_tokens is not None and args.new_tokens < 2):
        ap.error("need batches >= 1, --pairs >= 1 and --new-tokens >= 2")
    from bench.harness import run_key

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    name = args.name or (f"cpu-proxy{'-quick' if args.quick else ''}-"
                         f"{run_key(torch.device('cpu'), smoke=args.quick)['git_commit'][:12]}")
    data = run(device=torch.device("cpu"), dtype=torch.float32, out_dir=out, smoke=args.quick,
               budget_s=args.budget_s, file_stem=name, pairs=args.pairs, new_tokens=args.new_tokens,
               batches=tuple(batches))
    for p in write_report(data, out, name):
        print(f"wrote {p}")
    print((out / f"{name}.md").read_text())
    return 0 if data["status"] == "ok" else 1


if __name__ == "__main__":
    sys.exit(main())
