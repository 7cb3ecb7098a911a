"""One rank of the tensor-parallel lifecycle test (tests/test_tensor_parallel.py): lmmrt starts the
process group itself from torchrun's environment (unlike tests/tensor_parallel_worker.py, which makes
its own), and this rank goes through, in order: two models sharing the group, leave_group of one while the other
is used, the last leave_group and loads after it, a checkpoint that differs between ranks, and calls
whose inputs differ between ranks on a model still held at exit. Each step's outcome
(a value, or the error's type and message) goes to <out>/lifecycle-rank<R>.pt as soon as it is known.

    python tests/tensor_parallel_lifecycle_worker.py JOB.pt     (JOB.pt: {"out", "path", "other_path"})
"""

from __future__ import annotations

import os
import sys

import torch
import torch.distributed as dist

import lmmrt
from lmmrt.parallel import leave_group

NEW_TOKENS = 3


def outcome(fn):
    try:
        return ("ok", fn())
    except Exception as e:
        return (type(e).__name__, str(e))


def main(job_path: str) -> int:
    job = torch.load(job_path, weights_only=False)  # written by the test itself
    rank = int(os.environ["RANK"])
    torch.set_num_threads(1)  # two ranks on a small CI box
    results: dict = {}

    def step(name, fn):
        results[name] = outcome(fn)
        torch.save(results, os.path.join(job["out"], f"lifecycle-rank{rank}.pt"))
        return results[name]

    def tokens(model, prompt, **kw):
        kw = {"max_new_tokens": NEW_TOKENS, "ignore_eos": True, **kw}
        return lmmrt.generate(model, [prompt], **kw)[0].token_ids

    a = lmmrt.load(job["path"], device="cpu", backend="torch", tp=2)
    b = lmmrt.load(job["path"], device="cpu", backend="torch", tp=2)
    step("a", lambda: tokens(a, [1, 5, 7, 8]))

    leave_group(a.tp)
    step("b_after_leave_a", lambda: tokens(b, [1, 5, 7, 8]))
    step("a_after_leave_a", lambda: tokens(a, [1, 5, 7, 8]))
    leave_group(a.tp)  # twice: must not release b's reference
    step("b_after_second_leave_a", lambda: tokens(b, [1, 5, 7, 8]))
    leave_group(b.tp)
    step("group_ended", dist.is_initialized)
    for i in range(3):  # a fresh group each time
        c = lmmrt.load(job["path"], device="cpu", backend="torch", tp=2)
        step(f"reload{i}", lambda c=c: tokens(c, [1, 5, 7, 8]))
        leave_group(c.tp)

    path = job["path"] if rank == 0 else job["other_path"]
    step("other_checkpoint", lambda: lmmrt.load(path, device="cpu", backend="torch", tp=2) and None)
    step("group_ended_after_failed_load", dist.is_initialized)
    d = lmmrt.load(job["path"], device="cpu", backend="torch", tp=2)
    # rank 1 asks for something else: the same length, another length, another seed, another limit
    step("other_prompt", lambda: tokens(d, [1, 5, 7, 8 + rank]))
    step("other_length", lambda: tokens(d, [1, 5, 7, 8] + [9] * rank))
    step("other_seed", lambda: tokens(d, [1, 5, 7, 8], temperature=1.0, seed=10 + rank))
    step("other_max_new_tokens", lambda: tokens(d, [1, 5, 7, 8], max_new_tokens=NEW_TOKENS + rank))
    step("other_logits", lambda: lmmrt.logits(d, [[1, 5, 7, 8 + rank]]))
    step("after_mismatch", lambda: tokens(d, [1, 5, 7, 8]))
    return 0  # d is still held: the group ends at interpreter exit


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1]))
