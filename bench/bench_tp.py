"""Tensor parallelism (lmmrt.parallel): what each rank holds and what it costs.

CPU (default): an IDEFICS-style bf16 checkpoint (LLaMA 6 x 1536, 12 heads, FFN 4096, vocab 32002, two
gated blocks; about 330M parameters) loaded by one process (tp=1) and by two gloo ranks (tp=2), each in
a fresh process with MALLOC_PERTURB_ set (so allocated memory counts in RSS): parameter bytes per rank
(sharded and replicated) and the peak RSS of each process over its load, less its RSS before the load.

CUDA (--device cuda, one process per GPU started here through torchrun): on an IDEFICS-9B-shaped model
with random weights (LLaMA 32 x 4096, 32 heads, FFN 11008, 8 gated blocks), built per rank in bf16:
decode tokens/s at batch 1 and 8 for tp = 1 .. min(2, GPUs) (tp=1 runs the tensor-parallel modules in a
single-rank NCCL group: the cost of their collectives with nothing to exchange), and the NCCL all-reduce
of one decode step's activations, eager and replayed from a CUDA graph.

    python -m bench.bench_tp [--out bench/results]                 # CPU: bytes and peak RSS per rank
    python -m bench.bench_tp --device cuda --out DIR              # GPU: tokens/s and all-reduce cost
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def cpu_config():
    from lmmrt.models.config import DecoderConfig, ModelConfig, PerceiverConfig, VisionConfig, XAttnConfig

    return ModelConfig(
        vision=VisionConfig(image_size=56, patch_size=14, width=256, layers=2, heads=4, mlp_dim=1024),
        perceiver=PerceiverConfig(dim=256, depth=1, heads=4, head_dim=64, n_latents=16, mlp_dim=1024),
        decoder=DecoderConfig(family="llama", vocab_size=32002, dim=1536, layers=6, heads=12, ffn_dim=4096,
                              max_seq_len=512),
        xattn=XAttnConfig(style="idefics", layers=[0, 3], heads=12, head_dim=128, media_dim=256, ffn_dim=4096),
        image_token_id=32001)


def idefics9b_config():
    from lmmrt.models.config import DecoderConfig, ModelConfig, PerceiverConfig, VisionConfig, XAttnConfig

    return ModelConfig(
        vision=VisionConfig(image_size=224, patch_size=14, width=1280, layers=32, heads=16, mlp_dim=5120),
        perceiver=PerceiverConfig(dim=1280, depth=6, heads=16, head_dim=96, n_latents=64, mlp_dim=5120,
                                  mlp_act="relu"),
        decoder=DecoderConfig(family="llama", vocab_size=32002, dim=4096, layers=32, heads=32, ffn_dim=11008,
                              max_seq_len=2048),
        xattn=XAttnConfig(style="idefics", layers=list(range(0, 32, 4)), heads=32, head_dim=128, media_dim=1280,
                          ffn_dim=11008),
        image_token_id=32001)


def rss_mib(field: str = "VmRSS") -> float:
    """This process's resident set (VmRSS) or its high-water mark (VmHWM), MiB. Not getrusage's
    ru_maxrss: that one survives exec, so a child would report the bench process's own peak."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    return float("nan")


# --- CPU: what each rank holds --------------------------------------------------------------------
def measure_load(path: str, tp: int) -> dict:
    """In this (fresh) process: load `path` with `tp`, report parameter bytes and RSS."""
    import lmmrt
    import lmmrt.api  # noqa: F401 - its imports (kernels, Triton) before `before`: the load's own peak only
    from lmmrt.parallel.load import load_shard  # noqa: F401
    from lmmrt.parallel.plan import shard_of

    torch.set_num_threads(1)
    before = rss_mib()
    t0 = time.perf_counter()
    model = lmmrt.load(path, device="cpu", backend="torch", tp=tp)
    load_s = time.perf_counter() - t0
    peak = rss_mib("VmHWM")
    held = {"sharded": 0, "replicated": 0}
    for name, p in model.module.named_parameters():
        sharded = model.tp is not None and shard_of(name, model.global_config, model.tp) is not None
        held["sharded" if sharded else "replicated"] += p.numel() * p.element_size()
    out = {"rank": 0 if model.tp is None else model.tp.rank, "tp": tp, "load_s": load_s,
           "rss_before_mib": before, "rss_peak_mib": peak, "load_peak_mib": peak - before,
           "parameter_bytes": sum(held.values()), **{f"{k}_bytes": v for k, v in held.items()}}
    if model.tp is not None:
        from lmmrt.parallel import leave_group

        leave_group(model.tp)
    return out


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(argv: list[str], tp: int) -> list[dict]:
    port, procs = str(_free_port()), []
    for rank in range(tp):
        env = dict(os.environ, MALLOC_PERTURB_="85", OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
        if tp > 1:
            env.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(tp), MASTER_ADDR="127.0.0.1",
                       MASTER_PORT=port)
        procs.append(subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, text=True))
    outs = [p.communicate(timeout=900)[0] for p in procs]
    if any(p.returncode for p in procs):
        raise RuntimeError(f"{argv} failed: {[p.returncode for p in procs]}")
    return [json.loads(o.strip().splitlines()[-1]) for o in outs]


def cpu_bench(out_dir: Path) -> dict:
    from lmmrt.models.random_init import random_model
    from lmmrt.runtime.checkpoint_writer import save_checkpoint

    cfg = cpu_config()
    with tempfile.TemporaryDirectory() as tmp:
        state = {k: v.to(torch.bfloat16).contiguous() for k, v in random_model(cfg, seed=1).state_dict().items()}
        ckpt = save_checkpoint(Path(tmp) / "ckpt", cfg, state)
        file_bytes = (ckpt / "model.safetensors").stat().st_size
        del state
        argv = [sys.executable, "-m", "bench.bench_tp", "--measure-load", str(ckpt)]
        rows = {tp: _launch(argv + ["--tp", str(tp)], tp) for tp in (1, 2)}
    result = {"bench": "tp-cpu", "commit": _commit(), "torch": torch.__version__, "checkpoint_bytes": file_bytes,
              "config": "LLaMA 6 x 1536, 12 heads, FFN 4096, vocab 32002, 2 gated blocks, bf16",
              "runs": {str(tp): r for tp, r in rows.items()}}
    whole = rows[1][0]["parameter_bytes"]
    lines = [f"# tensor parallel on the CPU (gloo), commit {result['commit']}", "",
             f"{result['config']}; checkpoint {file_bytes / 2**20:.0f} MiB", "",
             "| tp | rank | parameters MiB | sharded MiB | replicated MiB | share of tp=1 | load peak RSS MiB | load s |",
             "|---|---|---|---|---|---|---|---|"]
    for tp, rs in rows.items():
        for r in rs:
            lines.append(f"| {tp} | {r['rank']} | {r['parameter_bytes'] / 2**20:.1f} | {r['sharded_bytes'] / 2**20:.1f} "
                         f"| {r['replicated_bytes'] / 2**20:.1f} | {r['parameter_bytes'] / whole:.3f} "
                         f"| {r['load_peak_mib']:.0f} | {r['load_s']:.2f} |")
    result["markdown"] = "\n".join(lines) + "\n"
    _write(out_dir, f"tp-cpu-{result['commit'][:12]}", result)
    return result


# --- CUDA: tokens/s and the all-reduce ---------------------------------------------------------------
def random_rank_model(cfg, tp, device, dtype=torch.bfloat16):
    """This rank's model of `cfg` with random weights drawn on the device (no checkpoint: a 9B one would
    take longer to write than the whole device budget)."""
    from lmmrt.parallel.plan import build_rank_model, rank_config

    rank_cfg = rank_config(cfg, tp.size)
    module = build_rank_model(cfg, rank_cfg, tp).to(dtype).to_empty(device=device)
    g = torch.Generator(device=device).manual_seed(1 + tp.rank)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if name.endswith("_gate"):
                p.fill_(0.5)
            elif p.dim() == 1:
                p.fill_(1.0)
            else:
                p.normal_(0.0, 0.02, generator=g)
    return rank_cfg, module


def allreduce_cost(shape, dtype, iters: int = 200) -> dict:
    """Median-free mean latency (us) of one all_reduce on `shape`, eager and replayed from a CUDA graph."""
    import torch.distributed as dist

    x = torch.randn(shape, device="cuda", dtype=dtype)
    for _ in range(10):
        dist.all_reduce(x)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(iters):
        dist.all_reduce(x)
    torch.cuda.synchronize()
    eager = (time.perf_counter() - t0) / iters * 1e6
    graph = torch.cuda.CUDAGraph()
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        dist.all_reduce(x)  # warm-up on the capture stream
    torch.cuda.current_stream().wait_stream(s)
    with torch.cuda.graph(graph):
        for _ in range(iters):
            dist.all_reduce(x)
    graph.replay()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    graph.replay()
    torch.cuda.synchronize()
    return {"shape": list(shape), "eager_us": eager, "graph_us": (time.perf_counter() - t0) / iters * 1e6}


def cuda_worker(out: Path, new_tokens: int) -> None:
    import lmmrt
    from lmmrt.api import Model
    from lmmrt.parallel import join_group, leave_group

    tp, device = join_group(int(os.environ["WORLD_SIZE"]), torch.device("cuda"))
    cfg = idefics9b_config()
    rank_cfg, module = random_rank_model(cfg, tp, device)
    model = Model(module, rank_cfg, None, backend="auto", path="<random IDEFICS-9B shape>", tp=tp, global_config=cfg)
    result = {"tp": tp.size, "gpu": torch.cuda.get_device_name(), "torch": torch.__version__,
              "parameter_gib_per_rank": sum(p.numel() * p.element_size() for p in module.parameters()) / 2**30,
              "allreduce": [allreduce_cost((b, 1, cfg.decoder.dim), torch.bfloat16) for b in (1, 8)],
              "decode": []}
    g = torch.Generator().manual_seed(0)
    for batch in (1, 8):
        prompts = [[1] + torch.randint(3, 32000, (63,), generator=g).tolist() for _ in range(batch)]
        image = [torch.randn(3, 224, 224, generator=g)]
        prompts = [[1, cfg.image_token_id] + p[1:] for p in prompts]
        images = [image for _ in range(batch)]
        lmmrt.generate(model, prompts, images, max_new_tokens=8, ignore_eos=True)  # warm-up, graph capture
        lmmrt.generate(model, prompts, images, max_new_tokens=new_tokens, ignore_eos=True)
        s = model.last_stats
        result["decode"].append({"batch": batch, "tokens_per_s": s.decode_tokens_per_s, "ms_per_step": s.ms_per_step,
                                 "prefill_ms": 1e3 * s.prefill_s})
    if tp.rank == 0:
        _write(out, f"tp-cuda-tp{tp.size}", result)
    leave_group(tp)


def cuda_bench(out_dir: Path, new_tokens: int) -> None:
    gpus = torch.cuda.device_count()
    if gpus == 0:
        raise SystemExit("bench_tp --device cuda: no GPU")
    for size in sorted({1, min(2, gpus)}):
        r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(size),
                            "--master-port", str(_free_port()), "-m", "bench.bench_tp", "--cuda-worker",
                            "--out", str(out_dir), "--new-tokens", str(new_tokens)],
                           env=dict(os.environ, PYTHONPATH=str(ROOT)), cwd=ROOT)
        print(f"tp={size}: exit {r.returncode}" + ("" if gpus > 1 else " (one GPU: tp=2 not measured)"))


def _commit() -> str:
    r = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    return os.environ.get("LMMRT_GIT_COMMIT") or (r.stdout.strip() if r.returncode == 0 else "unknown")


def _write(out_dir: Path, stem: str, result: dict) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / f"{stem}.json").write_text(json.dumps(result, indent=2) + "\n")
    if "markdown" in result:
        (out_dir / f"{stem}.md").write_text(result["markdown"])
    print(json.dumps(result, indent=2) if "markdown" not in result else result["markdown"])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--measure-load", metavar="CKPT", help=argparse.SUPPRESS)  # one process of the CPU bench
    p.add_argument("--tp", type=int, default=1, help=argparse.SUPPRESS)
    p.add_argument("--cuda-worker", action="store_true", help=argparse.SUPPRESS)  # one rank of the CUDA bench
    args = p.parse_args(argv)
    if args.measure_load:
        print(json.dumps(measure_load(args.measure_load, args.tp)))
    elif args.cuda_worker:
        cuda_worker(args.out, args.new_tokens)
    elif args.device == "cuda":
        cuda_bench(args.out, args.new_tokens)
    else:
        cpu_bench(args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
