"""/metrics' Prometheus text: cumulative histogram buckets, and every sample line well formed."""

from __future__ import annotations

import re

from lmmrt.serve.metrics import TTFT_BUCKETS, Histogram, ServerMetrics, render

VALUE = r'"(?:[^"\\\n]|\\[\\"n])*"'  # a label value: no raw quote, backslash or newline; those escaped
SAMPLE = re.compile(rf'^[a-z_]+(\{{[a-z_]+={VALUE}(,[a-z_]+={VALUE})*\}})? -?[0-9.e+-]+$')


def test_histogram_buckets_are_cumulative():
    h = Histogram(TTFT_BUCKETS)
    values = [0.005, 0.01, 0.3, 0.3, 7.0, 1e6]
    for v in values:
        h.observe(v)
    got = {line.split('"')[1]: int(line.rsplit(" ", 1)[1]) for line in h.lines("t") if "_bucket" in line}
    for bound in TTFT_BUCKETS:  # le: values <= bound
        assert got[repr(bound)] == sum(v <= bound for v in values), bound
    assert got["+Inf"] == len(values)
    assert f"t_count {len(values)}" in h.lines("t")


def test_render_is_valid_exposition_text():
    m = ServerMetrics()
    m.first_token(0.2)
    m.tokens(5)
    m.request_done(1.5, "length", 12)
    m.request_done(0.5, "cancelled", 3)
    m.response(200)
    engine = {"queue_len": 2, "running": 3, "kv_used": 3, "kv_total": 4, "media_cache_hits": 3,
              "media_cache_misses": 1, "media_cache_bytes": 1000, "kv_tokens_used": 50, "kv_bytes": 4096}
    text = render(m, engine, model_name="m")
    for line in text.splitlines():
        assert line.startswith("# ") or SAMPLE.match(line), line
    assert 'lmmrt_media_cache_hit_ratio{model="m"} 0.75' in text
    assert 'lmmrt_kv_cache_usage_ratio{model="m"} 0.75' in text
    assert 'lmmrt_requests_finished_total{model="m",finish_reason="cancelled"} 1' in text
    assert 'lmmrt_prompt_tokens_total{model="m"} 15' in text
    assert "lmmrt_generation_tokens_per_second{model=\"m\"} 0.5" in text  # 5 tokens over the 10 s window


def test_label_values_are_escaped():
    """A served model name with a quote, a backslash and a newline: every line stays one well-formed sample
    (unescaped, the newline split a sample and the quote ended the label early)."""
    name = 'my "model"\\v2\nlmmrt_forged{model="x"} 1'
    text = render(ServerMetrics(), {"kv_total": 1}, model_name=name)
    for line in text.splitlines():
        assert line.startswith("# ") or SAMPLE.match(line), line
    assert 'lmmrt_queue_length{model="my \\"model\\"\\\\v2\\nlmmrt_forged{model=\\"x\\"} 1"} 0' in text
