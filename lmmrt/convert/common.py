"""What every converter shares: reading source weights (safetensors, sharded or not, or torch
files with weights_only=True — never a full unpickle), applying a weight map with a progress bar,
and checking the result against the model lmmrt will build, naming every bad key."""

from __future__ import annotations

import math
import os
import pickle
import re
import warnings
import zipfile
from pathlib import Path

import torch

from lmmrt.models.config import DecoderConfig, ModelConfig
from lmmrt.models.splice import build_model
from lmmrt.runtime.json_file import read_json
from lmmrt.runtime.safetensors_file import FLOAT_DTYPES, check_readable, why_missing
from lmmrt.runtime.weights import (
    CheckpointError,
    FiniteCheck,
    check_state,
    describe_key_problems,
    open_safetensors,
    read_tensor,
)


def read_source_json(path: Path, what: str = "a JSON object") -> dict:
    """A source's JSON file (config.json, an index, tokenizer_config.json) as a dict, with errors
    that name the file: missing, unreadable, not JSON, or not an object."""
    path = Path(path)
    check_readable(path)
    d = read_json(path)
    if not isinstance(d, dict):
        raise CheckpointError(f"{path} holds {type(d).__name__}, expected {what}")
    return d


def source_config_path(src: Path, what: str) -> Path:
    """src/config.json of a source directory, or an error saying what is wrong with `src` (missing,
    a symlink loop, not a directory, no config.json); `what` names the expected directory."""
    src = Path(src)
    reason = why_missing(src)
    if reason is not None:
        raise FileNotFoundError(f"{reason} (expected {what})")
    if not src.is_dir():
        raise NotADirectoryError(f"{src} is not a directory (expected {what})")
    if not (src / "config.json").exists():
        raise FileNotFoundError(f"no config.json in {src} (expected {what})")
    return src / "config.json"


def read_hf_source_config(src: Path, *, architecture: str, model: str, model_type: str,
                          expected_note: str = "") -> dict:
    """The config.json of a transformers `architecture` directory as a dict, refusing an
    lmmrt checkpoint given as the source (no conversion needed) and a config of another model_type."""
    cfg_path = source_config_path(src, f"a transformers {architecture} directory")
    hf = read_source_json(cfg_path, f"a transformers {model} config (a JSON object)")
    if "decoder" in hf and "model_type" not in hf:
        raise ValueError(f"{src} is already an lmmrt checkpoint: load it with lmmrt.load, no conversion needed")
    if hf.get("model_type") != model_type:
        raise ValueError(f"{cfg_path}: model_type is {hf.get('model_type')!r}, expected {model_type!r}{expected_note}")
    return hf


def torch_load_weights_only(path: Path) -> dict:
    """A torch pickle file, read with weights_only=True: tensors and plain containers only."""
    check_readable(path)
    # mmap needs the zip format; older files (and a zip cut short) get a plain, still weights_only read
    mmap = zipfile.is_zipfile(path)
    try:
        return torch.load(str(path), map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as e:
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        found = isinstance(e, pickle.UnpicklingError) and re.search(r"Unsupported global: GLOBAL (\S+)", str(e))
        if found:  # torch's own message suggests weights_only=False, which lmmrt never does
            raise CheckpointError(f"{path} holds a pickled object ({found.group(1)}), not only tensors and "
                                  f"plain containers: lmmrt refuses to unpickle objects") from None
        raise CheckpointError(f"{path}: truncated or corrupted torch file ({first})") from None


# the dtypes lmmrt's loader reads (lmmrt.runtime.safetensors_file.SafetensorsFile.check_float)
_FLOAT_WEIGHT_DTYPES = frozenset(FLOAT_DTYPES.values())


class SourceWeights:
    """A read-only mapping name -> tensor over one or more files, loading tensors lazily."""

    def __init__(self):
        self._where: dict[str, tuple[object, Path]] = {}

    @classmethod
    def open(cls, src: Path) -> SourceWeights:
        src = Path(src)
        self = cls()
        index = src / "model.safetensors.index.json"
        single = src / "model.safetensors"
        if index.exists():
            weight_map = read_source_json(index, "a sharded-checkpoint index").get("weight_map")
            if not isinstance(weight_map, dict) or not weight_map:
                raise CheckpointError(f"{index} has no weight_map (tensor name -> shard file): the index is "
                                      f"incomplete or not a transformers sharded-checkpoint index")
            for shard in sorted(set(weight_map.values())):
                if not isinstance(shard, str) or Path(shard).name != shard:
                    raise CheckpointError(f"{index}: weight_map names {shard!r}, not a file name in {src}")
                if not (src / shard).exists():
                    raise FileNotFoundError(f"{index} names the shard {shard}, which is not in {src}")
                self.add_safetensors(src / shard)
        elif single.exists():
            self.add_safetensors(single)
        else:
            bins = sorted(src.glob("pytorch_model*.bin"))
            if not bins:
                raise FileNotFoundError(f"no weights in {src}: expected model.safetensors, "
                                        "model.safetensors.index.json or pytorch_model*.bin")
            for b in bins:
                self.add_dict(torch_load_weights_only(b), b)
        return self

    @classmethod
    def from_state_dict(cls, sd: dict, name: str = "<state dict>") -> SourceWeights:
        """An in-memory state dict (e.g. a transformers model's `state_dict()`), read in place:
        converting a model built in memory needs no file."""
        self = cls()
        self.add_dict(dict(sd), Path(name))
        return self

    def add_safetensors(self, path: Path) -> None:
        f = open_safetensors(path)
        for k in f.keys():
            self._where[k] = (f, path)

    def add_dict(self, d: dict, path: Path) -> None:
        if not isinstance(d, dict):
            raise CheckpointError(f"{path} does not hold a state dict (got {type(d).__name__})")
        for k, v in d.items():
            if not isinstance(v, torch.Tensor):
                continue
            self._where[k] = (d, path)

    def keys(self):
        return self._where.keys()

    def __contains__(self, k):
        return k in self._where

    def shape(self, k) -> tuple:
        f, _ = self._where[k]
        if isinstance(f, dict):
            return tuple(f[k].shape)
        return tuple(f.get_slice(k).get_shape())

    def shape_or_none(self, k) -> tuple | None:
        return self.shape(k) if k in self._where else None

    def get(self, k) -> torch.Tensor:
        """Tensor k, which must be floating point: the loader refuses any other dtype, and a cast to
        float (dtype=) would make weights of numbers that never were (e.g. a quantized tensor)."""
        f, path = self._where[k]
        t = f[k] if isinstance(f, dict) else read_tensor(f, k, path)
        if t.dtype not in _FLOAT_WEIGHT_DTYPES:
            raise CheckpointError(f"{path}: tensor {k!r} is {str(t.dtype).removeprefix('torch.')}, but lmmrt "
                                  f"weights are floating point (float32, float16, bfloat16 or float64): "
                                  f"convert from the unquantized checkpoint")
        return t


def find_tokenizer_json(src: Path) -> Path | None:
    p = Path(src) / "tokenizer.json"
    return p if p.exists() else None


def warn_no_tokenizer(src: Path, marker: str, marker_id: int) -> None:
    """A conversion without tokenizer.json succeeds, but its model takes no text: said at convert time."""
    warnings.warn(f"{src} has no tokenizer.json: the model will take prompts as token ids only, not text, and "
                  f"{marker} is taken to be token id {marker_id}. Copy the model's tokenizer.json into {src} "
                  f"(or into the converted checkpoint) to use text prompts.", stacklevel=3)


def _dry_run_shape(shapes: list[tuple], transform, reshape_to) -> tuple:
    """The shape a tensor made from sources of these shapes gets, computed on meta tensors (nothing
    is read); raises ValueError when the parts cannot be combined."""
    parts = [torch.empty(s, device="meta") for s in shapes]
    try:
        t = parts[0] if len(parts) == 1 else torch.cat(parts, dim=0)
        if transform is not None:
            t = transform(t)
    except RuntimeError as e:
        raise ValueError(str(e).splitlines()[0]) from None
    if reshape_to is not None:
        if t.numel() != math.prod(reshape_to):
            raise ValueError(f"{t.numel()} elements cannot become {tuple(reshape_to)}")
        t = t.reshape(reshape_to)
    return tuple(t.shape)


# lmmrt's fused projections (q/k/v, k/v, gate/up), whose parts each have a fixed share of the rows
_FUSED_PROJECTIONS = frozenset({"wqkv", "wkv", "cross_wkv", "w13", "ff_w13"})


def _part_rows(name: str, n_parts: int, want: tuple | None, decoder: DecoderConfig | None) -> list[int] | None:
    """The rows each part of a fused projection should have: the decoder's q/k/v by its (grouped)
    heads, any other (gate/up, k/v, CLIP's q/k/v) in equal parts. None for other concatenations (a
    vocabulary and its added rows), whose split the model does not fix. Computed from the target
    and the config alone, so a part is checked even when a sibling is missing."""
    module = name.rsplit(".", 2)[-2] if name.count(".") else ""  # "decoder.layers.0.wqkv.weight" -> "wqkv"
    if not want or module not in _FUSED_PROJECTIONS:
        return None
    if decoder is not None and n_parts == 3 and name.startswith("decoder.layers.") and ".wqkv." in name:
        d = decoder
        return [d.heads * d.head_dim, d.kv_heads * d.head_dim, d.kv_heads * d.head_dim]
    return [want[0] // n_parts] * n_parts if want[0] % n_parts == 0 else None


def _misshapen_parts(shapes: list[tuple | None], want: tuple, rows: list[int] | None) -> dict[int, str]:
    """The misshapen parts of a fused tensor (None: a missing part, not checked), each with the shape
    it should have: the target's trailing dims, and its share of the rows (shown as ? when the rows
    have no known split)."""
    odd = {}
    for i, s in enumerate(shapes):
        if s is None:
            continue
        share_ok = rows is None or (len(s) > 0 and s[0] == rows[i])
        if tuple(s[1:]) != tuple(want[1:]) or not share_ok:
            share = "?" if rows is None else str(rows[i])
            odd[i] = f"({', '.join([share, *map(str, want[1:])])}{',' if len(want) == 1 else ''})"
    return odd


def _shape_problem(name: str, srcs: list[str], shapes: list[tuple | None], want: tuple | None, transform,
                   reshape_to, decoder: DecoderConfig | None) -> str | None:
    """What is wrong with the sources of one lmmrt tensor (a shape of None: a missing source, named
    elsewhere), or None: the combined shape when every source is there, and each part of a fused
    tensor against its share (parts of the right total but split wrongly would convert into a model
    that computes something else)."""
    complete = all(s is not None for s in shapes)
    reason = None
    if complete:
        try:
            got = _dry_run_shape(shapes, transform, reshape_to)
            reason = None if want is None or got == want else f"they make {got}"
        except ValueError as e:
            reason = f"they cannot be combined ({e})"
    # a transform (NeoX's interleaved q/k/v) reorders rows and a reshape regroups them: no part has a share
    fused = len(srcs) > 1 and transform is None and reshape_to is None and bool(want)
    odd = _misshapen_parts(shapes, want, _part_rows(name, len(srcs), want, decoder)) if fused else {}
    if reason is None and not odd:
        return None
    parts = ", ".join(f"{s} missing" if shp is None else f"{s} {tuple(shp)}{' <- misshapen' if i in odd else ''}"
                      for i, (s, shp) in enumerate(zip(srcs, shapes)))
    if reason is None:
        reason = ("a part is missing, and a present one is misshapen" if not complete else
                  "the total is right, but the rows are split wrongly between the parts")
    if odd:  # each part by what follows the parts' common prefix (q_proj.weight, up_proj.weight)
        common = os.path.commonprefix(srcs).rfind(".") + 1
        reason += "; expected " + ", ".join(f"{srcs[i][common:]} {shape}" for i, shape in odd.items())
    return f"{name} needs {want}: from {parts}: {reason}"


def misshapen_sources(src: SourceWeights, wmap: dict[str, list[str]], expected: dict[str, tuple], *,
                      decoder: DecoderConfig | None = None, transforms: dict | None = None,
                      reshape: dict[str, tuple] | None = None) -> list[str]:
    """One line per lmmrt tensor whose sources are misshapen (shapes only, nothing is read): the
    combined shape against `expected` (lmmrt name -> shape), and every present part of a fused
    q/k/v, k/v or gate/up against its share, also when a sibling is missing. `decoder`: the config
    whose (grouped) heads split the decoder's q/k/v; other fused projections split in equal parts."""
    transforms = transforms or {}
    reshape = reshape or {}
    out = []
    for name, srcs in wmap.items():
        shapes = [src.shape(s) if s in src else None for s in srcs]
        problem = _shape_problem(name, srcs, shapes, expected.get(name), transforms.get(name), reshape.get(name),
                                 decoder)
        if problem is not None:
            out.append(problem)
    return out


def check_source(src: SourceWeights, wmap: dict[str, list[str]], model: torch.nn.Module, cfg: ModelConfig, *,
                 ignored_prefixes=(), reshape: dict[str, tuple] | None = None, transforms: dict | None = None,
                 source_shapes: dict[str, tuple] | None = None) -> None:
    """Check a source against the weight map before any tensor is read (shapes only, on meta tensors):
    one CheckpointError names every missing source key, every source key left unused and every
    misshapen source (the parts of a fused q/k/v or gate/up with their shapes and their shares).
    model: the model `cfg` builds (on meta), whose tensors the map makes; source_shapes: the shapes of
    sources that are folded into other tensors rather than mapped (e.g. gates), which the map cannot tell."""
    source_shapes = source_shapes or {}
    needed = {s for srcs in wmap.values() for s in srcs} | set(source_shapes)
    missing = sorted(s for s in needed if s not in src)
    unused = sorted(k for k in src.keys() if k not in needed and not k.startswith(tuple(ignored_prefixes))
                    and not k.endswith(("rotary_emb.inv_freq", "embeddings.position_ids", "masked_bias",
                                        ".attn.bias", "attention.bias", "attention.masked_bias")))
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    misshapen = misshapen_sources(src, wmap, expected, decoder=cfg.decoder, transforms=transforms, reshape=reshape)
    misshapen += [f"{s}: shape {src.shape(s)}, expected {tuple(want)}" for s, want in source_shapes.items()
                  if s in src and tuple(src.shape(s)) != tuple(want)]
    if missing or unused or misshapen:
        msg = describe_key_problems(missing, unused, [], "the source checkpoint")
        msg += "".join(f"\n  {line}" for line in misshapen[:20])
        if len(misshapen) > 20:
            msg += f"\n  ... and {len(misshapen) - 20} more misshapen tensors"
        raise CheckpointError(msg)


def convert_state(src: SourceWeights, wmap: dict[str, list[str]], cfg: ModelConfig, *,
                  ignored_prefixes=(), dtype: torch.dtype | None = None, progress: bool = True,
                  reshape: dict[str, tuple] | None = None, transforms: dict | None = None) -> dict[str, torch.Tensor]:
    """Apply a weight map: each lmmrt tensor is the concatenation (dim 0) of its sources, optionally
    transformed, then reshaped. Before reading any tensor, the source is checked (check_source: one
    CheckpointError naming every missing, unused or misshapen source tensor)."""
    reshape = reshape or {}
    transforms = transforms or {}
    with torch.device("meta"):
        model = build_model(cfg)
    check_source(src, wmap, model, cfg, ignored_prefixes=ignored_prefixes, reshape=reshape, transforms=transforms)
    out: dict[str, torch.Tensor] = {}
    items = list(wmap.items())
    if progress:
        from lmmrt.runtime.progress import progress_bar

        items = progress_bar(items, desc="converting", unit="tensor", say_when_hidden=True)
    finite = FiniteCheck()  # the loader's check, so that a NaN source is refused now, not at load
    for name, srcs in items:
        parts = [src.get(s) for s in srcs]
        t = parts[0] if len(parts) == 1 else torch.cat(parts, dim=0)
        if name in transforms:
            t = transforms[name](t)
        if name in reshape:
            t = t.reshape(reshape[name])
        out[name] = t.to(dtype) if dtype is not None else t.contiguous()
        finite.add(" + ".join(srcs), out[name])
    finite.check("the source checkpoint", dtype or out[name].dtype)
    check_state({k: tuple(v.shape) for k, v in out.items()}, model, "the converted state")
    return out


# --- weight maps shared by several source formats --------------------------------------------------
def clip_vision_map(prefix: str, layers: int) -> dict[str, list[str]]:
    """transformers' CLIP vision tower (CLIPVisionModel, IDEFICS's vision_model) -> lmmrt's vision.*;
    `prefix` is what stands before `embeddings.` in the source names."""
    m = {"vision.class_embed": [prefix + "embeddings.class_embedding"],
         "vision.patch_embed.weight": [prefix + "embeddings.patch_embedding.weight"],
         "vision.pos_embed": [prefix + "embeddings.position_embedding.weight"]}
    for s in ("weight", "bias"):
        m[f"vision.ln_pre.{s}"] = [prefix + f"pre_layrnorm.{s}"]
    for i in range(layers):
        src, dst = prefix + f"encoder.layers.{i}.", f"vision.blocks.{i}."
        for s in ("weight", "bias"):
            m[dst + f"wqkv.{s}"] = [src + f"self_attn.{p}_proj.{s}" for p in "qkv"]
            m[dst + f"wo.{s}"] = [src + f"self_attn.out_proj.{s}"]
            m[dst + f"ln1.{s}"] = [src + f"layer_norm1.{s}"]
            m[dst + f"ln2.{s}"] = [src + f"layer_norm2.{s}"]
            m[dst + f"fc1.{s}"] = [src + f"mlp.fc1.{s}"]
            m[dst + f"fc2.{s}"] = [src + f"mlp.fc2.{s}"]
    return m


def llama_layers_map(prefix: str, layers: int) -> dict[str, list[str]]:
    """transformers' LLaMA decoder layers (`prefix` = "model.layers.") -> lmmrt's decoder.layers.*:
    q/k/v and gate/up fused."""
    m: dict[str, list[str]] = {}
    for i in range(layers):
        m.update(llama_layer_map(prefix + f"{i}.", f"decoder.layers.{i}."))
    return m


def llama_layer_map(src: str, dst: str) -> dict[str, list[str]]:
    """One transformers LLaMA decoder layer (names under `src`) -> lmmrt's LlamaLayer under `dst`."""
    return {dst + "wqkv.weight": [src + f"self_attn.{p}_proj.weight" for p in "qkv"],
            dst + "wo.weight": [src + "self_attn.o_proj.weight"],
            dst + "w13.weight": [src + "mlp.gate_proj.weight", src + "mlp.up_proj.weight"],
            dst + "w2.weight": [src + "mlp.down_proj.weight"],
            dst + "attn_norm.weight": [src + "input_layernorm.weight"],
            dst + "mlp_norm.weight": [src + "post_attention_layernorm.weight"]}
