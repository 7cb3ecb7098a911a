"""Tensor parallelism over torch.distributed: one process per GPU (torchrun), each holding 1/N of the
language model's heads, feed-forward rows and vocabulary (docs/tensor-parallel.md).

    torchrun --nproc-per-node 2 -m lmmrt generate CKPT --tp 2 -p '...'
    model = lmmrt.load(path, tp=2)   # in every rank: same inputs, same outputs

group: the process group, shared by the models loaded into it; agree: what the ranks check they agree
on (each load's outcome and checkpoint, each call's inputs); plan: what each rank holds; layers: the
modules swapped into a rank's model; load: reading one rank's slices of a checkpoint.
"""

from lmmrt.parallel.agree import agree_on_inputs, agree_on_load, broadcast_seed, checkpoint_identity
from lmmrt.parallel.group import TensorParallel, TensorParallelError, join_group, leave_group
from lmmrt.parallel.load import load_shard

__all__ = ["TensorParallel", "TensorParallelError", "agree_on_inputs", "agree_on_load", "broadcast_seed",
           "checkpoint_identity", "join_group", "leave_group", "load_shard"]
