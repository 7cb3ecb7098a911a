"""Loading one rank's shard of an lmmrt checkpoint: the checkpoint checked whole (config against
weights, keys and shapes against the global model, as a single-process load does), then each
tensor read as this rank's slice only (safetensors get_slice, each part of a fused tensor on its
own), in its final dtype and device."""

from __future__ import annotations

from pathlib import Path

import torch

from lmmrt.errors import CheckpointError
from lmmrt.models.config import ModelConfig
from lmmrt.models.splice import build_model
from lmmrt.parallel.group import TensorParallel, TensorParallelError
from lmmrt.parallel.plan import Shard, build_rank_model, rank_config, shard_of
from lmmrt.runtime.checkpoint_shapes import check_config_matches_weights
from lmmrt.runtime.safetensors_file import SafetensorsFile
from lmmrt.runtime.weights import (
    CONFIG,
    WEIGHTS,
    FiniteCheck,
    _read_config_json,
    check_state,
    open_safetensors,
)


def _read_shard(f, key: str, shard: Shard, path: Path) -> torch.Tensor:
    """This rank's slice of `key`, in the stored dtype: only its bytes are read from the file."""
    try:
        sl = f.get_slice(key)
        parts = [sl[a:b] if shard.dim == 0 else sl[:, a:b] for a, b in shard.ranges]
    except Exception as e:
        raise CheckpointError(f"{path}: tensor {key!r} cannot be read (file truncated or corrupted?): {e}") from None
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=shard.dim)


def load_shard(path: str | Path, tp: TensorParallel, *, device, dtype: torch.dtype | None = None,
               progress: bool = False) -> tuple[ModelConfig, ModelConfig, torch.nn.Module]:
    """(global config, this rank's config, this rank's model) from an lmmrt checkpoint directory."""
    path = Path(path)
    cfg_json = _read_config_json(path)
    if "decoder" not in cfg_json:
        raise TensorParallelError(f"{path} is not an lmmrt checkpoint of a language model: tensor parallelism "
                                  f"loads lmmrt checkpoints only (convert it first: `lmmrt convert --help`)")
    cfg = ModelConfig.from_dict(cfg_json, where=str(path / CONFIG))
    rank_cfg = rank_config(cfg, tp.size)  # before any weight is read: a size that cannot work fails fast
    wpath = path / WEIGHTS
    weights = SafetensorsFile(wpath)
    shapes = weights.shapes()
    check_config_matches_weights(cfg, shapes, config_path=str(path / CONFIG), weights_path=str(wpath))
    weights.check_float()
    if dtype is None:
        dtype = weights.load_dtype()
    with torch.device("meta"):
        check_state(shapes, build_model(cfg), str(wpath))
    model = build_rank_model(cfg, rank_cfg, tp)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    keys = weights.keys()
    if progress and tp.rank == 0:
        from tqdm import tqdm

        keys = tqdm(keys, desc=f"loading {path.name} (rank 0 of {tp.size})", unit="tensor")
    finite = FiniteCheck()
    with open_safetensors(wpath) as f:
        for k in keys:
            shard = shard_of(k, cfg, tp)
            stored = _read_shard(f, k, shard, wpath) if shard is not None else f.get_tensor(k)
            if tuple(stored.shape) != expected[k]:  # the plan and the per-rank model disagree: a bug here
                raise RuntimeError(f"tensor-parallel plan: {k} sliced to {tuple(stored.shape)} on rank {tp.rank}, "
                                   f"but the rank's model holds {expected[k]}")
            tensor = stored.to(device=device, dtype=dtype)
            del stored
            finite.add(k, tensor)
            owner, _, name = k.rpartition(".")
            module = model.get_submodule(owner)
            if name in module._parameters:
                tensor = torch.nn.Parameter(tensor, requires_grad=False)
            setattr(module, name, tensor)
    finite.check(wpath, dtype)
    unfilled = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if unfilled:
        raise RuntimeError(f"lmmrt cannot initialise {unfilled} from {wpath}: they are not in the checkpoint format")
    return cfg, rank_cfg, model
