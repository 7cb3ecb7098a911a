"""GET /metrics: Prometheus' text format (version 0.0.4), written out here (no client library needed).

Two sources: what the HTTP side measures itself (ServerMetrics: time to first token and request latency
as clients see them, tokens per second over a sliding window, responses by status) and the engine's own
counters and gauges (Engine.metrics(): queue, running requests, KV cache, media cache).
"""

from __future__ import annotations

import bisect
import collections
import time

# Buckets (seconds) for the latency histograms: from a GPU's tens of milliseconds to a loaded CPU's minutes.
TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
LATENCY_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
RATE_WINDOW_S = 10.0  # tokens/s is measured over this much recent time


class Histogram:
    def __init__(self, buckets: tuple[float, ...]):
        self.buckets = buckets
        self.counts = [0] * (len(buckets) + 1)  # the last one: above every bound (+Inf)
        self.total = 0.0
        self.n = 0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.buckets, value)] += 1
        self.total += value
        self.n += 1

    def lines(self, name: str) -> list[str]:
        out, running = [], 0
        for bound, count in zip((*self.buckets, float("inf")), self.counts):
            running += count
            le = "+Inf" if bound == float("inf") else repr(bound)
            out.append(f'{name}_bucket{{le="{le}"}} {running}')
        return out + [f"{name}_sum {self.total:.6f}", f"{name}_count {self.n}"]


class ServerMetrics:
    """What the HTTP side observes. All calls come from the server's event loop (one thread)."""

    def __init__(self):
        self.ttft = Histogram(TTFT_BUCKETS)
        self.latency = Histogram(LATENCY_BUCKETS)
        self.responses: collections.Counter[str] = collections.Counter()  # by HTTP status
        self.finished: collections.Counter[str] = collections.Counter()  # by finish reason
        self.prompt_tokens = 0
        self.completion_tokens = 0
        self._recent: collections.deque[tuple[float, int]] = collections.deque()  # (time, tokens)

    def first_token(self, seconds: float) -> None:
        self.ttft.observe(seconds)

    def tokens(self, n: int) -> None:
        now = time.monotonic()
        self.completion_tokens += n
        self._recent.append((now, n))
        self._drop_old(now)

    def request_done(self, seconds: float, finish_reason: str, prompt_tokens: int) -> None:
        self.latency.observe(seconds)
        self.finished[finish_reason] += 1
        self.prompt_tokens += prompt_tokens

    def response(self, status: int) -> None:
        self.responses[str(status)] += 1

    def tokens_per_second(self) -> float:
        now = time.monotonic()
        self._drop_old(now)
        return sum(n for _, n in self._recent) / RATE_WINDOW_S

    def _drop_old(self, now: float) -> None:
        while self._recent and self._recent[0][0] < now - RATE_WINDOW_S:
            self._recent.popleft()


def _metric(name: str, kind: str, help_text: str, samples: list[str]) -> list[str]:
    return [f"# HELP {name} {help_text}", f"# TYPE {name} {kind}", *samples]


def label_value(text: str) -> str:
    """`text` as a label value of the text format: backslash, double quote and newline escaped (a model
    name with a quote or a newline would otherwise break the line, or forge another sample)."""
    return text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def render(server: ServerMetrics, engine: dict, *, model_name: str) -> str:
    """The exposition text. `engine`: Engine.metrics()."""
    label = f'model="{label_value(model_name)}"'
    hits, misses = engine.get("media_cache_hits", 0), engine.get("media_cache_misses", 0)
    kv_total = engine.get("kv_total", 0)
    gauges = [
        ("lmmrt_queue_length", "requests waiting for a slot", engine.get("queue_len", 0)),
        ("lmmrt_running_requests", "requests holding a KV slot (prefilling or decoding)", engine.get("running", 0)),
        ("lmmrt_kv_cache_used", "KV cache slots in use", engine.get("kv_used", 0)),
        ("lmmrt_kv_cache_total", "KV cache slots in all", kv_total),
        ("lmmrt_kv_cache_usage_ratio", "fraction of the KV cache slots in use",
         engine.get("kv_used", 0) / kv_total if kv_total else 0.0),
        ("lmmrt_kv_cache_tokens_used", "KV cache positions holding a running request's tokens",
         engine.get("kv_tokens_used", 0)),
        ("lmmrt_kv_cache_bytes", "bytes of the KV cache (allocated at start)", engine.get("kv_bytes", 0)),
        ("lmmrt_generation_tokens_per_second", f"tokens sent to clients per second, over the last "
         f"{RATE_WINDOW_S:g} s", server.tokens_per_second()),
        ("lmmrt_media_cache_bytes", "bytes held by the media cache (latents and media K/V)",
         engine.get("media_cache_bytes", 0)),
        ("lmmrt_media_cache_hit_ratio", "media cache hits / lookups since start (0 before any lookup)",
         hits / (hits + misses) if hits + misses else 0.0),
    ]
    out: list[str] = []
    for name, help_text, value in gauges:
        out += _metric(name, "gauge", help_text, [f"{name}{{{label}}} {value}"])
    counters = [
        ("lmmrt_media_cache_hits_total", "media items found in the media cache", hits),
        ("lmmrt_media_cache_misses_total", "media items encoded (not in the media cache)", misses),
        ("lmmrt_prompt_tokens_total", "prompt tokens of finished requests", server.prompt_tokens),
        ("lmmrt_generation_tokens_total", "tokens generated and sent to clients", server.completion_tokens),
    ]
    for name, help_text, value in counters:
        out += _metric(name, "counter", help_text, [f"{name}{{{label}}} {value}"])
    out += _metric("lmmrt_requests_finished_total", "counter", "requests finished, by finish reason",
                   [f'lmmrt_requests_finished_total{{{label},finish_reason="{r}"}} {n}'
                    for r, n in sorted(server.finished.items())])
    out += _metric("lmmrt_http_responses_total", "counter", "responses by HTTP status",
                   [f'lmmrt_http_responses_total{{{label},status="{s}"}} {n}'
                    for s, n in sorted(server.responses.items())])
    out += _metric("lmmrt_time_to_first_token_seconds", "histogram",
                   "from the request's arrival to its first generated text", server.ttft.lines(
                       "lmmrt_time_to_first_token_seconds"))
    out += _metric("lmmrt_request_latency_seconds", "histogram", "from the request's arrival to its last token",
                   server.latency.lines("lmmrt_request_latency_seconds"))
    return "\n".join(out) + "\n"
