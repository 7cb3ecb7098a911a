"""torch.compile of the fixed-shape decode step on the CPU, against lmmrt's two eager steps, per batch.

Issue 10 measured the fixed-shape step under torch.compile at 1.22x at batch 1 and 0.54x at batch 16
(on a GPU, against eager), hence "choose per bucket, by measurement"; this measures the same choice
on the CPU proxy (bench_cpu_proxy.PROXY: a small IDEFICS, float32, random weights, one thread).
Per batch, three ways to decode, the same prompts and images, greedy, EOS ignored:
- "eager": lmmrt's eager decode step (cuda_graph=False, what "auto" picks on the CPU);
- "fixed-shape": the fixed-shape step (cuda_graph=True, which on the CPU runs it eagerly);
- "fixed-shape compiled": that step's forward under torch.compile (inductor, dynamic=False), patched
  in by this bench only. The first call compiles (its seconds are recorded); later generates of the
  same batch and cache length reuse the compiled code (dynamo's guards hit), a new batch recompiles.
After one warm-up generate of each, the timed generates alternate way by way, so load from other
processes hits all three alike; reported: median decode ms/step (lmmrt's own step timing) and its
speed-up over "eager". Every way's greedy tokens must equal eager's (a mismatch fails the case).

    python -m bench.bench_cpu_compile [--quick] [--batches 1,4,16] [--runs 3] [--budget-s S] [--out DIR]

writes <out>/cpu-compile-<commit>.json, .md and .png. `--quick`: tiny model, batch 1, 2 runs, 4
tokens. Registered in bench/run.py as `cpu_compile` (always on the CPU).
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import statistics
import sys
import time
from pathlib import Path

import torch

from bench import idefics_engines as gen
from bench import report
from bench.bench_cpu_proxy import NEW_TOKENS, PROXY, QUICK_NEW_TOKENS, first_mismatch
from bench.harness import REPO, BenchRun, short_error

BATCHES = (1, 4, 16)
RUNS, QUICK_RUNS = 3, 2
GROUP = "decode_step"
EAGER, FIXED, COMPILED = "eager", "fixed-shape", "fixed-shape compiled"

FORMULAS = {
    "ms": "decode ms/step (steps after the first token, lmmrt's stats); median over runs, p10-p90 = min-max",
    "x eager": "eager step's median ms/step / this way's",
    "compile_s": "first call of the compiled step forward (dynamo trace + inductor compile + one step)",
}


class CompiledFixedStep:
    """StaticDecodeStep._forward under torch.compile, patched into the class while `active` (this
    bench only: lmmrt's runtime is untouched); times every call so the compiling one shows."""

    def __init__(self):
        from lmmrt.runtime.static_decode import StaticDecodeStep

        self.cls, self.eager_forward = StaticDecodeStep, StaticDecodeStep._forward
        self.compiled = torch.compile(self.eager_forward, backend="inductor", dynamic=False)
        self.call_s: list[float] = []

    @contextlib.contextmanager
    def active(self):
        compiled, calls = self.compiled, self.call_s

        def forward(step):
            t0 = time.perf_counter()
            out = compiled(step)
            calls.append(time.perf_counter() - t0)
            return out

        self.cls._forward = forward
        try:
            yield
        finally:
            self.cls._forward = self.eager_forward


def _dynamo_counts() -> dict:
    from torch._dynamo.utils import counters

    return {"graphs": counters["stats"]["unique_graphs"], "graph_breaks": sum(counters["graph_break"].values())}


def _generate(model, prompts, images, new_tokens: int, way: str, compiled: CompiledFixedStep | None) -> dict:
    saved = model.cuda_graph
    model.cuda_graph = way != EAGER
    try:
        with compiled.active() if way == COMPILED else contextlib.nullcontext():
            return gen.run_lmmrt(model, prompts, images, new_tokens, warmup=False)
    finally:
        model.cuda_graph = saved


def _measure_batch(b: BenchRun, model, B: int, ways: list[str], compiled, *, runs: int, new_tokens: int) -> None:
    cfg = model.config
    prompts, images = gen.make_workload(B, cfg.decoder.vocab_size, cfg.image_token_id, cfg.bos_token_id,
                                        cfg.vision.image_size, seed=B)
    first: dict[str, dict] = {}
    for way in ways:  # warm-up; the compiled way compiles for this batch here
        before, n_calls = _dynamo_counts(), len(compiled.call_s) if compiled else 0
        t0 = time.perf_counter()
        first[way] = _generate(model, prompts, images, new_tokens, way, compiled)
        first[way]["first_generate_s"] = time.perf_counter() - t0
        if way == COMPILED:
            after = _dynamo_counts()
            first[way].update(compile_s=compiled.call_s[n_calls],
                              dynamo_graphs=after["graphs"] - before["graphs"],
                              graph_breaks=after["graph_breaks"] - before["graph_breaks"])
    timed: dict[str, list[dict]] = {w: [] for w in ways}
    graphs_before = _dynamo_counts()["graphs"]
    for _ in range(runs):
        for way in ways:
            timed[way].append(_generate(model, prompts, images, new_tokens, way, compiled))
    if COMPILED in ways:  # 0 when the compiled code was reused, as the timing assumes
        first[COMPILED]["graphs_compiled_in_timed_runs"] = _dynamo_counts()["graphs"] - graphs_before
    eager_ms = statistics.median(r["ms_per_step"] for r in timed[EAGER])
    want = timed[EAGER][0]["tokens"]
    rows = []
    for way in ways:
        ms = [r["ms_per_step"] for r in timed[way]]
        row = {"bench": "cpu_compile", "group": GROUP, "case": f"B={B}", "impl": way, "engine": way, "batch": B,
               "prompt_tokens": gen.PROMPT_LEN, "new_tokens": new_tokens, "runs": runs, "dtype": "float32",
               "threads": torch.get_num_threads(), "status": "ok", "mode": "perf_counter",
               "ms": statistics.median(ms), "p10_ms": min(ms), "p90_ms": max(ms), "ms_runs": ms,
               "ms_per_step": statistics.median(ms), "decode_tok_s": B * 1e3 / statistics.median(ms),
               "ttft_ms": statistics.median(r["ttft_ms"] for r in timed[way]),
               "speedup_vs_eager": eager_ms / statistics.median(ms),
               "first_generate_s": first[way]["first_generate_s"]}
        for k in ("compile_s", "dynamo_graphs", "graph_breaks", "graphs_compiled_in_timed_runs"):
            if k in first[way]:
                row[k] = first[way][k]
        warn = sorted({w for r in [first[way], *timed[way]] for w in r.get("warnings", [])})
        if warn:
            row["warnings"] = warn
        if "compile_s" in row:
            row["note"] = (f"compile {row['compile_s']:.1f} s, {row['dynamo_graphs']} graphs, "
                           f"{row['graph_breaks']} graph breaks, "
                           f"{row['graphs_compiled_in_timed_runs']} recompiled in the timed runs")
        gen.account_decode_bytes(b, row, model, B, new_tokens)
        bad = next((f"run {i}: {m}" for i, r in enumerate([first[way], *timed[way]])
                    if (m := first_mismatch(r["tokens"], want)) is not None), None)
        row["tokens_equal"] = bad is None
        if bad is not None:  # the timing stays in the row; the case fails
            row.update(status="error", error=f"greedy tokens differ from the eager step's: {bad}"[:600])
        rows.append(row)
    b.rows += rows
    b.save()
    print(f"  [cpu_compile {b.elapsed:.0f}/{b.budget_s:.0f} s] B={B}: " + ", ".join(
        f"{r['impl']} {r['ms']:.2f} ms/step (x{r['speedup_vs_eager']:.2f})" for r in rows)
        + "".join(f"; {r['note']}" for r in rows if r.get("note")), file=sys.stderr, flush=True)


def run(*, device: torch.device, dtype: torch.dtype, out_dir: Path, smoke: bool, budget_s: float,
        ceilings: dict | None = None, use_compile: bool = True, file_stem: str | None = None,
        runs: int | None = None, new_tokens: int | None = None, batches=None) -> dict:
    """bench.run's entry point (device, dtype and ceilings are ignored: always the CPU, float32, one
    thread). smoke = the quick mode; use_compile=False leaves out the compiled way."""
    del device, dtype, ceilings
    from torch._dynamo import config as dynamo_config

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    # Every batch compiles anew (dynamic=False): past the recompile limit dynamo would silently run
    # the step eagerly and the "compiled" numbers would be eager ones.
    limits = {n: getattr(dynamo_config, n) for n in ("recompile_limit", "cache_size_limit") if hasattr(dynamo_config, n)}
    for n, v in limits.items():
        setattr(dynamo_config, n, max(v, 64))
    try:
        return _run(out_dir=out_dir, quick=smoke, budget_s=budget_s, file_stem=file_stem, use_compile=use_compile,
                    runs=runs or (QUICK_RUNS if smoke else RUNS),
                    new_tokens=new_tokens or (QUICK_NEW_TOKENS if smoke else NEW_TOKENS),
                    batches=batches or ((1,) if smoke else BATCHES))
    finally:
        torch.set_num_threads(threads)
        for n, v in limits.items():
            setattr(dynamo_config, n, v)


def _run(*, out_dir, quick, budget_s, file_stem, use_compile, runs, new_tokens, batches) -> dict:
    import os

    import lmmrt

    cpu = torch.device("cpu")
    b = BenchRun("cpu_compile", device=cpu, dtype=torch.float32, smoke=quick, out_dir=out_dir, budget_s=budget_s,
                 formulas=FORMULAS, description=__doc__.split("\n\n")[0], file_stem=file_stem)
    b.key["lmmrt_path"] = str(Path(lmmrt.__file__).parent)
    b.key["threads"] = torch.get_num_threads()
    b.notes.append(f"load average (1, 5, 15 min) at start: {[round(x, 2) for x in os.getloadavg()]} "
                   f"on {os.cpu_count()} cores")
    model = gen.lmmrt_from_hf(gen.build_hf_idefics(gen.IDEFICS_TINY if quick else PROXY, cpu, torch.float32))
    c = model.config
    b.notes.append(f"{'idefics-tiny' if quick else 'idefics-proxy'}: text {c.decoder.layers} x {c.decoder.dim}, "
                   f"vocab {c.decoder.vocab_size}, {len(c.xattn.layers)} cross-attention blocks; lmmrt backend "
                   f"{model.backend}; {runs} timed runs of {new_tokens} new tokens per way and batch")
    ways = [EAGER, FIXED] + ([COMPILED] if use_compile else [])
    if not use_compile:
        b.notes.append("torch.compile left out (--no-compile)")
    compiled = CompiledFixedStep() if use_compile else None
    for B in batches:
        if b.elapsed > b.budget_s:
            b.skip_case(GROUP, f"B={B}", {"batch": B}, ways, "time budget spent")
            continue
        try:
            _measure_batch(b, model, B, ways, compiled, runs=runs, new_tokens=new_tokens)
        except Exception as e:
            b.rows.append({"bench": "cpu_compile", "group": GROUP, "case": f"B={B}", "impl": EAGER, "batch": B,
                           "status": "error", "error": short_error(e, 600)})
            b.save()
    b.notes.append(f"load average at end: {[round(x, 2) for x in os.getloadavg()]}")
    del model
    gc.collect()
    return b.finish("error" if any(r["status"] == "error" for r in b.rows) else "ok")


def write_report(data: dict, out_dir: Path, name: str) -> list[Path]:
    """<name>.md (+ <name>.png) beside <name>.json."""
    return report.write_bench_report("cpu_compile", data, out_dir, name,
                                     lambda png: report.plot_kernel("cpu_compile", GROUP, data["rows"], data["key"], png))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.bench_cpu_compile", description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="tiny model, batch 1, 2 runs, 4 tokens")
    ap.add_argument("--out", default=str(REPO / "bench" / "results"), help="output directory (default bench/results)")
    ap.add_argument("--name", help="file name stem (default cpu-compile-<commit>, cpu-compile-quick-<commit> with --quick)")
    ap.add_argument("--runs", type=int, help=f"timed generates per way and batch (default {RUNS})")
    ap.add_argument("--new-tokens", type=int, help=f"new tokens per generate (default {NEW_TOKENS})")
    ap.add_argument("--batches", help="comma-separated batch sizes (default 1,4,16; 1 with --quick)")
    ap.add_argument("--no-compile", action="store_true", help="leave out the torch.compile way")
    ap.add_argument("--budget-s", type=float, default=1500.0, help="stop starting new batches after this long")
    args = ap.parse_args(argv)
    batches = None
    if args.batches is not None:
        try:
            batches = tuple(int(x) for x in args.batches.split(",") if x.strip())
        except ValueError:
            ap.error(f"--batches must be comma-separated integers, got {args.batches!r}")
        if not batches or min(batches) < 1:
            ap.error("--batches needs at least one batch size >= 1")
    if (args.runs is not None and args.runs < 1) or (args.new_tokens is not None and args.new_tokens < 2):
        ap.error("need --runs >= 1 and --new-tokens >= 2")
    from bench.harness import run_key

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    name = args.name or (f"cpu-compile{'-quick' if args.quick else ''}-"
                         f"{run_key(torch.device('cpu'), smoke=args.quick)['git_commit'][:12]}")
    data = run(device=torch.device("cpu"), dtype=torch.float32, out_dir=out, smoke=args.quick,
               budget_s=args.budget_s, use_compile=not args.no_compile, file_stem=name, runs=args.runs,
               new_tokens=args.new_tokens, batches=batches)
    for p in write_report(data, out, name):
        print(f"wrote {p}")
    print((out / f"{name}.md").read_text())
    return 0 if data["status"] == "ok" else 1


if __name__ == "__main__":
    sys.exit(main())
