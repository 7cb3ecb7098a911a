"""The tensor-parallel process group: joined when the caller made one, else started from torchrun's
environment (NCCL on CUDA, one GPU per local rank; gloo on the CPU) and shared by the models loaded
into it until the last is released."""

from __future__ import annotations

import atexit
import datetime
import gc
import os
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist

# torchrun sets these for every worker (env:// rendezvous).
TORCHRUN_ENV = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
# A rank that never reaches a collective (killed, stuck) ends the others' wait after this long; torch's
# default (10 min for gloo and NCCL) would do too, but a failed test on a CI box should not sit that long.
COLLECTIVE_TIMEOUT = datetime.timedelta(minutes=5)


class TensorParallelError(ValueError):
    """A tensor-parallel setup that cannot work (no process group, a size that does not divide a head
    count, another rank that failed while loading); the message says what and on which rank."""


@dataclass(frozen=True)
class TensorParallel:
    """This process's place in the tensor-parallel group: rank in [0, size); group None is the
    default (world) group, which tensor parallelism uses whole; started_here: lmmrt initialised it
    (from torchrun's environment) and `handle` is this model's reference to it, which `leave_group`
    releases."""

    rank: int
    size: int
    group: dist.ProcessGroup | None = None
    started_here: bool = False
    handle: int = 0


def check_tp(tp) -> int:
    if isinstance(tp, bool) or not isinstance(tp, int) or tp < 1:
        raise TypeError(f"tp must be an integer >= 1 (the number of ranks the model is split over), got {tp!r}")
    return tp


def _local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", os.environ.get("RANK", "0")))


def rank_device(device: torch.device, tp: int) -> torch.device:
    """The device of this rank: on CUDA, GPU <local rank> (one process per GPU, as torchrun starts them)."""
    if device.type != "cuda":
        return device
    local = _local_rank()
    if device.index is not None and device.index != local:
        raise TensorParallelError(f"device {str(device)!r} with tp={tp}: each rank runs on the GPU of its local "
                                  f"rank (this one: cuda:{local}); pass device='cuda' (--device cuda)")
    if local >= torch.cuda.device_count():
        raise TensorParallelError(f"local rank {local} has no GPU: this machine has {torch.cuda.device_count()} "
                                  f"CUDA device(s) (start at most that many processes per node)")
    return torch.device("cuda", local)


class _StartedGroup:
    """The process group lmmrt started in this process, shared by every model loaded into it: each holds
    one reference (a handle), `leave_group` releases one, and the last release (or interpreter exit)
    ends the group after every rank is done with it. The rendezvous store is made once per process and
    kept: a later group rendezvouses under a fresh key prefix in it. Re-initialising from torchrun's
    environment instead made a second store on the same port, which could find the first one's keys
    (multi-tenant: the same server while rank 0 still had it open) and hang."""

    store = None
    epoch = 0  # groups started so far in this process; the live one's number while handles are held
    handles: set[int] = set()
    next_handle = 1
    atexit_registered = False


def _start_group(backend: str) -> None:
    if _StartedGroup.store is None:
        _StartedGroup.store, _, _ = next(dist.rendezvous("env://", timeout=COLLECTIVE_TIMEOUT))
    _StartedGroup.epoch += 1
    store = dist.PrefixStore(f"lmmrt-group-{_StartedGroup.epoch}", _StartedGroup.store)
    dist.init_process_group(backend, store=store, rank=int(os.environ["RANK"]),
                            world_size=int(os.environ["WORLD_SIZE"]), timeout=COLLECTIVE_TIMEOUT)
    if not _StartedGroup.atexit_registered:
        atexit.register(_end_at_exit)
        _StartedGroup.atexit_registered = True


def _ranks(n: int) -> str:
    return f"{n} rank" if n == 1 else f"{n} ranks"


def join_group(tp: int, device: torch.device) -> tuple[TensorParallel, torch.device]:
    """The group of `tp` ranks this process belongs to, and its device. Uses the default process group
    when one exists (it must have exactly `tp` ranks), else initialises it from torchrun's environment;
    a group lmmrt started gets one more reference, which the caller releases with `leave_group`."""
    check_tp(tp)
    if not dist.is_available():
        raise TensorParallelError(f"tp={tp} needs torch.distributed, which this torch build lacks")
    device = rank_device(device, tp)
    if device.type == "cuda":  # NCCL's object collectives (the load agreement) use the current device
        torch.cuda.set_device(device)
    started_here = bool(_StartedGroup.handles)
    if dist.is_initialized():
        backend = dist.get_backend()
        if device.type == "cpu" and backend == "nccl":
            raise TensorParallelError(f"the process group uses NCCL, which cannot reduce CPU tensors: load on "
                                      f"device='cuda', or initialise the group with gloo for tp={tp} on the CPU")
    else:
        missing = [k for k in TORCHRUN_ENV if k not in os.environ]
        if missing:
            raise TensorParallelError(
                f"tp={tp} needs one process per rank: start them with `torchrun --nproc-per-node {tp} ...` "
                f"(or initialise torch.distributed yourself); {', '.join(missing)} not set in this process")
        _start_group("nccl" if device.type == "cuda" else "gloo")
        started_here = True
    world = dist.get_world_size()
    if world != tp:
        if started_here and not _StartedGroup.handles:  # every rank sees the same size: all end it here
            dist.destroy_process_group()
        raise TensorParallelError(f"tp={tp}, but the process group has {_ranks(world)}: tensor parallelism "
                                  f"splits the model over all of them (start {tp} processes, or pass tp={world} (--tp {world}))")
    handle = 0
    if started_here:
        handle = _StartedGroup.next_handle
        _StartedGroup.next_handle += 1
        _StartedGroup.handles.add(handle)
    return TensorParallel(rank=dist.get_rank(), size=world, started_here=started_here, handle=handle), device


def leave_group(tp: TensorParallel) -> None:
    """Release this model's reference to the process group lmmrt started; the last one ends the group,
    once every rank is done with it (a rank tearing its connections down while another still uses them
    can abort the other). Releasing twice is a no-op; a group the caller made is left to the caller."""
    if not tp.started_here or tp.handle not in _StartedGroup.handles:
        return
    _StartedGroup.handles.discard(tp.handle)
    if not _StartedGroup.handles and dist.is_initialized():
        _meet_and_destroy("leave")


def check_group_alive(tp: TensorParallel) -> None:
    """Raise TensorParallelError when the group this model was loaded into has ended."""
    if tp.started_here and tp.handle not in _StartedGroup.handles:
        raise TensorParallelError(f"this tp={tp.size} model (rank {tp.rank}) was released with leave_group: its "
                                  f"ranks no longer work together; load it again with tp={tp.size}")
    if not dist.is_initialized():
        raise TensorParallelError(f"the process group this tp={tp.size} model (rank {tp.rank}) was loaded into "
                                  f"has been destroyed: load it again with tp={tp.size}")


# Another rank that has already exited (an error on its side) would never arrive: waiting longer than
# this at exit only delays this process's own exit.
EXIT_BARRIER_TIMEOUT = 30.0
# How long the group's end leaves gloo's worker threads to release their last tensors.
RELEASE_S = 0.05


def _end_at_exit() -> None:
    """End a group lmmrt started that models still hold at interpreter exit, after every rank gets here
    (through the store, with a time limit: a collective barrier would wait COLLECTIVE_TIMEOUT for a rank
    that died). Exiting with gloo or NCCL still set up could abort ("terminate called without an active
    exception") while another rank was still talking to this one."""
    if not _StartedGroup.handles or not dist.is_initialized():
        return
    _StartedGroup.handles.clear()
    _meet_and_destroy("exit")


def _meet_and_destroy(why: str) -> None:
    """Wait (through the store, at most EXIT_BARRIER_TIMEOUT) until every rank gets here, then destroy the
    group. Not dist.barrier(): gloo's barrier work holds the collectives still in flight before it, and
    its worker thread releases them (and their tensors, which need the GIL) after the barrier returns;
    at interpreter exit that release raced the finalizing interpreter and aborted the process
    ("terminate called without an active exception", caught in a core dump)."""
    key, world = f"lmmrt-{why}-{_StartedGroup.epoch}", dist.get_world_size()
    try:
        store = _StartedGroup.store
        store.add(key, 1)
        deadline = time.monotonic() + EXIT_BARRIER_TIMEOUT
        while store.add(key, 0) < world and time.monotonic() < deadline:
            time.sleep(0.01)
    except Exception:  # noqa: BLE001 - rank 0 (the store's host) already gone: nothing left to wait for
        pass
    dist.destroy_process_group()
    # gloo's worker threads release the tensors of their last collectives (which takes the GIL) shortly
    # after these returned: give them the GIL now, while the interpreter is whole, not during its exit
    gc.collect()
    time.sleep(RELEASE_S)


def started_a_group() -> bool:
    """Whether lmmrt started a process group in this process (the CLI then ends the process with
    os._exit once its output is flushed: see lmmrt/__main__.py)."""
    return _StartedGroup.epoch > 0
