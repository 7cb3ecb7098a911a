"""What a killed checkpoint save leaves beside its target, and what the next save or load does with it.

save_checkpoint writes the new checkpoint into `.NAME.XXXXXXXX.partial` beside the target NAME and,
when NAME exists, renames the old one to `.NAME.XXXXXXXX.old/previous` before renaming the partial
to NAME (XXXXXXXX: tempfile.mkdtemp's eight random characters). Its writer holds an flock on each of
these directories while it works; the kernel drops the lock when the process dies, so an unlocked
one was left by a killed save (SIGKILL, power loss: nothing ran to clean up):
- a partial: an unfinished (or finished but never renamed) new checkpoint. The next save of NAME
  deletes it.
- `.old/previous` while NAME is missing: the save was killed between its two renames, and
  `previous` is the checkpoint NAME held. The next save of NAME renames it back first (so replacing
  it again needs force); a load of NAME says where it is.
- `.old` while NAME exists: killed after the new checkpoint was in place, before deleting the old
  one. The next save of NAME deletes it (only a save that replaces NAME, with force, gets there).
Only directories named exactly so, unlocked and, for deleting, unchanged for STALE_AFTER_S seconds
are touched (a new writer locks its directory a moment after creating it); a partial is deleted
only when it holds nothing but checkpoint files. Everything here is best effort: a leftover that
cannot be listed, locked or removed stays, and the save goes on.
"""

from __future__ import annotations

import fcntl
import os
import re
import shutil
import time
from pathlib import Path

PARTIAL = ".partial"
OLD = ".old"
PREVIOUS = "previous"  # the old checkpoint inside an .old directory
STALE_AFTER_S = 60.0


def leftover_prefix(out: Path) -> str:
    """The mkdtemp prefix of the directories a save of `out` makes beside it."""
    return f".{out.name}."


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
    """The checkpoint a killed save took from `out` (`.NAME.*.old/previous`), when `out` is missing
    and one is there; None otherwise."""
    if not _missing(out):
        return None
    for old in _leftovers(out, OLD):
        previous = old / PREVIOUS
        if previous.exists() or previous.is_symlink():
            return previous
    return None


def restore_interrupted_replace(out: Path) -> Path | None:
    """When `out` is missing because a save replacing it was killed between its two renames, rename
    the checkpoint it held back to `out`. Returns where it was restored from, else None."""
    previous = interrupted_previous(out)
    if previous is None:
        return None
    fd = _unlocked(previous.parent)
    if fd is None:  # a live save is between its renames: it puts one or the other in place itself
        return None
    try:
        if not _missing(out):
            return None
        os.rename(previous, out)
        os.rmdir(previous.parent)
    except OSError:
        return None
    finally:
        os.close(fd)
    return previous


def remove_stale_leftovers(out: Path, *, checkpoint_files: frozenset[str]) -> list[Path]:
    """Delete what killed saves of `out` left beside it (see the module docstring): partials holding
    only `checkpoint_files`, and `.old` directories unless they hold the checkpoint a missing `out`
    needs. Returns the paths deleted."""
    removed = []
    now = time.time()
    for path in _leftovers(out, PARTIAL) + _leftovers(out, OLD):
        fd = _unlocked(path)
        if fd is None:
            continue
        try:
            if now - path.lstat().st_mtime < STALE_AFTER_S:
                continue
            names = {p.name for p in path.iterdir()}
            if path.name.endswith(PARTIAL) and not names <= checkpoint_files:
                continue  # not what lmmrt writes there
            if path.name.endswith(OLD) and PREVIOUS in names and _missing(out):
                continue  # the only copy of the checkpoint `out` held
            shutil.rmtree(path)
            removed.append(path)
        except OSError:
            continue
        finally:
            os.close(fd)
    return removed
