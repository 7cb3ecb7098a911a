"""Loading one rank's shard of an lmmrt checkpoint: the checkpoint checked whole (config against
weights, keys and shapes against the global model, as a single-process load does), then each
tensor read as this rank's slice only, in its final dtype and device.

A slice is read with positioned reads at the offsets of the safetensors header (validated by
safetensors itself), straight into the rank's tensor: its rows for a column-parallel or vocabulary
slice (one read per part of a fused tensor), each row's column range for a row-parallel one. Not
through safetensors' get_slice, which reads from a memory map: the mapped pages a slice touches
count in the process's resident memory while the file is open, and a column slice touches nearly
every page of its tensor (measured with get_slice: a tp=2 rank's load peaked at 738 MiB of RSS for
307 MiB of weights; bench/bench_tp.py)."""

from __future__ import annotations

import math
import os
import struct
from pathlib import Path

import torch

from lmmrt.errors import CheckpointError
from lmmrt.models.config import ModelConfig
from lmmrt.models.splice import build_model
from lmmrt.parallel.group import TensorParallel, TensorParallelError
from lmmrt.parallel.plan import Shard, build_rank_model, rank_config, shard_of
from lmmrt.runtime.safetensors_file import FLOAT_DTYPES, SafetensorsFile
from lmmrt.runtime.weights import (
    CONFIG,
    WEIGHTS,
    FiniteCheck,
    assign_tensor,
    check_filled,
    check_state,
    checked_weights,
    convert_first,
    open_weights,
    read_config_json,
)


def _pread_into(fd: int, buf: memoryview, offset: int, path: Path, key: str) -> None:
    done = 0
    while done < len(buf):
        got = os.preadv(fd, [buf[done:]], offset + done)
        if not got:
            raise CheckpointError(f"{path}: tensor {key!r} cannot be read (file truncated?)")
        done += got


def data_start(fh) -> int:
    """Where the tensor data of an open safetensors file begins (after the header safetensors checked)."""
    fh.seek(0)
    return 8 + struct.unpack("<Q", fh.read(8))[0]


def read_shard(fd: int, weights: SafetensorsFile, data_start: int, key: str, shard: Shard) -> torch.Tensor:
    """This rank's slice of `key` in the stored dtype, only its bytes read from the file (`fd`)."""
    dt, shape, (begin, _) = weights.entries[key]
    dtype = FLOAT_DTYPES[dt]
    row_bytes = math.prod(shape[1:]) * dtype.itemsize
    if shard.dim == 0:  # whole rows: one read per part
        out = torch.empty((shard.size(), *shape[1:]), dtype=dtype)
        segments = [(begin + a * row_bytes, (b - a) * row_bytes) for a, b in shard.ranges]
    else:  # a column range of every row (2-D weights only: the plan splits no other tensor by columns)
        ((a, b),) = shard.ranges
        out = torch.empty((shape[0], b - a), dtype=dtype)
        segments = [(begin + i * row_bytes + a * dtype.itemsize, (b - a) * dtype.itemsize) for i in range(shape[0])]
    buf = memoryview(out.reshape(-1).view(torch.uint8).numpy())
    pos = 0
    for offset, n in segments:
        _pread_into(fd, buf[pos:pos + n], data_start + offset, weights.path, key)
        pos += n
    return out


def load_shard(path: str | Path, tp: TensorParallel, *, device, dtype: torch.dtype | None = None,
               progress: bool = False) -> tuple[ModelConfig, ModelConfig, torch.nn.Module]:
    """(global config, this rank's config, this rank's model) from an lmmrt checkpoint directory."""
    path = Path(path)
    cfg_json = read_config_json(path)
    if "model_type" in cfg_json and "decoder" not in cfg_json:  # even IDEFICS: tp converts nothing in memory
        raise TensorParallelError(f"{convert_first(path, cfg_json['model_type'])}; tensor parallelism loads lmmrt "
                                  "checkpoints only")
    if "decoder" not in cfg_json:
        raise TensorParallelError(f"{path} is not an lmmrt checkpoint of a language model: tensor parallelism "
                                  f"loads lmmrt checkpoints only (convert it first: `lmmrt convert --help`)")
    cfg = ModelConfig.from_dict(cfg_json, where=str(path / CONFIG))
    rank_cfg = rank_config(cfg, tp.size)  # before any weight is read: a size that cannot work fails fast
    weights, shapes, dtype = checked_weights(path, cfg, dtype)
    wpath = path / WEIGHTS
    with torch.device("meta"):
        check_state(shapes, build_model(cfg), str(wpath))
    model = build_rank_model(cfg, rank_cfg, tp)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    keys = weights.keys()
    if progress and tp.rank == 0:
        from lmmrt.runtime.progress import progress_bar

        keys = progress_bar(keys, desc=f"loading {path.name} (rank 0 of {tp.size})", unit="tensor")
    finite = FiniteCheck()
    fh = open_weights(wpath)
    with fh:
        start = data_start(fh)
        for k in keys:
            shard = shard_of(k, cfg, tp)
            if shard is None:
                tensor = weights.read(fh, k, device=device, dtype=dtype)
            else:
                tensor = read_shard(fh.fileno(), weights, start, k, shard).to(device=device, dtype=dtype)
            if tuple(tensor.shape) != expected[k]:  # the plan and the per-rank model disagree: a bug here
                raise RuntimeError(f"tensor-parallel plan: {k} sliced to {tuple(tensor.shape)} on rank {tp.rank}, "
                                   f"but the rank's model holds {expected[k]}")
            finite.add(k, tensor)
            assign_tensor(model, k, tensor)
    finite.check(wpath, dtype)
    check_filled(model, wpath)
    return cfg, rank_cfg, model
