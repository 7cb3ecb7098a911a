"""Reports: merge the per-benchmark JSON files of one output directory into results.json, a
markdown table (results.md, also printed) and PNG plots (speed-up vs eager and fraction of
roofline per shape; generation throughput).

Every benchmark process writes its own bench-<name>.json (bench/device.sh runs them as separate
processes, each under its own timeout); merging reads whatever is there, so a stage that was
killed or failed still leaves the others' tables and plots.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

SCHEMA = "lmmrt-bench/1"
# benchmarks whose rows are end-to-end generate runs (model, engine, batch): one table and one plot each
END_TO_END = ("generate", "splice_generate", "mllama", "llava_cpu")
IMPL_ORDER = ["eager", "triton", "cuda", "sdpa-concat", "sdpa-dense-mask", "compile"]
MODE_SHORT = {"cuda-events": "events", "cuda-graph": "graph", "perf_counter": "cpu"}


def load_benches(out_dir: Path) -> dict[str, dict]:
    out = {}
    for p in sorted(Path(out_dir).glob("bench-*.json")):
        try:
            data = json.loads(p.read_text())
        except (OSError, json.JSONDecodeError) as e:
            out[p.stem.removeprefix("bench-")] = {"status": "unreadable", "error": str(e), "rows": []}
            continue
        out[data.get("bench", p.stem.removeprefix("bench-"))] = data
    return out


def _f(x, fmt: str, none: str = "-") -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return none
    return format(x, fmt)


def _ms(x) -> str:
    if x is None:
        return "-"
    return f"{x:.4g}" if x >= 0.01 else f"{x:.2e}"


def _pct(x) -> str:
    if x is None:
        return "-"
    return f"{100 * x:.1f}%" if x < 0.1 else f"{100 * x:.0f}%"


def _note(r: dict) -> str:
    if r.get("status") == "error":
        return "ERROR " + r.get("error", "")[:120]
    if r.get("status") == "skipped":
        return "skipped: " + r.get("note", "")
    return r.get("note", "")


def _md(header: list[str], rows: list[list[str]]) -> list[str]:
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(header)]
    line = lambda cells: "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths)) + " |"
    return [line(header), "|" + "|".join("-" * (w + 2) for w in widths) + "|", *(line(r) for r in rows)]


def kernel_table(rows: list[dict]) -> list[str]:
    header = ["case", "impl", "ms (median)", "p10-p90 ms", "timing", "GB/s", "TFLOP/s", "roofline", "x eager",
              "max err", "note"]
    body = []
    for r in rows:
        ok = r.get("status") == "ok"
        body.append([
            r.get("case", ""), r.get("impl", ""), _ms(r.get("ms")) if ok else "-",
            f"{_ms(r.get('p10_ms'))}-{_ms(r.get('p90_ms'))}" if ok else "-",
            MODE_SHORT.get(r.get("mode"), r.get("mode") or "-"),
            _f(r.get("gbps"), ".3g"), _f(r.get("tflops"), ".3g"), _pct(r.get("roofline_frac")) if ok else "-",
            _f(r.get("speedup_vs_eager"), ".2f"), _f(r.get("max_abs_err"), ".1e"), _note(r),
        ])
    return _md(header, body)


def generate_table(rows: list[dict]) -> list[str]:
    header = ["model", "engine", "batch", "TTFT ms", "decode tok/s", "ms/step", "GB/s", "of copy ceiling",
              "weights GiB", "peak extra GiB", "x HF decode", "agree (rows, first steps)", "note"]
    body = []
    for r in rows:
        ag = r.get("agreement")
        agree = f"{ag['rows_agreeing']}/{ag['rows']} rows, {ag['steps_compared']} steps" if ag else "-"
        body.append([
            r.get("group", ""), r.get("engine", ""), str(r.get("batch", "")), _f(r.get("ttft_ms"), ".1f"),
            _f(r.get("decode_tok_s"), ".1f"), _f(r.get("ms_per_step"), ".2f"), _f(r.get("gbps"), ".3g"),
            _pct(r.get("roofline_frac")), _f(r.get("weights_gib"), ".2f"), _f(r.get("peak_extra_gib"), ".2f"),
            _f(r.get("speedup_vs_hf"), ".2f"), agree, _note(r),
        ])
    return _md(header, body)


def cpu_proxy_tables(rows: list[dict]) -> list[str]:
    """bench_cpu_proxy: lmmrt beside transformers per batch, then aten ops per decode step."""
    by = {(r.get("group"), r.get("engine"), r.get("batch")): r for r in rows}
    timing = [r for r in rows if r.get("group") == "idefics-proxy" and r.get("engine") == "lmmrt"]
    header = ["batch", "lmmrt decode tok/s", "transformers decode tok/s", "x transformers (pairs: min-max)",
              "x transformers, best runs",
              "lmmrt TTFT ms", "transformers TTFT ms", "TTFT x transformers (theirs / ours)", "greedy tokens equal",
              "note"]
    body = []
    for r in timing:
        hf = by.get(("idefics-proxy", "transformers", r.get("batch"))) or {}
        runs = r.get("speedup_runs") or []
        spread = f" ({min(runs):.2f}-{max(runs):.2f})" if runs else ""
        body.append([str(r.get("batch", "")), _f(r.get("decode_tok_s"), ".1f"), _f(hf.get("decode_tok_s"), ".1f"),
                     _f(r.get("speedup_vs_hf"), ".2f") + (spread if r.get("speedup_vs_hf") else ""),
                     _f(r.get("speedup_best_vs_hf"), ".2f"),
                     _f(r.get("ttft_ms"), ".1f"), _f(hf.get("ttft_ms"), ".1f"), _f(r.get("ttft_speedup_vs_hf"), ".2f"),
                     {True: "yes", False: "NO"}.get(r.get("tokens_equal"), "-"), _note(r)])
    ops = [r for r in rows if r.get("group") == "aten ops per decode step"]
    lines = _md(header, body)
    if ops:
        lines += ["", *_md(["engine (batch 1)", "aten ops per decode step", "of which called from Python", "note"],
                           [[r.get("engine", ""), _f(r.get("aten_per_step"), ".1f"),
                             _f(r.get("aten_top_per_step"), ".1f"), _note(r)] for r in ops])]
    return lines


def _groups(rows: list[dict]) -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = {}
    for r in rows:
        out.setdefault(r.get("group", ""), []).append(r)
    return out


def describe_ceilings(c: dict | None) -> str:
    if not c:
        return "ceilings: not measured"
    return (f"ceilings ({c.get('label', '')}): copy {c['copy_gbps']:.1f} GB/s, "
            f"matmul {c['matmul_tflops']:.2f} TFLOP/s")


def write_bench_report(bench: str, data: dict, out_dir: Path, name: str, plot) -> list[Path]:
    """<name>.md, and <name>.png when plot(png_path) drew one, beside the bench's <name>.json; the
    paths of all three (of two without a plot)."""
    png = out_dir / f"{name}.png"
    plots = [png.name] if plot(png) else []
    (out_dir / f"{name}.md").write_text(markdown({"key": data["key"], "benches": {bench: data}}, plots) + "\n")
    return [out_dir / f"{name}.json", out_dir / f"{name}.md", *(out_dir / p for p in plots)]


def markdown(merged: dict, plots: list[str]) -> str:
    key = merged.get("key") or {}
    lines = [f"# lmmrt benchmark results — {key.get('gpu', '?')}", ""]
    if key.get("smoke"):
        lines += ["**Smoke run: tiny shapes on the CPU. These numbers exercise the harness; they say nothing "
                  "about GPU performance.**", ""]
    lines += [f"- torch {key.get('torch')}, triton {key.get('triton')}, lmmrt {key.get('lmmrt')}, python "
              f"{key.get('python')}, CUDA extension built: {key.get('cuda_extension')}",
              f"- commit {key.get('git_commit')} (dirty: {key.get('git_dirty')}), source digest "
              f"{key.get('source_digest')}, {key.get('date')}", ""]
    for name, data in merged["benches"].items():
        status = data.get("status")
        if status == "running":
            status = "incomplete (the process was killed or timed out: rows below are what it finished)"
        lines += [f"## {name} — {status}", ""]
        if data.get("error"):
            lines += [f"- error: {data['error']}"]
        if data.get("description"):
            lines += [data["description"], ""]
        lines += [f"- {describe_ceilings(data.get('ceilings'))}"]
        tel = (data.get("telemetry") or {}).get("after_ceilings") or {}
        if tel.get("available"):
            lines += [f"- GPU telemetry after the ceilings: SM {tel.get('sm_clock_mhz')} / {tel.get('sm_clock_max_mhz')} "
                      f"MHz, memory {tel.get('mem_clock_mhz')} MHz, {tel.get('power_w')} W of {tel.get('power_limit_w')} W, "
                      f"{tel.get('temperature_c')} C, clock-event reasons {tel.get('clocks_event_reasons')}"]
        elif tel:
            lines += [f"- NVML telemetry unavailable: {tel.get('error')}"]
        for k, v in (data.get("formulas") or {}).items():
            lines += [f"- {k} = {v}"]
        for n in data.get("notes") or []:
            lines += [f"- note: {n}"]
        if data.get("wall_s") is not None:
            lines += [f"- wall time {data['wall_s']:.1f} s (budget {data.get('budget_s')} s)"]
        lines += [""]
        rows = data.get("rows") or []
        if name in END_TO_END:
            lines += generate_table(rows) + [""]
        elif name == "cpu_proxy":
            lines += cpu_proxy_tables(rows) + [""]
        else:
            for group, grows in _groups(rows).items():
                lines += [f"### {name} / {group}", ""] + kernel_table(grows) + [""]
    if plots:
        lines += ["## Plots", ""] + [f"![{p}]({p})" for p in plots] + [""]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# plots
# ---------------------------------------------------------------------------------------------


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_kernel(name: str, group: str, rows: list[dict], key: dict, path: Path) -> bool:
    ok = [r for r in rows if r.get("status") == "ok"]
    if not ok:
        return False
    plt = _plt()
    cases = list(dict.fromkeys(r["case"] for r in rows))
    impls = sorted({r["impl"] for r in ok}, key=lambda i: (IMPL_ORDER.index(i) if i in IMPL_ORDER else 99, i))
    get = {(r["case"], r["impl"]): r for r in ok}
    width = 0.8 / max(len(impls), 1)
    fig, axes = plt.subplots(2, 1, figsize=(max(8.0, 0.55 * len(cases) * max(len(impls), 2) / 2 + 3), 8.5),
                             sharex=True)
    colors = plt.get_cmap("tab10")
    for ax, metric, ylabel in ((axes[0], "speedup_vs_eager", "speed-up vs eager (x, log)"),
                               (axes[1], "roofline_frac", "fraction of roofline (%)")):
        for j, impl in enumerate(impls):
            if metric == "speedup_vs_eager" and impl == "eager":
                continue  # 1.0 by definition: the black line
            xs, ys = [], []
            for i, c in enumerate(cases):
                r = get.get((c, impl))
                v = r.get(metric) if r else None
                if v is not None and math.isfinite(v) and v > 0:
                    xs.append(i - 0.4 + width * (j + 0.5))
                    ys.append(100 * v if metric == "roofline_frac" else v)
            ax.bar(xs, ys, width=width, label=impl, color=colors(j % 10))
        ax.set_ylabel(ylabel)
        ax.grid(axis="y", alpha=0.3)
        if metric == "speedup_vs_eager":
            ax.set_yscale("log")
            ax.axhline(1.0, color="black", lw=0.8)
    axes[1].set_xticks(range(len(cases)))
    axes[1].set_xticklabels(cases, rotation=40, ha="right", fontsize=8)
    axes[1].legend(ncol=min(len(impls), 6), fontsize=8, loc="upper left")
    smoke = " — CPU SMOKE RUN, not performance data" if key.get("smoke") else ""
    fig.suptitle(f"{name} / {group} on {key.get('gpu', '?')}{smoke}\n"
                 f"torch {key.get('torch')}, triton {key.get('triton')}, commit {str(key.get('git_commit'))[:10]}",
                 fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def plot_generate(rows: list[dict], key: dict, path: Path, *, title: str = "end-to-end generation") -> bool:
    ok = [r for r in rows if r.get("status") == "ok" and "decode_tok_s" in r]
    if not ok:
        return False
    plt = _plt()
    series = list(dict.fromkeys((r["group"], r["engine"]) for r in ok))
    batches = sorted({r["batch"] for r in ok})
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.8))
    width = 0.8 / max(len(series), 1)
    colors = plt.get_cmap("tab10")
    for ax, metric, ylabel, scale in ((axes[0], "ttft_ms", "time to first token (ms)", 1),
                                      (axes[1], "decode_tok_s", "decode tokens/s", 1),
                                      (axes[2], "roofline_frac", "decode GB/s, % of copy ceiling", 100)):
        for j, (g, e) in enumerate(series):
            xs, ys = [], []
            for i, bsz in enumerate(batches):
                r = next((r for r in ok if r["group"] == g and r["engine"] == e and r["batch"] == bsz), None)
                v = r.get(metric) if r else None
                if v is not None and math.isfinite(v) and v > 0:
                    xs.append(i - 0.4 + width * (j + 0.5))
                    ys.append(v * scale)
            ax.bar(xs, ys, width=width, label=f"{g} {e}", color=colors(j % 10))
        ax.set_xticks(range(len(batches)))
        ax.set_xticklabels([f"batch {x}" for x in batches])
        ax.set_ylabel(ylabel)
        ax.grid(axis="y", alpha=0.3)
    axes[1].legend(fontsize=8)
    smoke = " — CPU SMOKE RUN, not performance data" if key.get("smoke") else ""
    fig.suptitle(f"{title} on {key.get('gpu', '?')}{smoke}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def merge(out_dir: Path, *, echo: bool = True) -> dict:
    """Merge every bench-*.json in out_dir; write results.json, results.md and the plots."""
    out_dir = Path(out_dir)
    benches = load_benches(out_dir)
    key = next((d["key"] for d in benches.values() if d.get("key")), {})
    merged = {"schema": SCHEMA, "key": key, "benches": benches}
    plots: list[str] = []
    for name, data in benches.items():
        rows = data.get("rows") or []
        try:
            if name in END_TO_END:
                if plot_generate(rows, data.get("key") or key, out_dir / f"{name}.png"):
                    plots.append(f"{name}.png")
            elif name == "cpu_proxy":
                if plot_generate(rows, data.get("key") or key, out_dir / "cpu_proxy.png",
                                 title="CPU proxy, one thread"):
                    plots.append("cpu_proxy.png")
            else:
                for group, grows in _groups(rows).items():
                    fname = f"{name}_{group}.png"
                    if plot_kernel(name, group, grows, data.get("key") or key, out_dir / fname):
                        plots.append(fname)
        except Exception as e:  # a broken plot must not cost the tables
            data.setdefault("notes", []).append(f"plot failed: {type(e).__name__}: {e}")
    merged["plots"] = plots
    (out_dir / "results.json").write_text(json.dumps(merged, indent=1) + "\n")
    md = markdown(merged, plots)
    (out_dir / "results.md").write_text(md + "\n")
    if echo:
        print(md)
    return merged
