"""bench/bench_mllama.py at its tiny smoke shape on the CPU: both engines run on the same converted
weights, every number is finite and positive, and the report gets its table and plot. A smoke test
of the benchmark, not a speed claim."""

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


def test_mllama_bench_smoke(tmp_path):
    from bench import run

    assert run.main(["--smoke", "--no-compile", "--out", str(tmp_path), "--budget-s", "300", "--only", "mllama"]) == 0
    data = json.loads((tmp_path / "results.json").read_text())["benches"]["mllama"]
    assert data["status"] == "ok", data.get("notes")
    rows = data["rows"]
    assert sorted((r["batch"], r["engine"]) for r in rows) == [(1, "hf"), (1, "lmmrt[auto]"), (2, "hf"),
                                                                (2, "lmmrt[auto]")]
    for r in rows:
        assert r["status"] == "ok", r
        assert r["media_keys"] == 2 * 17  # one image of two 28x28 tiles: 16 patches + the class token each
        for field in ("ttft_ms", "decode_tok_s", "ms_per_step", "bytes_per_step", "gbps", "weights_gib"):
            assert isinstance(r[field], float) and math.isfinite(r[field]) and r[field] > 0, (r["case"], field)
    lm = [r for r in rows if r["engine"] == "lmmrt[auto]"]
    # float32 on the CPU, the same weights: the greedy tokens agree (reported, asserted only here)
    assert all(r["agreement"]["rows_agreeing"] == r["batch"] for r in lm), [r["agreement"] for r in lm]
    md = (tmp_path / "results.md").read_text()
    assert "| mllama-tiny | lmmrt[auto] | 2" in md
    assert (tmp_path / "mllama.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
