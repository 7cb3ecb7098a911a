"""Run the benchmarks and write JSON + a markdown table + plots.

    python -m bench.run [--smoke] [--out DIR] [--only perceiver,xattn,decode_attention,generate,splice_generate,mllama,
                        cpu_proxy,llava_cpu,cpu_compile] [--no-compile]
                        [--budget-s SECONDS] [--merge-only]

--smoke: tiny shapes on the CPU (torch backend and baselines only), for CI and `make bench`.
Without --smoke: real model shapes on the GPU (bf16). --out defaults to $OUT when set, else
bench/results/<gpu-or-cpu>-<date>/. Each benchmark is isolated: one that fails is recorded as
such and the others still run; the report merges whatever bench-*.json files the directory holds.
cpu_proxy and llava_cpu (lmmrt vs transformers on a small IDEFICS / LLaVA, one CPU thread) and cpu_compile
(torch.compile of the fixed-shape decode step against the eager steps) always run on the CPU: they are in
the default set of --smoke runs (their quick modes) and run in full runs only when named in --only.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import traceback
from pathlib import Path

import torch

from bench import (
    bench_cpu_compile,
    bench_cpu_proxy,
    bench_decode_attention,
    bench_generate,
    bench_llava_cpu,
    bench_mllama,
    bench_perceiver,
    bench_splice_generate,
    bench_xattn,
    report,
)
from bench.harness import default_out_dir, jsonable, measure_ceilings, run_key

BENCHES = {"perceiver": bench_perceiver, "xattn": bench_xattn, "decode_attention": bench_decode_attention,
           "generate": bench_generate, "splice_generate": bench_splice_generate, "mllama": bench_mllama,
           "cpu_proxy": bench_cpu_proxy, "llava_cpu": bench_llava_cpu, "cpu_compile": bench_cpu_compile}
CPU_ONLY = ("cpu_proxy", "llava_cpu", "cpu_compile")  # full (GPU) runs include them only when named in --only
# Seconds per benchmark (each also stops starting new cases when its budget is spent).
BUDGET_S = {"perceiver": 60.0, "xattn": 100.0, "decode_attention": 60.0, "generate": 150.0, "splice_generate": 90.0,
            "mllama": 50.0, "cpu_proxy": 1800.0, "llava_cpu": 600.0, "cpu_compile": 1500.0}
SMOKE_BUDGET_S = 60.0


def _record_failure(out: Path, name: str, device, smoke: bool, err: BaseException) -> None:
    """Keep what the bench wrote before failing; mark it failed with the traceback."""
    path = out / f"bench-{name}.json"
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        data = {"bench": name, "key": run_key(device, smoke=smoke), "rows": []}
    data["status"] = "error"
    data["error"] = f"{type(err).__name__}: {err}"
    data["traceback"] = traceback.format_exc()[-4000:]
    path.write_text(json.dumps(jsonable(data), indent=1) + "\n")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__.split("\n\n")[0])
    ap.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU (CI, make bench)")
    ap.add_argument("--out", help="output directory (default: $OUT, else bench/results/<gpu-or-cpu>-<date>/)")
    ap.add_argument("--only", help="comma-separated subset of " + ",".join(BENCHES) + " (default: all with --smoke, "
                    "all but " + " and ".join(CPU_ONLY) + " otherwise)")
    ap.add_argument("--device", help="cuda | cpu (default: cpu with --smoke, else cuda)")
    ap.add_argument("--no-compile", action="store_true", help="skip the torch.compile baselines")
    ap.add_argument("--budget-s", type=float, help="seconds per benchmark (default: per-benchmark values)")
    ap.add_argument("--merge-only", action="store_true", help="only rebuild results.json/.md and plots in --out")
    args = ap.parse_args(argv)

    only = args.only or ",".join(n for n in BENCHES if args.smoke or n not in CPU_ONLY)
    names = [n.strip() for n in only.split(",") if n.strip()]
    unknown = [n for n in names if n not in BENCHES]
    if unknown:
        ap.error(f"unknown benchmark(s) {unknown}; choose from {sorted(BENCHES)}")
    smoke = args.smoke
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() and not smoke else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda but torch sees no GPU")
    out = Path(args.out) if args.out else default_out_dir(device)
    out.mkdir(parents=True, exist_ok=True)
    if args.merge_only:
        report.merge(out)
        return 0
    if device.type != "cuda" and not smoke:
        print("bench.run: no GPU, so running the --smoke shapes (real model shapes need a GPU)", file=sys.stderr)
        smoke = True

    if not args.no_compile:
        from torch._dynamo import config as dynamo_config

        torch._logging.set_logs(dynamo=logging.ERROR)  # torch.compile graph-break chatter
        # One compiled reference serves every shape of a benchmark: let it recompile rather than
        # silently fall back to eager after the default 8 recompilations.
        for name in ("recompile_limit", "cache_size_limit"):
            if hasattr(dynamo_config, name):
                setattr(dynamo_config, name, 256)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    print(f"bench.run: {'smoke' if smoke else 'full'} run on {device} ({dtype}), writing to {out}", flush=True)
    rc = 0
    ceilings = None
    try:
        ceilings = measure_ceilings(device, dtype, smoke=smoke)
        print(f"  {report.describe_ceilings(ceilings)}", flush=True)
    except Exception as e:  # each bench measures its own then
        print(f"  ceilings failed ({type(e).__name__}: {e}); each benchmark measures its own", flush=True)
    for name in names:
        budget = args.budget_s or (SMOKE_BUDGET_S if smoke else BUDGET_S[name])
        print(f"== {name} (budget {budget:.0f} s)", flush=True)
        try:
            data = BENCHES[name].run(device=device, dtype=dtype, out_dir=out, smoke=smoke, budget_s=budget,
                                     ceilings=ceilings, use_compile=not args.no_compile)
            errs = sum(r.get("status") == "error" for r in data["rows"])
            print(f"   {len(data['rows'])} rows, {errs} errors, {data['wall_s']:.1f} s", flush=True)
        except Exception as e:
            rc = 1
            traceback.print_exc()
            _record_failure(out, name, device, smoke, e)
        if device.type == "cuda":
            torch.cuda.empty_cache()
    report.merge(out)
    print(f"bench.run: wrote {out}/results.json, results.md and plots", flush=True)
    return rc


if __name__ == "__main__":
    sys.exit(main())
