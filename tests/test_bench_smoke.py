"""The benchmark harness end to end at tiny shapes on the CPU (torch backend and baselines): it
writes JSON, a markdown table and plots, and every number it reports is finite and positive.
A smoke test of the harness, not a speed claim: nothing here compares timings."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # bench/ is not part of the installed package
    sys.path.insert(0, str(REPO))

pytest.importorskip("matplotlib")
pytest.importorskip("transformers")


def _finite_positive(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x) and x > 0


@pytest.fixture(scope="module")
def smoke_out(tmp_path_factory):
    from bench import bench_generate, bench_perceiver, bench_xattn, run

    # Fewer tiny shapes than `bench.run --smoke`, to keep CI quick.
    mp = pytest.MonkeyPatch()
    mp.setattr(bench_perceiver, "SMOKE_MEDIA", (2,))
    mp.setattr(bench_perceiver, "SMOKE_FRAMES", (2,))
    mp.setattr(bench_xattn, "SMOKE_TEXT", (24,))
    mp.setattr(bench_xattn, "SMOKE_MEDIA", (3,))
    mp.setattr(bench_xattn, "SMOKE_BATCH", (2,))
    mp.setattr(bench_generate, "SMOKE_BATCHES", (2,))
    out = tmp_path_factory.mktemp("bench")
    try:
        rc = run.main(["--smoke", "--no-compile", "--out", str(out), "--budget-s", "300",
                       "--only", "perceiver,xattn,generate"])  # cpu_proxy: its own test below
    finally:
        mp.undo()
    assert rc == 0
    return out


def test_writes_json_table_and_plots(smoke_out):
    merged = json.loads((smoke_out / "results.json").read_text())
    assert set(merged["benches"]) == {"perceiver", "xattn", "generate"}
    key = merged["key"]
    assert key["smoke"] is True and key["device"] == "cpu" and key["torch"] and key["source_digest"]
    md = (smoke_out / "results.md").read_text()
    assert "Smoke run" in md and "| case" in md and "| model" in md
    pngs = sorted(p.name for p in smoke_out.glob("*.png"))
    assert pngs == ["generate.png", "perceiver_attention.png", "xattn_decode.png", "xattn_prefill.png"]
    for p in smoke_out.glob("*.png"):
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and p.stat().st_size > 10_000


def test_kernel_numbers_finite_and_positive(smoke_out):
    merged = json.loads((smoke_out / "results.json").read_text())
    for name in ("perceiver", "xattn"):
        data = merged["benches"][name]
        assert data["status"] == "ok", data.get("error")
        c = data["ceilings"]
        assert c["smoke_stand_in"] and _finite_positive(c["copy_gbps"]) and _finite_positive(c["matmul_tflops"])
        assert "available" in data["telemetry"]["start"]  # NVML or a graceful "unavailable"; never a crash
        rows = data["rows"]
        assert rows and not [r for r in rows if r["status"] == "error"]
        ok = [r for r in rows if r["status"] == "ok"]
        assert {r["impl"] for r in ok} >= {"eager", "sdpa-concat" if name == "perceiver" else "sdpa-dense-mask"}
        for r in ok:
            for field in ("ms", "p10_ms", "p90_ms", "flops", "bytes", "gbps", "tflops", "roofline_frac",
                          "speedup_vs_eager"):
                assert _finite_positive(r[field]), (name, r["case"], r["impl"], field, r.get(field))
            assert r["p10_ms"] <= r["ms"] <= r["p90_ms"]
            if r["impl"] != "eager":  # every baseline computes the same attention as the reference
                assert r["rel_err"] < 1e-4, (name, r["case"], r["impl"], r["rel_err"])


def test_generate_numbers_finite_and_positive(smoke_out):
    data = json.loads((smoke_out / "results.json").read_text())["benches"]["generate"]
    assert data["status"] == "ok", data.get("notes")
    rows = [r for r in data["rows"] if r["status"] == "ok"]
    engines = {r["engine"] for r in rows if r["group"] == "idefics-tiny"}
    assert engines == {"hf-eager", "lmmrt[auto]"}, data["rows"]
    for r in rows:
        for field in ("ttft_ms", "decode_tok_s", "ms_per_step", "bytes_per_step", "gbps", "roofline_frac"):
            assert _finite_positive(r[field]), (r["case"], r["engine"], field, r.get(field))
    lm = next(r for r in rows if r["engine"] == "lmmrt[auto]" and r["group"] == "idefics-tiny")
    assert lm["agreement"]["rows"] == 2 and lm["agreement"]["steps_compared"] > 0  # reported, not asserted


@pytest.fixture(scope="module")
def cpu_proxy_out(tmp_path_factory):
    from bench import bench_cpu_proxy

    out = tmp_path_factory.mktemp("cpu_proxy")
    rc = bench_cpu_proxy.main(["--quick", "--out", str(out), "--name", "proxy", "--batches", "1,3", "--pairs", "2"])
    return rc, out


def test_cpu_proxy_quick_writes_side_by_side_results(cpu_proxy_out):
    rc, out = cpu_proxy_out
    data = json.loads((out / "proxy.json").read_text())
    assert rc == 0 and data["status"] == "ok", data["rows"]
    key = data["key"]
    assert key["threads"] == 1 and key["transformers"] and key["git_commit"] and key["smoke"] is True
    timing = [r for r in data["rows"] if r["group"] == "idefics-proxy"]
    assert sorted((r["batch"], r["engine"]) for r in timing) == [(1, "lmmrt"), (1, "transformers"),
                                                                  (3, "lmmrt"), (3, "transformers")]
    for r in timing:
        assert r["status"] == "ok" and r["pairs"] == 2 and len(r["decode_tok_s_runs"]) == 2
        for field in ("ttft_ms", "decode_tok_s", "ms_per_step", "gbps"):
            assert _finite_positive(r[field]), (r["batch"], r["engine"], field, r.get(field))
    for r in (r for r in timing if r["engine"] == "lmmrt"):
        assert r["tokens_equal"] is True  # the bench asserts equality; a mismatch makes the row an error
        assert _finite_positive(r["speedup_vs_hf"]) and _finite_positive(r["ttft_speedup_vs_hf"])
        assert min(r["speedup_runs"]) <= r["speedup_vs_hf"] <= max(r["speedup_runs"])
        assert _finite_positive(r["speedup_best_vs_hf"])
    ops = {r["engine"]: r for r in data["rows"] if r["group"] == "aten ops per decode step"}
    assert set(ops) == {"lmmrt eager step", "lmmrt fixed-shape step", "transformers"}
    for r in ops.values():
        assert r["status"] == "ok", r
        assert 0 < r["aten_top_per_step"] <= r["aten_per_step"]
    md = (out / "proxy.md").read_text()
    assert "| batch | lmmrt decode tok/s | transformers decode tok/s" in md and "aten ops per decode step" in md
    assert (out / "proxy.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_cpu_proxy_token_mismatch_is_named():
    from bench.bench_cpu_proxy import first_mismatch

    assert first_mismatch([[5, 6, 7], [1, 2]], [[5, 6, 7], [1, 2]]) is None
    msg = first_mismatch([[5, 6, 7], [1, 2, 3, 4]], [[5, 6, 7], [1, 9, 3, 4]])
    assert "row 1" in msg and "step 1" in msg and "[2, 3, 4]" in msg
    assert "rows" in first_mismatch([[1]], [[1], [1]])


def test_ops_per_step_counts_only_the_decode_loop():
    """A fake generate doing a fixed setup plus k ops per step: the difference isolates k."""
    import torch

    from bench.profile_ops import per_decode_step

    x, w = torch.ones(1, 3), torch.ones(2, 3)

    def fake_generate(n):
        for _ in range(5):  # setup, same for every n
            x.mul(2.0)
        for _ in range(n):  # 2 top-level ops per step, one of which calls others inside
            x.add(1.0)
            torch.nn.functional.linear(x, w)

    counts = per_decode_step(fake_generate, n1=2, n2=5)
    assert counts["aten_top"] == 2
    assert counts["aten"] > 2  # linear dispatches nested aten ops
    with pytest.raises(ValueError, match="n1"):
        per_decode_step(fake_generate, n1=3, n2=3)


# splice_out converts tiny models saved without tokenizer.json on purpose: the warning users get for that
# is expected (its users carry the filter: the fixture runs in the first of them)
NO_TOKENIZER_ON_PURPOSE = pytest.mark.filterwarnings("ignore:.*has no tokenizer.json")


@pytest.fixture(scope="module")
def splice_out(tmp_path_factory):
    from bench import run

    out = tmp_path_factory.mktemp("splice")
    rc = run.main(["--smoke", "--no-compile", "--out", str(out), "--budget-s", "300",
                   "--only", "splice_generate,llava_cpu"])
    assert rc == 0
    return json.loads((out / "results.json").read_text()), out


@NO_TOKENIZER_ON_PURPOSE
def test_splice_generate_pairs_both_families(splice_out):
    merged, out = splice_out
    data = merged["benches"]["splice_generate"]
    assert data["status"] == "ok", data.get("notes")
    rows = data["rows"]
    # batch 1 of both families before batch 2, lmmrt then transformers in each case
    assert [(r["group"], r["batch"], r["engine"]) for r in rows] == [
        (g, B, e) for B in (1, 2) for g in ("llava-tiny", "blip2-tiny") for e in ("lmmrt[auto]", "hf")]
    for r in rows:
        assert r["status"] == "ok", r
        for field in ("ttft_ms", "decode_tok_s", "ms_per_step", "bytes_per_step", "gbps", "roofline_frac",
                      "weights_gib"):
            assert _finite_positive(r[field]), (r["case"], r["engine"], field, r.get(field))
        n_features = 16 if r["group"] == "llava-tiny" else 5  # 28 px / patch 7, class token dropped; 5 queries
        assert r["prompt_positions"] == 64 - 1 + n_features
    for r in (r for r in rows if r["engine"] == "lmmrt[auto]"):
        ag = r["agreement"]
        assert ag["rows"] == r["batch"] and ag["steps_compared"] > 0  # reported, not asserted
        assert _finite_positive(r["speedup_vs_hf"]) and _finite_positive(r["ttft_speedup_vs_hf"])
    table = [[c.strip() for c in ln.split("|")[1:4]] for ln in (out / "results.md").read_text().splitlines()]
    assert ["blip2-tiny", "hf", "2"] in table and ["llava-tiny", "lmmrt[auto]", "1"] in table
    assert (out / "splice_generate.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@NO_TOKENIZER_ON_PURPOSE
def test_llava_cpu_proxy_registered(splice_out):
    merged, out = splice_out
    data = merged["benches"]["llava_cpu"]
    assert data["status"] == "ok" and data["key"]["smoke"] is True
    rows = data["rows"]
    assert sorted((r["batch"], r["engine"]) for r in rows) == [(1, "lmmrt"), (1, "transformers"),
                                                               (4, "lmmrt"), (4, "transformers")]
    for r in rows:
        assert r["status"] == "ok" and r["tokens_equal"] is True, r  # the bench asserts equality
        assert _finite_positive(r["ttft_ms"]) and _finite_positive(r["decode_tok_s"])
    assert all(_finite_positive(r["speedup_vs_hf"]) for r in rows if r["engine"] == "lmmrt")
    assert (out / "llava_cpu.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
