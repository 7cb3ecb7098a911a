"""What a killed checkpoint save leaves beside its target, what the next save does with it, and
how saves into one directory take turns.

save_checkpoint writes the new checkpoint into `.NAME.XXXXXXXX.partial/checkpoint` beside the
target NAME and, when NAME exists, renames the old one to `.NAME.XXXXXXXX.old/previous` before
renaming the new one to NAME (XXXXXXXX: tempfile.mkdtemp's eight random characters); then it deletes
both directories. Right after creating each of them it flocks it and writes MARKER into it, a file
naming that very directory: only a directory holding its own marker (checked by content, so a copy
under another name does not count) is lmmrt's, and no other is ever deleted, whatever its name. The
kernel drops a writer's lock when the process dies, so a marked and unlocked directory was left by
a killed save (SIGKILL, power loss: nothing ran to clean up):
- a partial: an unfinished (or finished but never renamed) new checkpoint, or nothing but the
  marker. The next save of NAME deletes it.
- an `.old`: the checkpoint a forced save was replacing. Its replacement was asked for, so the next
  save of NAME deletes it too. Nothing is ever moved back to NAME: whether NAME is missing because
  of the kill or because its user removed or renamed it afterwards cannot be told apart, and moving
  an old generation back in the second case would undo what the user did. While NAME is missing, a
  load of NAME says where the old checkpoint is (interrupted_previous).
A partial is deleted only when it holds nothing but its marker and a checkpoint directory of
checkpoint files. Saves into one directory take turns (take_turn: an flock on it), so the next save
never meets a live one's directories; their own locks keep a bare check_output_path, which takes no
turn, off them. Everything here is best effort: a leftover that cannot be read, locked or removed
stays, and the save goes on. Where the file system has no locks, nothing is ever cleaned up.
"""

from __future__ import annotations

import fcntl
import os
import re
import shutil
import tempfile
import time
import warnings
from pathlib import Path

PARTIAL = ".partial"
OLD = ".old"
PREVIOUS = "previous"  # the old checkpoint inside an .old directory
PARTIAL_CHECKPOINT = "checkpoint"  # the new checkpoint inside a .partial directory
MARKER = ".lmmrt-save"  # in each .partial and .old directory: it is lmmrt's (see the module docstring)
# How long a save waits for its turn in a directory before giving up: a save of a large model takes
# seconds to a minute, and anything else holding an flock on the directory (any local user can flock
# /tmp) must not make a save wait forever.
TURN_TIMEOUT_S = 60.0
TURN_POLL_S = 0.1


class TurnTimeoutError(TimeoutError):
    """Another process held the lock on the output's directory for longer than TURN_TIMEOUT_S."""


def leftover_prefix(out: Path) -> str:
    """The mkdtemp prefix of the directories a save of `out` makes beside it."""
    return f".{out.name}."


def _marker_text(directory: Path) -> bytes:
    return b"written by lmmrt's save_checkpoint into " + os.fsencode(directory.name) + b"\n"


def make_save_directory(out: Path, suffix: str) -> tuple[Path, int]:
    """A new `.NAME.XXXXXXXX<suffix>` directory beside `out`, locked and marked as lmmrt's, and the
    descriptor holding its lock (the caller closes it once the directory is gone or renamed)."""
    path = Path(tempfile.mkdtemp(prefix=leftover_prefix(out), suffix=suffix, dir=out.parent))
    try:
        fd = lock_directory(path)
    except BaseException:
        os.rmdir(path)
        raise
    try:  # after the lock: a marked directory is a live save's exactly while it is locked
        (path / MARKER).write_bytes(_marker_text(path))
    except BaseException:
        shutil.rmtree(path, ignore_errors=True)
        os.close(fd)
        raise
    return path, fd


def _is_lmmrts(path: Path) -> bool:
    """Whether `path` holds the marker a save wrote into it (and not into some other directory)."""
    try:
        with open(path / MARKER, "rb") as f:
            return f.read(4096) == _marker_text(path)
    except OSError:
        return False


def lock_directory(path: Path) -> int:
    """An open descriptor of the directory `path`, flock'ed (exclusive) until it is closed. Where the
    file system has no locks (some network mounts: ENOLCK) it stays unlocked, and so does every
    leftover there to _unlocked: those are then never touched, and saving still works."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
    except OSError:
        pass
    except BaseException:
        os.close(fd)
        raise
    return fd


def take_turn(directory: Path) -> int:
    """An open descriptor of `directory` holding its flock (exclusive) until it is closed: saves into one
    directory take turns. When another process holds the lock, says so once (a warning) and polls for up
    to TURN_TIMEOUT_S, then raises TurnTimeoutError naming `directory`. Where the file system has no
    locks (ENOLCK) it goes on unlocked, like lock_directory."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        deadline = None
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return fd
            except BlockingIOError:
                pass
            except OSError:
                return fd
            if deadline is None:
                deadline = time.monotonic() + TURN_TIMEOUT_S
                warnings.warn(f"waiting for another save into {directory} to finish (up to {TURN_TIMEOUT_S:g} s)",
                              stacklevel=3)
            elif time.monotonic() >= deadline:
                raise TurnTimeoutError(
                    f"gave up saving into {directory} after waiting {TURN_TIMEOUT_S:g} s: another process holds "
                    f"its lock (another save, or anything else holding an flock on {directory}); try again later, "
                    f"or save elsewhere")
            time.sleep(TURN_POLL_S)
    except BaseException:
        os.close(fd)
        raise


def _leftovers(out: Path, suffix: str) -> list[Path]:
    """The directories beside `out` that a save of `out` names so (mkdtemp's eight random characters),
    newest first; [] when the parent cannot be listed."""
    pattern = re.compile(re.escape(leftover_prefix(out)) + r"[a-z0-9_]{8}" + re.escape(suffix))
    try:
        found = [p for p in out.parent.iterdir()
                 if pattern.fullmatch(p.name) and p.is_dir() and not p.is_symlink()]
        return sorted(found, key=lambda p: p.lstat().st_mtime, reverse=True)
    except OSError:
        return []


def _unlocked(path: Path) -> int | None:
    """A descriptor holding `path`'s lock when no writer holds it (the caller closes it), else None."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        return None
    return fd


def _missing(out: Path) -> bool:
    return not (out.exists() or out.is_symlink())


def interrupted_previous(out: Path) -> Path | None:
    """The checkpoint an interrupted save of `out` was replacing (`.NAME.*.old/previous`, in a directory
    marked as lmmrt's), when `out` is missing and one is there; None otherwise. It says nothing of why
    `out` is missing (see the module docstring)."""
    if not _missing(out):
        return None
    for old in _leftovers(out, OLD):
        previous = old / PREVIOUS
        if (previous.exists() or previous.is_symlink()) and _is_lmmrts(old):
            return previous
    return None


def _holds_only(partial: Path, names: set[str], checkpoint_files: frozenset[str]) -> bool:
    """Whether a partial directory holds its marker and at most a directory of checkpoint files."""
    if not names <= {MARKER, PARTIAL_CHECKPOINT}:
        return False
    new = partial / PARTIAL_CHECKPOINT
    if PARTIAL_CHECKPOINT not in names:
        return True
    return new.is_dir() and not new.is_symlink() and {p.name for p in new.iterdir()} <= checkpoint_files


def remove_stale_leftovers(out: Path, *, checkpoint_files: frozenset[str]) -> list[Path]:
    """Delete what killed saves of `out` left beside it (see the module docstring): partials holding
    only `checkpoint_files`, and `.old` directories; only those marked as lmmrt's and unlocked.
    Returns the paths deleted."""
    removed = []
    for path in _leftovers(out, PARTIAL) + _leftovers(out, OLD):
        fd = _unlocked(path)
        if fd is None:
            continue
        try:
            if not _is_lmmrts(path):
                continue  # a user's, named like ours
            names = {p.name for p in path.iterdir()}
            if path.name.endswith(PARTIAL) and not _holds_only(path, names, checkpoint_files):
                continue  # not what lmmrt writes there
            shutil.rmtree(path)
            removed.append(path)
        except OSError:
            continue
        finally:
            os.close(fd)
    return removed
