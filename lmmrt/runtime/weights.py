"""lmmrt's checkpoint format: a directory with config.json, model.safetensors (lmmrt's own tensor
names, laid out as the kernels want them) and, when known, tokenizer.json.

Loading checks every tensor against the model built from config.json and names each missing,
unexpected or misshapen key. Only safetensors are read here: nothing is ever unpickled.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from lmmrt.errors import CheckpointError
from lmmrt.models.config import ModelConfig
from lmmrt.models.flamingo import FlamingoModel
from lmmrt.models.splice import SpliceModel, build_model
from lmmrt.runtime.checkpoint_shapes import check_config_matches_weights
from lmmrt.runtime.json_file import read_json
from lmmrt.runtime.progress import progress_bar
from lmmrt.runtime.safetensors_file import SafetensorsFile, check_readable, why_missing
from lmmrt.runtime.save_leftovers import interrupted_previous

WEIGHTS = "model.safetensors"
CONFIG = "config.json"
TOKENIZER = "tokenizer.json"
CHAT_TEMPLATE = "chat_template.jinja"  # a chat model's template, kept from its source (Jinja, as transformers')
CHECKPOINT_DIR_HINT = "expected an lmmrt checkpoint directory made by `lmmrt convert`"
# The `lmmrt convert` format for each transformers model_type that one source directory converts from
# (OpenFlamingo and MiniGPT-4 are assembled from several sources: no model_type names them).
CONVERT_FORMATS = {"idefics": "idefics", "llava": "llava", "blip-2": "blip2", "mllama": "mllama", "clip": "clip"}


def convert_first(path: Path, model_type) -> str:
    """What to say of a transformers directory given where an lmmrt checkpoint is needed: the command that
    converts it, when its model_type is one lmmrt converts."""
    import shlex

    fmt = CONVERT_FORMATS.get(model_type) if isinstance(model_type, str) else None
    how = f"`lmmrt convert {fmt} {shlex.quote(str(path))} OUT`" if fmt else "`lmmrt convert --help` lists the formats"
    return (f"{path} holds a transformers checkpoint (model_type={model_type!r}), not an lmmrt one: "
            f"convert it first ({how})")


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


def check_state(state_shapes: dict[str, tuple], model: torch.nn.Module, where: str) -> None:
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    missing = [k for k in expected if k not in state_shapes]
    unexpected = [k for k in state_shapes if k not in expected]
    misshapen = [(k, state_shapes[k], expected[k]) for k in expected
                 if k in state_shapes and tuple(state_shapes[k]) != expected[k]]
    if missing or unexpected or misshapen:
        raise CheckpointError(describe_key_problems(missing, unexpected, misshapen, where))


class FiniteCheck:
    """Whether every tensor read is finite: one reduction per tensor, queued on its device and read back
    once at the end (no synchronisation per tensor), so that a damaged checkpoint is refused at load,
    naming its keys, not found as NaN logits at the first generate."""

    def __init__(self):
        self._keys: list[str] = []
        self._flags: list[torch.Tensor] = []

    def add(self, key: str, tensor: torch.Tensor) -> None:
        self._keys.append(key)
        self._flags.append(torch.isfinite(tensor).all())

    def check(self, path: Path, dtype: torch.dtype) -> None:
        if not self._flags:
            return
        finite = torch.stack(self._flags).cpu().tolist()
        bad = [k for k, ok in zip(self._keys, finite) if not ok]
        if bad:
            raise CheckpointError(f"{path}: {len(bad)} tensor(s) hold NaN or inf values as loaded in "
                                  f"{str(dtype).removeprefix('torch.')}: {', '.join(bad[:10])}"
                                  f"{' ...' if len(bad) > 10 else ''} (a damaged checkpoint, or values beyond "
                                  "the dtype's range)")


def open_safetensors(path: Path):
    """safe_open with errors that say which file is broken and how."""
    from safetensors import safe_open

    check_readable(path)
    try:
        return safe_open(str(path), framework="pt")
    except Exception as e:  # safetensors raises its own SafetensorError for a bad header
        raise CheckpointError(f"{path} is not a readable safetensors file (truncated or corrupted?): {e}") from None


def read_tensor(f, key: str, path: Path) -> torch.Tensor:
    try:
        return f.get_tensor(key)
    except Exception as e:
        raise CheckpointError(f"{path}: tensor {key!r} cannot be read (file truncated or corrupted?): {e}") from None


def read_config_json(path: Path) -> dict:
    reason = why_missing(path)
    if reason is not None:
        previous = interrupted_previous(Path(os.path.abspath(path)))
        if previous is not None:
            raise FileNotFoundError(f"{reason} ({CHECKPOINT_DIR_HINT}); an interrupted save of {path} left the "
                                    f"checkpoint it was replacing at {previous}")
        raise FileNotFoundError(f"{reason} ({CHECKPOINT_DIR_HINT})")
    if not path.is_dir():
        raise FileNotFoundError(f"{path} is not a directory ({CHECKPOINT_DIR_HINT})")
    cfg_path = path / CONFIG
    reason = why_missing(cfg_path)
    if reason is not None:
        raise FileNotFoundError(f"no {CONFIG} in {path}" if reason.endswith("does not exist") else reason)
    try:
        cfg_json = read_json(cfg_path)
    except OSError as e:
        raise CheckpointError(f"cannot read {cfg_path}: {e.strerror or e}") from None
    if not isinstance(cfg_json, dict):
        raise CheckpointError(f"{cfg_path}: must hold a JSON object of config fields, not {type(cfg_json).__name__}")
    return cfg_json


def checked_weights(path: Path, cfg: ModelConfig, dtype: torch.dtype | None
                    ) -> tuple[SafetensorsFile, dict, torch.dtype]:
    """The checkpoint's model.safetensors, its tensor shapes checked against `cfg` and its tensors
    against being floating point; dtype: the one asked for, else the file's (majority) dtype."""
    wpath = path / WEIGHTS
    weights = SafetensorsFile(wpath)
    shapes = weights.shapes()
    check_config_matches_weights(cfg, shapes, config_path=str(path / CONFIG), weights_path=str(wpath))
    weights.check_float()
    return weights, shapes, dtype if dtype is not None else weights.load_dtype()


def open_weights(wpath: Path):
    """model.safetensors opened for positioned reads, unbuffered; an unreadable file is a CheckpointError."""
    try:
        return open(wpath, "rb", buffering=0)
    except OSError as e:
        raise CheckpointError(f"cannot read {wpath}: {e.strerror or e}") from None


def load_checkpoint(path: str | Path, *, device="cpu", dtype: torch.dtype | None = None,
                    progress: bool = False) -> tuple[ModelConfig, FlamingoModel | SpliceModel]:
    """config.json checked field by field and against the tensor shapes in model.safetensors, the
    model built on the meta device, then each tensor read and assigned in its final dtype and
    device: the load's peak is the model plus one tensor, never a float32 copy of it."""
    path = Path(path)
    cfg_json = read_config_json(path)
    if cfg_json.get("model_type") == "idefics" and "decoder" not in cfg_json:
        return load_transformers_idefics(path, device=device, dtype=dtype, progress=progress)
    if cfg_json.get("family") == "clip":  # lmmrt.load hands these to lmmrt.runtime.embed.load_clip
        raise CheckpointError(f"{path} is a CLIP checkpoint (embeddings, no language model): load it with "
                              f"lmmrt.load and use lmmrt.embed / lmmrt.zero_shot")
    if "model_type" in cfg_json and "decoder" not in cfg_json:
        raise CheckpointError(convert_first(path, cfg_json["model_type"]))
    cfg = ModelConfig.from_dict(cfg_json, where=str(path / CONFIG))
    weights, shapes, dtype = checked_weights(path, cfg, dtype)
    wpath = path / WEIGHTS
    with torch.device("meta"):
        model = build_model(cfg)
    check_state(shapes, model, str(wpath))
    keys = weights.keys()
    if progress:
        keys = progress_bar(keys, desc=f"loading {path.name}", unit="tensor")
    fh = open_weights(wpath)
    finite = FiniteCheck()
    with fh:
        for k in keys:
            tensor = weights.read(fh, k, device=device, dtype=dtype)
            finite.add(k, tensor)
            assign_tensor(model, k, tensor)
    finite.check(wpath, dtype)
    check_filled(model, wpath)
    return cfg, model


def assign_tensor(model: torch.nn.Module, key: str, tensor: torch.Tensor) -> None:
    """Put `tensor` in place of the meta-device parameter or buffer `key` of `model`."""
    owner, _, name = key.rpartition(".")
    module = model.get_submodule(owner)
    if name in module._parameters:
        tensor = torch.nn.Parameter(tensor, requires_grad=False)
    setattr(module, name, tensor)


def check_filled(model: torch.nn.Module, wpath: Path) -> None:
    """Every parameter and buffer has storage: a tensor the checkpoint format does not hold would
    otherwise stay on the meta device."""
    unfilled = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if unfilled:
        raise RuntimeError(f"lmmrt cannot initialise {unfilled} from {wpath}: they are not in the checkpoint format")


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
    # popped one by one, so that each source tensor is freed once its device copy exists
    model.load_state_dict({k: state.pop(k).to(device=device, dtype=dtype) for k in list(state)}, assign=True)
    return cfg, model
