"""The decode-attention microbenchmark runs its smoke shapes on the CPU: every implementation
agrees with the reference, and the work formulas count only each row's range."""

from __future__ import annotations

import torch

from bench import bench_decode_attention as bd


def test_work_counts_each_rows_range_only():
    flops, nbytes = bd.work(torch.tensor([3, 5]), H=4, KV=2, dh=8, elem=2)
    assert flops == 4 * 4 * 8 * 8
    assert nbytes == 2 * (2 * 2 * 4 * 8 + 2 * 2 * 8 * 8) + 16 * 2


def test_smoke_run_agrees_with_the_reference(tmp_path, monkeypatch):
    monkeypatch.setattr(bd, "SMOKE_BATCH", (3,))
    monkeypatch.setattr(bd, "SMOKE_FILLED", (40,))
    ceilings = {"copy_gbps": 10.0, "matmul_tflops": 0.1, "smoke_stand_in": True}
    data = bd.run(device=torch.device("cpu"), dtype=torch.float32, out_dir=tmp_path, smoke=True, budget_s=120,
                  ceilings=ceilings, use_compile=False)
    assert data["status"] == "ok" and (tmp_path / "bench-decode_attention.json").exists()
    rows = data["rows"]
    assert {r["impl"] for r in rows} == {"eager", "sdpa-dense-mask", "sdpa-prefix"}
    assert {r["shape"]["model"] for r in rows} == set(bd.SMOKE_MODELS)
    for r in rows:
        assert r["status"] == "ok", r
        assert r["ms"] > 0 and r["gbps"] > 0
        if r["impl"] != "eager":
            assert r["max_abs_err"] < 1e-5, r
