"""lmmrt's checkpoint format: a directory with config.json, model.safetensors (lmmrt's own tensor
names, laid out as the kernels want them) and, when known, tokenizer.json.

Loading checks every tensor against the model built from config.json and names each missing,
unexpected or misshapen key. Only safetensors are read here: nothing is ever unpickled.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from lmmrt.models.config import ModelConfig
from lmmrt.models.flamingo import FlamingoModel

WEIGHTS = "model.safetensors"
CONFIG = "config.json"
TOKENIZER = "tokenizer.json"


class CheckpointError(ValueError):
    """A checkpoint that does not match what the model expects; the message names the keys."""


def describe_key_problems(missing, unexpected, misshapen, where: str) -> str:
    lines = [f"{where} does not match the model:"]
    if missing:
        lines.append(f"  missing keys ({len(missing)}): " + ", ".join(sorted(missing)[:20])
                     + (" ..." if len(missing) > 20 else ""))
    if unexpected:
        lines.append(f"  unexpected keys ({len(unexpected)}): " + ", ".join(sorted(unexpected)[:20])
                     + (" ..." if len(unexpected) > 20 else ""))
    for k, got, want in misshapen[:20]:
        lines.append(f"  {k}: shape {tuple(got)}, expected {tuple(want)}")
    return "\n".join(lines)


def check_state(state_shapes: dict[str, tuple], model: FlamingoModel, where: str) -> None:
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    missing = [k for k in expected if k not in state_shapes]
    unexpected = [k for k in state_shapes if k not in expected]
    misshapen = [(k, state_shapes[k], expected[k]) for k in expected
                 if k in state_shapes and tuple(state_shapes[k]) != expected[k]]
    if missing or unexpected or misshapen:
        raise CheckpointError(describe_key_problems(missing, unexpected, misshapen, where))


def save_checkpoint(out_dir: str | Path, cfg: ModelConfig, state: dict[str, torch.Tensor],
                    tokenizer_json: str | Path | None = None, metadata: dict | None = None) -> Path:
    from safetensors.torch import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    cfg.save(out / CONFIG)
    meta = {"format": "lmmrt", "format_version": str(cfg.format_version)}
    meta.update({k: str(v) for k, v in (metadata or {}).items()})
    save_file({k: v.contiguous() for k, v in state.items()}, str(out / WEIGHTS), metadata=meta)
    (out / WEIGHTS).chmod(0o644)  # safetensors writes 0600; a checkpoint is shared like its other files
    if tokenizer_json is not None:
        (out / TOKENIZER).write_bytes(Path(tokenizer_json).read_bytes())
    return out


def open_safetensors(path: Path):
    """safe_open with errors that say which file is broken and how."""
    from safetensors import safe_open

    if not path.exists():
        raise FileNotFoundError(f"no weights file at {path}")
    try:
        return safe_open(str(path), framework="pt")
    except Exception as e:  # safetensors raises its own SafetensorError for a bad header
        raise CheckpointError(f"{path} is not a readable safetensors file (truncated or corrupted?): {e}") from None


def read_tensor(f, key: str, path: Path) -> torch.Tensor:
    try:
        return f.get_tensor(key)
    except Exception as e:
        raise CheckpointError(f"{path}: tensor {key!r} cannot be read (file truncated or corrupted?): {e}") from None


def load_checkpoint(path: str | Path, *, device="cpu", dtype: torch.dtype | None = None,
                    progress: bool = False) -> tuple[ModelConfig, FlamingoModel]:
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist (expected an lmmrt checkpoint directory made by `lmmrt convert`)")
    if not path.is_dir():
        raise FileNotFoundError(f"{path} is not a directory (expected an lmmrt checkpoint made by `lmmrt convert`)")
    cfg_path = path / CONFIG
    if not cfg_path.exists():
        raise FileNotFoundError(f"no {CONFIG} in {path}")
    try:
        cfg_json = json.loads(cfg_path.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{cfg_path} is not valid JSON: {e}") from None
    if cfg_json.get("model_type") == "idefics" and "decoder" not in cfg_json:
        return load_transformers_idefics(path, device=device, dtype=dtype, progress=progress)
    if "model_type" in cfg_json and "decoder" not in cfg_json:
        raise CheckpointError(f"{path} holds a transformers checkpoint (model_type={cfg_json['model_type']!r}), "
                              f"not an lmmrt one: convert it first (`lmmrt convert --help`)")
    cfg = ModelConfig.from_dict(cfg_json)
    wpath = path / WEIGHTS
    f = open_safetensors(wpath)
    keys = list(f.keys())
    with torch.device("meta"):
        model = FlamingoModel(cfg)
    shapes = {k: tuple(f.get_slice(k).get_shape()) for k in keys}
    check_state(shapes, model, str(wpath))
    file_dtypes = {f.get_slice(k).get_dtype() for k in keys}
    if dtype is None:
        dtype = torch.bfloat16 if "BF16" in file_dtypes else torch.float16 if "F16" in file_dtypes else torch.float32
    model = model.to_empty(device=device)
    params = dict(model.named_parameters())
    params.update(dict(model.named_buffers()))
    it = keys
    if progress:
        from tqdm import tqdm

        it = tqdm(keys, desc=f"loading {path.name}", unit="tensor")
    with torch.no_grad():
        for k in it:
            params[k].data = read_tensor(f, k, wpath).to(device=device, dtype=dtype)
    return cfg, model


def load_transformers_idefics(path: Path, *, device="cpu", dtype: torch.dtype | None = None,
                              progress: bool = False) -> tuple[ModelConfig, FlamingoModel]:
    """A transformers IDEFICS directory, converted in memory (the same weight map as `lmmrt convert
    idefics`; convert once to skip this work at every load)."""
    from lmmrt.convert.idefics import idefics_state

    cfg, state, _ = idefics_state(path, dtype=dtype, progress=progress)
    with torch.device("meta"):
        model = FlamingoModel(cfg)
    if dtype is None:
        dtype = next(iter(state.values())).dtype
    model.load_state_dict({k: v.to(device=device, dtype=dtype) for k, v in state.items()}, assign=True)
    return cfg, model
