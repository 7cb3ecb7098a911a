"""One rank of a tensor-parallel test run (tests/test_tensor_parallel.py starts one process per rank with
torchrun's environment variables): creates the gloo process group itself (lmmrt.load joins it), loads
each model of the job with tp = WORLD_SIZE and writes what it computed, or the error it got, to
<out>/rank<R>.pt for the test to compare with a single-process run.

    python tests/tensor_parallel_worker.py JOB.pt     (JOB.pt: torch.save of the job dict, see run_job)
"""

from __future__ import annotations

import os
import sys

import torch
import torch.distributed as dist

import lmmrt
from lmmrt.parallel.plan import shard_of


def parameter_bytes(model: lmmrt.Model) -> dict[str, int]:
    """Bytes of this rank's parameters, split into the tensors the plan shards and those it replicates."""
    out = {"sharded": 0, "replicated": 0}
    for name, p in model.module.named_parameters():
        kind = "sharded" if shard_of(name, model.global_config, model.tp) is not None else "replicated"
        out[kind] += p.numel() * p.element_size()
    return out


def run_model(spec: dict, rank: int, size: int) -> tuple[dict, lmmrt.Model | None]:
    """What this rank computed with the model of `spec` (or the error its load raised), and the model."""
    path = spec.get("path_on_rank", {}).get(rank, spec["path"])
    try:
        model = lmmrt.load(path, device="cpu", backend="torch", tp=size)
    except Exception as e:
        return {"error": (type(e).__name__, str(e))}, None
    result = {"config_heads": model.config.decoder.heads, "bytes": parameter_bytes(model)}
    if "prompts" in spec:
        result["logits"] = lmmrt.logits(model, spec["prompts"], spec["images"])
        outs = lmmrt.generate(model, spec["prompts"], spec["images"], max_new_tokens=spec["new_tokens"],
                              ignore_eos=True)
        result["tokens"] = [o.token_ids for o in outs]
        model.cuda_graph = True  # the fixed-shape decode step (eager on the CPU, captured on CUDA)
        outs = lmmrt.generate(model, spec["prompts"], spec["images"], max_new_tokens=spec["new_tokens"],
                              ignore_eos=True)
        result["fixed_step_tokens"] = [o.token_ids for o in outs]
        # sampling with no seed: every rank must still draw the same tokens
        outs = lmmrt.generate(model, spec["prompts"], spec["images"], max_new_tokens=spec["new_tokens"],
                              ignore_eos=True, temperature=1.5)
        result["sampled_tokens"] = [o.token_ids for o in outs]
    try:
        model.save(os.path.join(os.path.dirname(path), f"saved-rank{rank}"))
    except Exception as e:
        result["save_error"] = (type(e).__name__, str(e))
    return result, model


def main(job_path: str) -> int:
    job = torch.load(job_path, weights_only=False)  # written by the test itself
    rank, size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    torch.set_num_threads(1)  # two ranks on a small CI box
    dist.init_process_group("gloo")
    results = {name: run_model(spec, rank, size)[0] for name, spec in job["models"].items()}
    torch.save(results, os.path.join(job["out"], f"rank{rank}.pt"))
    dist.barrier()
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1]))
