"""Writing an lmmrt checkpoint so that nothing is ever lost.

Every writer of lmmrt (`lmmrt convert`, `lmmrt demo --save`, `Model.save`) goes through
`save_checkpoint`, which
- refuses an existing output unless `force` (call `check_output_path` before any expensive work,
  so a refusal costs nothing), and even with `force` never touches a source: the output may not be
  a source, lie inside a source directory, or contain a source;
- writes into a temporary directory beside the target, fsyncs each file and the directory, then
  renames it into place: an existing checkpoint stays intact until the new one is complete;
- on failure (a full disk, ...) removes the partial output and raises an OSError that says what
  happened while writing which file;
- takes turns with every other save into the same directory (an flock on it, which leaves nothing
  behind), so concurrent saves of one target each replace it whole, one after the other; a turn
  not given within save_leftovers.TURN_TIMEOUT_S is a clear error, never a silent hang;
- after a save that was killed (nothing ran to clean up), deletes what it left, and only what it
  provably left; it never moves anything back (lmmrt/runtime/save_leftovers.py says what and when).
The temporary directory's name is the target's plus 18 bytes (`.NAME.XXXXXXXX.partial`), so a
target name longer than the file system's limit less 18 (237 bytes of 255) is refused up front.

model.safetensors is written here, tensor by tensor straight from the tensors' memory (the format
is an 8-byte header length, a JSON header, then the raw bytes): no second copy of the model is
built on the way, and an I/O error arrives as an OSError with its errno.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import struct
import tempfile
from pathlib import Path

import torch

from lmmrt.models.config import ModelConfig
from lmmrt.models.xattn import GatedCrossAttention
from lmmrt.runtime.save_leftovers import (
    OLD,
    PARTIAL,
    PARTIAL_CHECKPOINT,
    PREVIOUS,
    TurnTimeoutError,
    make_save_directory,
    remove_stale_leftovers,
    take_turn,
)
from lmmrt.runtime.weights import CHAT_TEMPLATE, CONFIG, TOKENIZER, WEIGHTS

CHECKPOINT_FILES = frozenset({CONFIG, WEIGHTS, TOKENIZER, CHAT_TEMPLATE})

SAFETENSORS_DTYPES = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
    torch.bool: "BOOL",
}


# A gate already folded into its output matrix is saved as this value: tanh(32.0) is exactly 1.0
# in float32 (what folding computes in, for every storage dtype), so a loader that folds tanh(gate)
# again, or applies it unfolded, leaves the branch as it was. Zero gates stay zero (branch off).
TANH_NEUTRAL_GATE = 32.0

# What the temporary directory's name adds to the target's: ".", ".XXXXXXXX" (mkdtemp's), ".partial"
TEMPORARY_NAME_EXTRA = 1 + 9 + len(PARTIAL)


class OutputExistsError(FileExistsError):
    """The output path exists and replacing it was not asked for (or is never allowed)."""


class OutputIsSourceError(ValueError):
    """The output would overwrite, or be written into, one of the inputs."""


class BadOutputPathError(ValueError):
    """The output path can never be a checkpoint directory (empty, the file-system root, ...)."""


def _output_path(out) -> Path:
    """`out` as an absolute Path ("." and ".." resolved lexically: a link at `out` stays a link), or
    a clear error for what cannot be one."""
    if not isinstance(out, (str, os.PathLike)) or not isinstance(os.fspath(out), str):
        raise TypeError(f"the output path must be a str or a pathlib.Path, not {type(out).__name__} ({out!r})")
    text = os.fspath(out)
    if not text:  # abspath("") is the current directory, which nobody means by it
        raise BadOutputPathError("the output path is empty; name the checkpoint directory to write")
    if "\0" in text:
        raise BadOutputPathError(f"the output path {text!r} holds a NUL character")
    path = Path(os.path.abspath(text))
    if path == path.parent:
        raise BadOutputPathError(f"cannot write a checkpoint at {text}: it is the root of the file system; "
                                 f"choose a directory below it")
    return path


def _existing_parent(path: Path) -> Path:
    """The nearest directory above `path` that exists (the one the output would be created in)."""
    for p in path.parents:
        try:
            if p.exists():
                return p
        except OSError:  # a name too long in it, ...: no directory there
            continue
    return Path(path.anchor)


def _check_name_length(out: Path) -> None:
    """Refuse a name that fits the file system but not the save's temporary directory beside it,
    which would otherwise fail with "File name too long" naming `out`, after all the work."""
    try:
        limit = os.pathconf(_existing_parent(out), "PC_NAME_MAX")
    except (OSError, ValueError):
        limit = 255  # Linux's and macOS's file systems
    length = len(os.fsencode(out.name))
    if length + TEMPORARY_NAME_EXTRA > limit:
        raise BadOutputPathError(
            f"cannot write a checkpoint at {out}: its name is {length} bytes long, and a save writes first into "
            f"a temporary directory .NAME.XXXXXXXX{PARTIAL} beside it, {TEMPORARY_NAME_EXTRA} bytes longer, over "
            f"this file system's limit of {limit} bytes a name; choose a name of at most "
            f"{limit - TEMPORARY_NAME_EXTRA} bytes")


def _inside(path: Path, parent: Path) -> bool:
    return path == parent or parent in path.parents


def _resolved(path: Path) -> Path:
    """The path with links followed as far as they go (a symlink loop stops there, Python <= 3.12
    raises for it instead)."""
    try:
        return path.resolve()
    except (OSError, RuntimeError):
        return Path(os.path.abspath(path))


def check_output_path(out: str | Path, *, sources=(), force: bool = False) -> Path:
    """Check that `out` may be written: it does not exist (or `force` and it is a file or an lmmrt
    checkpoint directory), and it neither is, lies inside, nor contains any of `sources` (files or
    directories the output is made from; compared by resolved path, so links and `..` do not fool
    it). Returns `out` as a Path. Raises OutputExistsError / OutputIsSourceError, NotADirectoryError
    when a file stands where a directory above `out` should be, PermissionError when the directory
    `out` would be written in lacks a permission the save needs, BadOutputPathError for an empty
    path, the root or a name too long (see the module docstring), TypeError for a path or `force` of
    the wrong type."""
    if not isinstance(force, bool):  # force="no" would count as true
        raise TypeError(f"force must be True or False, not {force!r}")
    out = _output_path(out)
    _check_name_length(out)
    parent = _existing_parent(out)
    if not parent.is_dir():  # else mkdir says only "[Errno 17] File exists: '<the file>'"
        raise NotADirectoryError(f"cannot write {out}: {parent} is a file, not a directory")
    _check_permissions(out, parent)
    target = _resolved(out)
    for src in sources:
        if src is None:
            continue
        s = _resolved(Path(src))
        if _inside(target, s) if s.is_dir() else target == s:
            raise OutputIsSourceError(f"refusing to write {out}: it is {'inside ' if target != s else ''}the source "
                                      f"{src}, which would be overwritten; choose another output path")
        if _inside(s, target):
            raise OutputIsSourceError(f"refusing to write {out}: it contains the source {src}, which replacing it "
                                      f"would delete; choose another output path")
    if out.is_symlink() or out.exists():
        if not force:
            raise OutputExistsError(f"{out} already exists; choose a new path, or pass force=True (--force) "
                                    f"to replace it")
        if out.is_dir() and not out.is_symlink():
            try:
                foreign = sorted(p.name for p in out.iterdir() if p.name not in CHECKPOINT_FILES)
            except (FileNotFoundError, NotADirectoryError):  # a save (without our turn) is replacing it
                foreign = []
            if foreign:
                raise OutputExistsError(
                    f"refusing to replace {out}, even with force: it is not an lmmrt checkpoint (it holds "
                    f"{', '.join(foreign[:5])}{' ...' if len(foreign) > 5 else ''})")
    return out


def _check_permissions(out: Path, parent: Path) -> None:
    """Refuse, before any work, a directory the save cannot write in (else a conversion fails only at
    its end): creating and renaming entries needs write and search (x) permission on `parent`, and the
    turn's lock opens `out`'s own directory for reading (a directory still to be created is ours)."""
    needed = [(os.W_OK, "write"), (os.X_OK, "search (x)")]
    if parent == out.parent:
        needed.insert(0, (os.R_OK, "read"))
    missing = [name for mode, name in needed if not os.access(parent, mode)]
    if missing:
        err = PermissionError(f"cannot write {out}: no {' or '.join(missing)} permission on the directory "
                              f"{parent}, which a save needs to create it there")
        err.errno = errno.EACCES
        raise err


def state_for_saving(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """A module's state dict as a checkpoint must hold it: the gates of blocks whose gates were
    folded into wo / ff_w2 (lmmrt.Model folds them at load) are replaced by TANH_NEUTRAL_GATE, so
    they are not applied a second time when the checkpoint is loaded."""
    state = module.state_dict()
    for prefix, blk in module.named_modules():
        if isinstance(blk, GatedCrossAttention) and blk.gates_folded:
            for name in ("attn_gate", "ff_gate"):
                g = getattr(blk, name).detach()
                state[f"{prefix}.{name}"] = torch.where(g == 0, g, torch.full_like(g, TANH_NEUTRAL_GATE))
    return state


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _tensor_bytes(t: torch.Tensor):
    """The tensor's raw little-endian bytes as a buffer, without a copy when it is already a
    contiguous CPU tensor."""
    t = t.detach().contiguous().cpu()
    return t.reshape(-1).view(torch.uint8).numpy().data


def _safetensors_header(state: dict[str, torch.Tensor], metadata: dict[str, str]) -> bytes:
    header: dict = {"__metadata__": metadata}
    offset = 0
    for name, t in state.items():
        if t.dtype not in SAFETENSORS_DTYPES:
            raise TypeError(f"tensor {name!r} has dtype {t.dtype}, which an lmmrt checkpoint cannot store")
        n = t.numel() * t.element_size()
        header[name] = {"dtype": SAFETENSORS_DTYPES[t.dtype], "shape": list(t.shape),
                        "data_offsets": [offset, offset + n]}
        offset += n
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the data starts 8-byte aligned, as safetensors writes it
    return struct.pack("<Q", len(raw)) + raw


def write_safetensors(path: Path, state: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    """Write `state` as a safetensors file (readable by safetensors.safe_open), then fsync it."""
    with open(path, "wb") as f:
        f.write(_safetensors_header(state, metadata))
        for t in state.values():
            if t.numel():
                f.write(_tensor_bytes(t))
        f.flush()
        os.fsync(f.fileno())


def write_bytes(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _tokenizer_bytes(tokenizer) -> bytes:
    """A tokenizer.json path (copied as it is) or a tokenizer object with to_str()/save()."""
    if isinstance(tokenizer, (str, Path)):
        return Path(tokenizer).read_bytes()
    if hasattr(tokenizer, "to_str"):  # tokenizers.Tokenizer
        return tokenizer.to_str().encode()
    with tempfile.TemporaryDirectory() as d:  # lmmrt's Tokenizer and others that only save to a file
        tokenizer.save(Path(d) / TOKENIZER)
        return (Path(d) / TOKENIZER).read_bytes()


def _describe_failure(e: OSError, what: Path) -> str:
    if e.errno == errno.ENOSPC:
        reason = "no space left on device"
    elif e.errno == errno.EDQUOT:
        reason = "disk quota exceeded"
    else:
        reason = e.strerror or str(e)
    return f"{reason} while writing {what}"


def save_checkpoint(out_dir: str | Path, cfg: ModelConfig, state: dict[str, torch.Tensor], *,
                    tokenizer=None, metadata: dict | None = None, sources=(), force: bool = False,
                    extra_files: dict[str, bytes] | None = None) -> Path:
    """Write an lmmrt checkpoint directory atomically: config.json, model.safetensors and, when
    given, tokenizer.json (`tokenizer`: a tokenizer.json path, a `tokenizers.Tokenizer` or an
    lmmrt Tokenizer). `sources`: the paths it is made from, never overwritten (see
    check_output_path); `force`: replace an existing output; `extra_files`: file name -> bytes
    written beside them (only the optional files of the format: chat_template.jinja). Returns the
    output path.

    Saves into one directory take turns: one waits for another to finish (saying so once, and for at
    most save_leftovers.TURN_TIMEOUT_S: then save_leftovers.TurnTimeoutError). A save killed midway
    (nothing ran to clean up) is dealt with by the next save of the same path: its partial output,
    or the old checkpoint it was replacing, is deleted, never moved back (lmmrt/runtime/
    save_leftovers.py: which directories, and when; never one lmmrt did not write). An OSError names
    `out_dir` or the file in it being written, never the temporary directory."""
    bad = [name for name in (extra_files or {}) if name not in CHECKPOINT_FILES - {CONFIG, WEIGHTS, TOKENIZER}]
    if bad:
        raise ValueError(f"extra checkpoint files {bad}: the format's optional files are {CHAT_TEMPLATE}")
    out = check_output_path(out_dir, sources=sources, force=force)  # before any work, and without waiting
    meta = {"format": "lmmrt", "format_version": str(cfg.format_version)}
    meta.update({k: str(v) for k, v in (metadata or {}).items()})
    tok_bytes = None if tokenizer is None else _tokenizer_bytes(tokenizer)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        turn = take_turn(out.parent)
    except TurnTimeoutError:  # already says what and where
        raise
    except OSError as e:  # a read-only parent, ...: named by `out`, not by a random temporary name
        raise _write_error(e, out) from None
    try:
        check_output_path(out, sources=sources, force=force)  # again: another save may have finished meanwhile
        _write_checkpoint(out, cfg, state, meta, tok_bytes, extra_files or {})
    finally:
        os.close(turn)
    return out


def _write_checkpoint(out: Path, cfg: ModelConfig, state: dict[str, torch.Tensor], meta: dict[str, str],
                      tok_bytes: bytes | None, extra_files: dict[str, bytes]) -> None:
    """save_checkpoint's writing, in its turn: into `.NAME.XXXXXXXX.partial/checkpoint`, then renamed to
    `out`; the partial directory, which holds only its marker then, goes last."""
    try:
        remove_stale_leftovers(out, checkpoint_files=CHECKPOINT_FILES)
        partial, lock = make_save_directory(out, PARTIAL)
    except OSError as e:  # a read-only parent, ...: named by `out`, not by a random temporary name
        raise _write_error(e, out) from None
    tmp = current = partial / PARTIAL_CHECKPOINT
    try:
        tmp.mkdir()
        current = tmp / CONFIG
        write_bytes(current, (json.dumps(cfg.to_dict(), indent=2) + "\n").encode())
        current = tmp / WEIGHTS
        write_safetensors(current, state, meta)
        if tok_bytes is not None:
            current = tmp / TOKENIZER
            write_bytes(current, tok_bytes)
        for name, data in extra_files.items():
            current = tmp / name
            write_bytes(current, data)
        current = tmp
        tmp.chmod(0o755)  # whatever the umask: a checkpoint is shared like any other directory
        _fsync_dir(tmp)
        current = out
        _replace(tmp, out)
        shutil.rmtree(partial, ignore_errors=True)  # killed before this, the next save deletes it
        _fsync_dir(out.parent)
    except OSError as e:
        shutil.rmtree(partial, ignore_errors=True)
        raise _write_error(e, out / current.name if current.parent == tmp else out) from None
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    finally:
        os.close(lock)


def _write_error(e: OSError, where: Path) -> OSError:
    """One plain sentence naming `where`, of e's class (PermissionError, ...) and with its errno."""
    err = (type(e) if type(e).__module__ == "builtins" else OSError)(_describe_failure(e, where))
    err.errno = e.errno
    return err


def _replace(new: Path, out: Path) -> None:
    """Rename `new` to `out`. An existing `out` is first renamed aside (into `.NAME.*.old/previous`,
    locked meanwhile) and only deleted once `new` is in place; if that fails it is put back. A
    process killed in between leaves it there (a load of the missing `out` says where), and the next
    save deletes it (save_leftovers)."""
    if not (out.is_symlink() or out.exists()):
        os.rename(new, out)
        return
    old, lock = make_save_directory(out, OLD)
    try:
        aside = old / PREVIOUS
        try:
            os.rename(out, aside)
        except BaseException:
            shutil.rmtree(old, ignore_errors=True)
            raise
        try:
            os.rename(new, out)
        except BaseException:
            os.rename(aside, out)
            shutil.rmtree(old, ignore_errors=True)
            raise
        shutil.rmtree(old)  # removes a symlink `aside` itself, never what it points to
    finally:
        os.close(lock)
