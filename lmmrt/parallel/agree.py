"""What the ranks of a tensor-parallel group must agree on, checked with one small all-gather before
anything else is exchanged: at load, each rank's outcome and the identity of the checkpoint it read;
at each generate / logits call, a digest of its inputs. Ranks that disagree would otherwise answer
another rank's prompt (same shapes) or meet in mismatched collectives (gloo aborts, NCCL hangs)."""

from __future__ import annotations

import builtins
import dataclasses
import hashlib
import numbers
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from lmmrt import errors
from lmmrt.parallel.group import TensorParallel, TensorParallelError, check_group_alive

# Which bytes of a checkpoint's weights file identify it: reading all of it on every rank would double
# the load's I/O. Its start (the safetensors header: names, dtypes, shapes, offsets), its end, and
# blocks spread evenly between: a fine-tune that froze the first tensors changes the later bytes.
IDENTITY_HEAD_BYTES = 1 << 20
IDENTITY_TAIL_BYTES = 1 << 20
IDENTITY_BLOCKS = 8
IDENTITY_BLOCK_BYTES = 64 << 10

# The generation options lmmrt.generate reads as numbers: 0 and 0.0 are the same temperature.
_REAL_OPTIONS = ("temperature", "top_p", "repetition_penalty")
_INT_OPTIONS = ("max_new_tokens", "top_k", "seed")


def _feed(h, value) -> None:
    """Hash `value` into h, with its type, so that equal digests mean equal inputs ([1, 2] vs "12")."""
    # a list and a tuple alike: every sequence lmmrt takes may be either
    kind = "sequence" if isinstance(value, (list, tuple)) else type(value).__name__
    h.update(kind.encode() + b"\0")
    if value is None or isinstance(value, (bool, int, float, complex)):
        h.update(repr(value).encode())
    elif isinstance(value, str):
        h.update(value.encode("utf-8", "surrogatepass"))
    elif isinstance(value, (bytes, bytearray, memoryview)):
        h.update(bytes(value))
    elif isinstance(value, torch.Tensor):
        t = value.detach().cpu().contiguous()
        h.update(f"{t.dtype}{tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    elif isinstance(value, np.ndarray):
        h.update(f"{value.dtype}{value.shape}".encode())
        h.update(np.ascontiguousarray(value).tobytes())
    elif isinstance(value, dict):
        for k in sorted(value, key=repr):
            _feed(h, k)
            _feed(h, value[k])
    elif isinstance(value, (list, tuple)):
        h.update(str(len(value)).encode())
        for v in value:
            _feed(h, v)
    elif dataclasses.is_dataclass(value):  # a video clip: its frames, timestamps and indices
        _feed(h, {f.name: getattr(value, f.name) for f in dataclasses.fields(value)})
    elif hasattr(value, "tobytes") and hasattr(value, "mode") and hasattr(value, "size"):  # a PIL image
        h.update(f"{value.mode}{value.size}".encode())
        h.update(value.tobytes())
    else:  # anything else lmmrt.generate would refuse on every rank alike
        h.update(repr(value).encode())
    h.update(b"\1")


def digest(*values) -> str:
    h = hashlib.sha256()
    for v in values:
        _feed(h, v)
    return h.hexdigest()


def _differing(values: list) -> list[int]:
    """The ranks whose value differs from rank 0's."""
    return [r for r, v in enumerate(values) if v != values[0]]


def _stop_token_ids(ids):
    if isinstance(ids, (torch.Tensor, np.ndarray)):
        ids = ids.reshape(-1).tolist()
    if isinstance(ids, numbers.Integral):
        ids = [ids]
    if any(isinstance(t, bool) for t in ids):  # refused by the call: kept as given
        raise TypeError("stop_token_ids holds a bool")
    return sorted(int(t) for t in ids)  # a set of stop tokens: the order does not matter


def _canonical(inputs: dict) -> dict:
    """The inputs as the call will use them (prompts and images nested as lmmrt.generate nests them,
    numbers as the numbers it reads), so that equal calls spelled differently digest alike. An input
    the call will refuse stays as given: every rank refuses it alike, or the digests differ."""
    from lmmrt.runtime.batch import normalize_images, normalize_prompts

    out = dict(inputs)
    try:
        out["prompts"] = normalize_prompts(inputs["prompts"])
        out["images"] = normalize_images(inputs.get("images"), [0] * len(out["prompts"]))
    except (KeyError, TypeError, ValueError):
        pass
    for name, kind, cast in [(n, numbers.Real, float) for n in _REAL_OPTIONS] + \
                            [(n, numbers.Integral, int) for n in _INT_OPTIONS]:
        value = inputs.get(name)
        if isinstance(value, kind) and not isinstance(value, bool):
            out[name] = cast(value)
    stop = inputs.get("stop")
    if stop is None or isinstance(stop, str):
        out["stop"] = [] if stop is None else [stop]
    if "stop_token_ids" in inputs:
        try:
            out["stop_token_ids"] = _stop_token_ids([] if inputs["stop_token_ids"] is None
                                                    else inputs["stop_token_ids"])
        except (TypeError, ValueError):
            pass
    return out


def input_digest(call: str, **inputs) -> str:
    """The digest the ranks compare for a call of `call` with `inputs` (keyword arguments as given)."""
    return digest(call, _canonical(inputs))


def agree_on_inputs(tp: TensorParallel, call: str, **inputs) -> None:
    """Raise TensorParallelError on every rank unless every rank passed the same inputs to `call`
    (compared by digest, after normalizing); also when the model's group has ended. The first
    collective of each call."""
    check_group_alive(tp)
    mine = input_digest(call, **inputs)
    digests: list = [None] * tp.size
    dist.all_gather_object(digests, mine, group=tp.group)
    differ = _differing(digests)
    if differ:
        names = ", ".join(str(r) for r in differ)
        raise TensorParallelError(
            f"{call}: rank{'s' if len(differ) > 1 else ''} {names} of {tp.size} passed other inputs than rank 0 "
            f"(prompts, images or generation arguments; compared by digest): every rank of a tensor-parallel "
            f"model must make the same call with the same arguments")


def _identifying_bytes(fh, size: int) -> list[bytes]:
    """The start and end of an open file of `size` bytes and IDENTITY_BLOCKS blocks evenly spaced
    over it (all of it when it is small)."""
    starts = [0, max(size - IDENTITY_TAIL_BYTES, 0)]
    lengths = [IDENTITY_HEAD_BYTES, IDENTITY_TAIL_BYTES]
    for i in range(IDENTITY_BLOCKS):
        starts.append(size * (2 * i + 1) // (2 * IDENTITY_BLOCKS))
        lengths.append(IDENTITY_BLOCK_BYTES)
    out = []
    for start, length in zip(starts, lengths):
        fh.seek(start)
        out.append(fh.read(length))
    return out


def checkpoint_identity(path, dtype: torch.dtype | None) -> str:
    """A digest of what a rank loads: its config.json and tokenizer.json, its weights file's size,
    start (the safetensors header), end and blocks evenly spaced between, and the dtype asked for."""
    from lmmrt.runtime.weights import CONFIG, TOKENIZER, WEIGHTS

    path = Path(path)
    parts: list = [str(dtype)]
    for name in (CONFIG, TOKENIZER, WEIGHTS):
        f = path / name
        try:
            with open(f, "rb") as fh:
                size = f.stat().st_size
                parts += [name, size, _identifying_bytes(fh, size)]
        except OSError:
            parts += [name, None]
    return digest(*parts)


def _same_kind(kind: str, message: str) -> Exception:
    """An exception of the failed rank's type when it is one of Python's or lmmrt's own (so that callers
    catching CheckpointError or FileNotFoundError see the same on every rank), else TensorParallelError."""
    cls = getattr(errors, kind, None) or getattr(builtins, kind, None)
    if isinstance(cls, type) and issubclass(cls, Exception):
        try:
            return cls(message)
        except TypeError:  # a constructor wanting more than a message
            pass
    return TensorParallelError(message)


def agree_on_load(tp: TensorParallel, error: BaseException | None, identity: str | None) -> None:
    """Exchange every rank's load outcome and checkpoint identity; when any rank failed, raise on every
    rank: the failed rank its own exception, the others one of the same type naming that rank; when the
    ranks loaded different checkpoints (or configs, or dtypes), TensorParallelError naming them. Called
    by every rank after its load, whether it failed or not, so that no rank is left waiting in a
    collective."""
    outcome = None if error is None else (type(error).__name__, str(error))
    outcomes: list = [None] * tp.size
    dist.all_gather_object(outcomes, (outcome, identity), group=tp.group)
    failed = [(r, o) for r, (o, _) in enumerate(outcomes) if o is not None]
    if failed:
        if error is not None:
            raise error
        r, (kind, message) = failed[0]
        raise _same_kind(kind, f"rank {r} of {tp.size} failed while loading: {message}")
    differ = _differing([ident for _, ident in outcomes])
    if differ:
        names = ", ".join(str(r) for r in differ)
        raise TensorParallelError(
            f"rank{'s' if len(differ) > 1 else ''} {names} of {tp.size} loaded another checkpoint than rank 0 "
            f"(its config.json, tokenizer.json, weights file or dtype differ): every rank must load the same one")


def broadcast_seed(tp: TensorParallel, seed: int | None) -> int:
    """One sampling seed for every rank (rank 0's): ranks that sampled differently would feed different
    tokens to the same collectives."""
    if seed is None:
        seed = int(torch.randint(0, 2**62, ()).item())
    box = [seed]
    dist.broadcast_object_list(box, src=0, group=tp.group)
    return box[0]
