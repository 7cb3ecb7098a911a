"""bench/bench_cpu_compile.py at tiny shapes without torch.compile (the compiled way costs ~30 s of
inductor compile here; the full run is committed under bench/results): rows per batch and way,
the greedy-token check, and the patch of the fixed-shape step that the compiled way runs under.
A smoke test of the bench, not a speed claim: nothing here compares timings."""

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


def _quick(out: Path, name: str) -> tuple[int, dict]:
    from bench import bench_cpu_compile

    rc = bench_cpu_compile.main(["--quick", "--no-compile", "--out", str(out), "--name", name, "--batches", "1,3"])
    return rc, json.loads((out / f"{name}.json").read_text())


def test_quick_run_without_compile_writes_rows_per_batch_and_way(tmp_path):
    rc, data = _quick(tmp_path, "cc")
    assert rc == 0 and data["status"] == "ok", data["rows"]
    assert data["key"]["threads"] == 1 and data["key"]["smoke"] is True
    rows = data["rows"]
    assert [(r["batch"], r["impl"]) for r in rows] == [(1, "eager"), (1, "fixed-shape"), (3, "eager"),
                                                        (3, "fixed-shape")]
    for r in rows:
        assert r["status"] == "ok" and r["tokens_equal"] is True and len(r["ms_runs"]) == 2
        assert r["p10_ms"] <= r["ms"] <= r["p90_ms"]
        for field in ("ms", "decode_tok_s", "ttft_ms", "gbps", "speedup_vs_eager", "first_generate_s"):
            assert isinstance(r[field], float) and math.isfinite(r[field]) and r[field] > 0, (r["impl"], field)
    assert all(r["speedup_vs_eager"] == 1.0 for r in rows if r["impl"] == "eager")
    md = (tmp_path / "cc.md").read_text()
    assert "| B=3  | fixed-shape" in md and "torch.compile left out" in md
    assert (tmp_path / "cc.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_token_mismatch_fails_the_case_and_keeps_the_timing(tmp_path, monkeypatch):
    from bench import bench_cpu_compile

    real = bench_cpu_compile._generate

    def fixed_step_off_by_one(model, prompts, images, new_tokens, way, compiled):
        r = real(model, prompts, images, new_tokens, way, compiled)
        if way == bench_cpu_compile.FIXED:
            r["tokens"] = [[t + 1 for t in row] for row in r["tokens"]]
        return r

    monkeypatch.setattr(bench_cpu_compile, "_generate", fixed_step_off_by_one)
    rc, data = _quick(tmp_path, "bad")
    assert rc == 1 and data["status"] == "error"
    fixed = [r for r in data["rows"] if r["impl"] == "fixed-shape"]
    assert len(fixed) == 2
    for r in fixed:
        assert r["status"] == "error" and r["tokens_equal"] is False and r["ms"] > 0
        assert "greedy tokens differ from the eager step's: run 0: row 0 differs first at step 0" in r["error"]
    assert all(r["status"] == "ok" for r in data["rows"] if r["impl"] == "eager")


def test_compiled_fixed_step_is_patched_in_only_while_active():
    from bench.bench_cpu_compile import CompiledFixedStep
    from lmmrt.runtime.static_decode import StaticDecodeStep

    eager = StaticDecodeStep._forward
    compiled = CompiledFixedStep()  # torch.compile is lazy: nothing compiles here
    with compiled.active():
        assert StaticDecodeStep._forward is not eager
    assert StaticDecodeStep._forward is eager
    with pytest.raises(RuntimeError, match="boom"), compiled.active():
        raise RuntimeError("boom")
    assert StaticDecodeStep._forward is eager
