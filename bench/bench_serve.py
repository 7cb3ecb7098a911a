"""`lmmrt serve` under load: continuous batching against one request at a time, TTFT, tokens/s, and the
media cache's TTFT gain.

    python -m bench.bench_serve                      # CPU: the demo model behind a real server (HTTP)
    python -m bench.bench_serve --device cuda        # GPU: an IDEFICS-9B-shaped random model, 1 / 8 / 64 clients

Scenarios (every request streams; TTFT is the time to its first text, as a client sees it):
- mixed: 16 requests of mixed prompt lengths (every other one with an image) and output lengths
  (ignore_eos, so each generates exactly max_tokens), sent one at a time, then all at once. The issue's
  goal: at once >= 2x faster.
- media_cache: 8 clients at once, each with a different new image (8 encodings), then 8 clients at once
  with one same new image (encoded once, 7 cache hits): TTFT of each.
- clients (GPU): closed loops of 1, 8 and 64 concurrent clients (each sends its next request when its
  last one ends): throughput and latency.
The CPU run goes through HTTP (bench/serve_process.py: a server process, httpx clients); the GPU run drives
the engine in process (the GPU machine has no FastAPI), with the same requests and the same clocks.
Results: JSON, a markdown table and a plot (matplotlib) under --out (default bench/results/).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import dataclasses
import io
import json
import os
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a file: bench/ is not part of the installed package
    sys.path.insert(0, str(REPO))

from bench.harness import run_key  # noqa: E402

PROMPT = "User: {text}{image}<end_of_utterance>\nAssistant:"
TEXTS = ["Hi.", "What is in the picture?", "Describe it in detail, " * 4, "Tell me a long story about it. " * 12]
OUT_LENGTHS = [8, 16, 32, 48]


@dataclasses.dataclass
class Sample:
    ttft: float
    latency: float
    tokens: int


def random_image(seed: int, size: int = 160) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)


def mixed_requests(n: int, image) -> list[dict]:
    return [{"prompt": PROMPT.format(text=TEXTS[i % len(TEXTS)], image="<image>" if i % 2 == 0 else ""),
             "images": [image] if i % 2 == 0 else [], "max_tokens": OUT_LENGTHS[(i // 2) % len(OUT_LENGTHS)]}
            for i in range(n)]


class HttpClient:
    """Requests to a running server's /v1/completions (raw prompts with markers, images as data URLs)."""

    def __init__(self, base_url: str, model: str):
        import httpx

        self.url, self.model = base_url + "/completions", model
        self.http = httpx.AsyncClient(timeout=600, limits=httpx.Limits(max_connections=256))

    @staticmethod
    def data_url(image: np.ndarray) -> str:
        from PIL import Image

        buf = io.BytesIO()
        Image.fromarray(image).save(buf, format="PNG")
        return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()

    async def send(self, req: dict) -> Sample:
        body = {"model": self.model, "prompt": req["prompt"], "images": [self.data_url(im) for im in req["images"]],
                "max_tokens": req["max_tokens"], "temperature": 0, "ignore_eos": True, "stream": True,
                "stream_options": {"include_usage": True}}
        t0, first, tokens = time.perf_counter(), None, 0
        async with self.http.stream("POST", self.url, json=body) as r:
            if r.status_code != 200:
                raise RuntimeError(f"HTTP {r.status_code}: {(await r.aread()).decode()[:300]}")
            async for line in r.aiter_lines():
                if not line.startswith("data: {"):
                    continue
                chunk = json.loads(line[6:])
                if "error" in chunk:
                    raise RuntimeError(chunk["error"]["message"])
                if first is None and chunk["choices"] and chunk["choices"][0]["text"]:
                    first = time.perf_counter()
                if chunk.get("usage"):
                    tokens = chunk["usage"]["completion_tokens"]
        end = time.perf_counter()
        return Sample((first or end) - t0, end - t0, tokens)

    async def close(self):
        await self.http.aclose()


class EngineClient:
    """The same requests straight to an in-process Engine (submitted off the loop, as the server does)."""

    def __init__(self, engine):
        self.engine = engine
        self.pool = ThreadPoolExecutor(max_workers=1)

    async def send(self, req: dict) -> Sample:
        from lmmrt.serve import Delta, EngineRequest, Finished

        t0, first = time.perf_counter(), None
        ereq = EngineRequest(prompt=req["prompt"], images=list(req["images"]), max_tokens=req["max_tokens"],
                             ignore_eos=True)
        handle = await asyncio.get_running_loop().run_in_executor(self.pool, self.engine.submit, ereq)
        tokens = 0
        async for ev in handle.events():
            if isinstance(ev, Delta) and ev.text and first is None:
                first = time.perf_counter()
            if isinstance(ev, Finished):
                if ev.finish_reason != "length":
                    raise RuntimeError(f"request ended with {ev.finish_reason}: {ev.error}")
                tokens = ev.completion_tokens
        end = time.perf_counter()
        return Sample((first or end) - t0, end - t0, tokens)

    async def close(self):
        self.pool.shutdown()


def summary(samples: list[Sample], wall: float) -> dict:
    ttft = sorted(s.ttft for s in samples)
    tokens = sum(s.tokens for s in samples)
    return {"requests": len(samples), "wall_s": wall, "tokens": tokens, "tokens_per_s": tokens / wall,
            "ttft_p50_s": statistics.median(ttft), "ttft_p99_s": float(np.percentile(ttft, 99)),
            "latency_p50_s": statistics.median(s.latency for s in samples)}


async def one_at_a_time(client, reqs) -> dict:
    t0 = time.perf_counter()
    samples = [await client.send(r) for r in reqs]
    return summary(samples, time.perf_counter() - t0)


async def all_at_once(client, reqs) -> dict:
    t0 = time.perf_counter()
    samples = await asyncio.gather(*(client.send(r) for r in reqs))
    return summary(list(samples), time.perf_counter() - t0)


async def closed_loop(client, clients: int, per_client: int, image) -> dict:
    async def loop(c: int):
        reqs = mixed_requests(per_client + c, image)[c:]  # each client starts at a different length
        return [await client.send(r) for r in reqs]

    t0 = time.perf_counter()
    done = await asyncio.gather(*(loop(c) for c in range(clients)))
    return {"clients": clients, **summary([s for per in done for s in per], time.perf_counter() - t0)}


def median_run(runs: list[dict]) -> dict:
    """The run of median wall time among repeats (a busy machine's noise falls on either side of it)."""
    return sorted(runs, key=lambda r: r["wall_s"])[len(runs) // 2]


async def scenarios(client, res: dict, save, *, seed: int, levels: list[int], pairs: int) -> None:
    """Fills `res`, calling save() after each scenario (a run stopped at its cap keeps what it measured).
    The closed-loop client levels (GPU) come first. Each comparison runs `pairs` times, its two sides
    alternating, so that a change in the machine's load falls on both; the table shows each side's median
    run, the speedups are per pair."""
    shared = random_image(seed)
    reqs = mixed_requests(16, shared)
    await client.send(reqs[0])  # warm-up: first-call costs (allocations, kernels) out of the timings
    if levels:
        res["clients"] = []
        for c in levels:
            res["clients"].append(await closed_loop(client, c, 2 if c < 64 else 1, shared))
            save()
    seq, conc, distinct, same = [], [], [], []
    short = lambda im: {"prompt": PROMPT.format(text="What is this?", image="<image>"), "images": [im], "max_tokens": 4}
    for p in range(pairs):
        seq.append(await one_at_a_time(client, reqs))
        conc.append(await all_at_once(client, reqs))
        speedups = [a["wall_s"] / b["wall_s"] for a, b in zip(seq, conc)]
        res["mixed"] = {"one_at_a_time": median_run(seq), "all_at_once": median_run(conc), "speedups": speedups,
                        "speedup": statistics.median(speedups)}
        base = seed + 1000 * (p + 1)  # new images every pair: nothing is cached from the last one
        distinct.append(await all_at_once(client, [short(random_image(base + i)) for i in range(8)]))
        same_image = random_image(base + 100)
        same.append(await all_at_once(client, [short(same_image) for _ in range(8)]))
        gains = [a["ttft_p50_s"] / b["ttft_p50_s"] for a, b in zip(distinct, same)]
        res["media_cache"] = {"distinct_images": median_run(distinct), "same_image": median_run(same),
                              "ttft_gains_p50": gains, "ttft_gain_p50": statistics.median(gains)}
        res["pairs"] = p + 1
        save()


def table(res: dict) -> str:
    m, c = res.get("mixed"), res.get("media_cache")
    rows = [(f"{r['clients']} concurrent clients", r) for r in res.get("clients", [])]
    if m:
        rows += [("mixed, one at a time", m["one_at_a_time"]), ("mixed, all at once", m["all_at_once"])]
    if c:
        rows += [("8 clients, distinct images", c["distinct_images"]), ("8 clients, same image", c["same_image"])]
    lines = ["| scenario | requests | wall s | tokens/s | TTFT p50 ms | TTFT p99 ms | latency p50 ms |",
             "|---|---|---|---|---|---|---|"]
    for name, r in rows:
        lines.append(f"| {name} | {r['requests']} | {r['wall_s']:.2f} | {r['tokens_per_s']:.1f} | "
                     f"{r['ttft_p50_s'] * 1e3:.0f} | {r['ttft_p99_s'] * 1e3:.0f} | {r['latency_p50_s'] * 1e3:.0f} |")
    if m and c:
        lines.append(f"\nmedian of {res['pairs']} pairs (rows: the median run of each side). All at once vs one at "
                     f"a time: x{m['speedup']:.2f} (goal >= 2; pairs {', '.join(f'x{x:.2f}' for x in m['speedups'])}). "
                     f"Media cache TTFT gain (p50, distinct / same image): x{c['ttft_gain_p50']:.2f} (pairs "
                     f"{', '.join(f'x{x:.2f}' for x in c['ttft_gains_p50'])}).")
    lines.append(f"Load average before / after: {res['load_before']} / {res.get('load_after', '-')}.")
    return "\n".join(lines)


def plot(res: dict, path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    if "mixed" not in res or "media_cache" not in res:
        return False
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    m = res["mixed"]
    a.bar(["one at a time", "all at once"], [m["one_at_a_time"]["wall_s"], m["all_at_once"]["wall_s"]])
    a.set_ylabel("seconds for 16 mixed requests")
    a.set_title(f"continuous batching: x{m['speedup']:.2f} (median of {res['pairs']} pairs)")
    c = res["media_cache"]
    names = ["mixed 1-by-1", "mixed at once", "distinct images", "same image"]
    runs = [m["one_at_a_time"], m["all_at_once"], c["distinct_images"], c["same_image"]]
    x = np.arange(len(names))
    b.bar(x - 0.2, [r["ttft_p50_s"] * 1e3 for r in runs], 0.4, label="p50")
    b.bar(x + 0.2, [r["ttft_p99_s"] * 1e3 for r in runs], 0.4, label="p99")
    b.set_xticks(x, names, rotation=15)
    b.set_ylabel("TTFT ms")
    b.legend()
    fig.suptitle(f"lmmrt serve, {res['model']} on {res['key']['gpu']}")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


CUDA_MODEL = ("idefics-9b-shaped (LLaMA-7B 32 x 4096, ViT-H/14 at 224 px, perceiver 6 x 64, xattn every 4th "
              "layer), random weights, bfloat16, Engine in process")


def cuda_engine():
    from bench.bench_video_overlap import build_model
    from lmmrt.serve import Engine

    model = build_model("idefics-9b", torch.device("cuda"), torch.bfloat16, 0, "auto")
    return Engine(model, max_batch=64, max_queue=256)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cpu", "cuda"])
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "results")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--pairs", type=int, default=5, help="repeats of each comparison, its sides alternating")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda":
        engine = cuda_engine()
        engine.start()
        client, levels, model = EngineClient(engine), [1, 8, 64], CUDA_MODEL
    else:
        from bench.serve_process import ServerProcess
        from lmmrt.demo import save_demo

        ckpt = Path(tempfile.mkdtemp(prefix="lmmrt-bench-serve-")) / "demo"
        save_demo(ckpt)
        server = ServerProcess(ckpt, "--device", "cpu", "--max-batch", "16", "--log-level", "warning")
        client, levels, model = HttpClient(server.base_url, "demo"), [], "demo (HTTP, lmmrt serve --max-batch 16)"

    res = {"bench": "serve", "model": model, "key": run_key(device, smoke=False),
           "load_before": [round(x, 1) for x in os.getloadavg()]}
    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.out / f"serve-{device.type}-{(res['key']['git_commit'] or 'unknown')[:12]}"
    save = lambda: stem.with_suffix(".json").write_text(json.dumps(res, indent=2))

    async def run():
        try:
            await scenarios(client, res, save, seed=args.seed, levels=levels, pairs=args.pairs)
        finally:
            await client.close()

    try:
        asyncio.run(run())
    except KeyboardInterrupt:  # stopped at the stage's cap: what was measured is kept
        res["interrupted"] = True
    finally:
        if device.type == "cuda":
            engine.shutdown(5.0)
        else:
            server.stop()
    res["load_after"] = [round(x, 1) for x in os.getloadavg()]
    save()
    md = table(res)
    stem.with_suffix(".md").write_text(f"# lmmrt serve, {model}, {res['key']['gpu']}\n\n{md}\n")
    plotted = plot(res, stem.with_suffix(".png"))
    print(md)
    print(f"wrote {stem}.json, .md{', .png' if plotted else ''}")
    return res


if __name__ == "__main__":
    main()
