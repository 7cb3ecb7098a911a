"""Model.save's path edge cases get a clear error naming the path given, and what a killed save
leaves beside its target is deleted by the next save, never moved back (lmmrt/runtime/save_leftovers.py),
and a load of the missing target says where the checkpoint it was replacing is.
A kill is simulated by raising a BaseException at the point it would strike, with every clean-up
after that point (renames back, rmtree) turned off, as a dead process runs none."""

from __future__ import annotations

import errno
import os
import re
import shutil
import tempfile

import pytest
from serve_util import tiny_model

import lmmrt
from lmmrt.runtime.checkpoint_writer import BadOutputPathError, OutputExistsError
from lmmrt.runtime.save_leftovers import MARKER, lock_directory


class Killed(BaseException):
    """What the process would have died of."""


@pytest.fixture(scope="module")
def model():
    return tiny_model("llava")


def _snapshot(path):
    return {p.name: p.read_bytes() for p in sorted(path.iterdir())}


def _beside(out):
    return sorted(p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}."))


def test_unwritable_parent_names_the_requested_path(model, tmp_path, monkeypatch):
    real = tempfile.mkdtemp

    def denied(suffix=None, prefix=None, dir=None):  # what mkdtemp raises in a read-only directory (root: any)
        if dir is None:  # not the checkpoint's: a tokenizer saved through a temporary directory
            return real(suffix, prefix, dir)
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), os.path.join(dir, f"{prefix}m6yqbh0i{suffix}"))

    monkeypatch.setattr(tempfile, "mkdtemp", denied)
    with pytest.raises(PermissionError) as e:
        model.save(tmp_path / "a")
    assert str(tmp_path / "a") in str(e.value) and ".partial" not in str(e.value), str(e.value)
    assert e.value.errno == errno.EACCES and list(tmp_path.iterdir()) == []


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only directories")
def test_read_only_parent_names_the_requested_path(model, tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        for out in (ro / "a", ro / "b" / "c"):
            with pytest.raises(PermissionError, match=re.escape(f"cannot write {out}: no write permission on the "
                                                                f"directory {ro}")):
                model.save(out)
    finally:
        ro.chmod(0o755)


@pytest.mark.parametrize(("allowed", "missing"), [(os.R_OK | os.X_OK, "write"), (os.W_OK | os.X_OK, "read"),
                                                  (os.R_OK | os.W_OK, "search (x)")], ids=["555", "333", "666"])
def test_a_parent_lacking_a_permission_is_refused_before_any_work(model, tmp_path, monkeypatch, allowed, missing):
    """chmod 555 / 333 / 666 as os.access reports it to a user who is not root (the tests run as root,
    who may do anything): refused up front, naming the directory and the permission, not after the
    whole conversion as "Permission denied while writing P/out"."""
    parent, real_access = tmp_path / "p", os.access
    parent.mkdir()

    def access(path, flags, **k):
        if os.fspath(path) == str(parent):
            return flags & ~allowed == 0
        return real_access(path, flags, **k)

    monkeypatch.setattr(os, "access", access)
    monkeypatch.setattr("lmmrt.runtime.checkpoint_writer.write_safetensors",
                        lambda *a, **k: pytest.fail("the save got to writing"))
    for out in (parent / "a", parent / "b" / "c"):
        if out.parent != parent and missing == "read":
            continue  # a directory the save creates itself is its own to read
        with pytest.raises(PermissionError, match=re.escape(f"cannot write {out}: no {missing} permission on the "
                                                            f"directory {parent}")) as e:
            model.save(out)
        assert e.value.errno == errno.EACCES
    assert list(parent.iterdir()) == []


@pytest.mark.parametrize("force", [False, True])
def test_the_root_is_refused(model, force):
    with pytest.raises(BadOutputPathError, match="cannot write a checkpoint at /: it is the root"):
        model.save("/", force=force)


def test_an_empty_path_is_refused_not_taken_for_the_current_directory(model, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(BadOutputPathError, match="the output path is empty"):
        model.save("", force=True)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("path", [None, b"/tmp/ckpt", 3], ids=["None", "bytes", "int"])
def test_a_path_of_the_wrong_type_is_refused(model, path):
    with pytest.raises(TypeError, match="the output path must be a str or a pathlib.Path"):
        model.save(path)


@pytest.mark.parametrize("force", ["no", 1, None])
def test_force_must_be_a_bool(model, tmp_path, force):
    model.save(tmp_path / "ckpt")
    before = _snapshot(tmp_path / "ckpt")
    with pytest.raises(TypeError, match=re.escape(f"force must be True or False, not {force!r}")):
        model.save(tmp_path / "ckpt", force=force)
    assert _snapshot(tmp_path / "ckpt") == before


def _kill(monkeypatch, *, at_rename: int | None = None, at_rmtree_of: str | None = None, writing: bool = False):
    """Patch the writer so that it dies at the given point: the at_rename-th os.rename, the rmtree of a
    path ending in at_rmtree_of, or while writing the weights; nothing runs after that."""
    real_rename, real_rmtree, state = os.rename, shutil.rmtree, {"renames": 0, "dead": False}

    def die():
        state["dead"] = True
        raise Killed

    def rename(a, b):
        state["renames"] += 1
        if state["dead"] or state["renames"] == at_rename:
            die()
        return real_rename(a, b)

    def rmtree(path, *a, **k):
        if state["dead"]:
            return None
        if at_rmtree_of is not None and str(path).endswith(at_rmtree_of):
            die()
        return real_rmtree(path, *a, **k)

    def write_safetensors(*a, **k):
        die()

    monkeypatch.setattr(os, "rename", rename)
    monkeypatch.setattr(shutil, "rmtree", rmtree)
    if writing:
        monkeypatch.setattr("lmmrt.runtime.checkpoint_writer.write_safetensors", write_safetensors)


def test_a_killed_saves_partial_is_removed_by_the_next_save(model, tmp_path, monkeypatch):
    out = tmp_path / "ckpt"
    with monkeypatch.context() as m, pytest.raises(Killed):
        _kill(m, writing=True)
        model.save(out)
    [stale] = [tmp_path / n for n in _beside(out)]
    assert stale.name.endswith(".partial") and not out.exists()
    # what must stay: another target's, not named by mkdtemp, unmarked, marked but holding a foreign
    # file, marked but locked (a live save's)
    keep = [tmp_path / n for n in (".other.abcdefgh.partial", ".ckpt.mine.partial", ".ckpt.unmarked.partial",
                                   ".ckpt.zzzzzzzz.partial", ".ckpt.lockedxx.partial")]
    for p in keep:
        shutil.copytree(stale, p)
        (p / MARKER).write_bytes((stale / MARKER).read_bytes().replace(stale.name.encode(), p.name.encode()))
    (keep[2] / MARKER).unlink()
    (keep[3] / "notes.txt").write_text("not a checkpoint file")
    fd = lock_directory(keep[4])
    try:
        model.save(out)
    finally:
        os.close(fd)
    assert not stale.exists() and out.is_dir()
    assert all(p.exists() for p in keep)


def test_a_kill_between_the_two_renames_leaves_the_old_checkpoint_where_load_says(model, tmp_path, monkeypatch):
    out = tmp_path / "ckpt"
    tiny_model("llava", seed=9).save(out)
    with monkeypatch.context() as m, pytest.raises(Killed):
        _kill(m, at_rename=2)  # the first moved the old checkpoint aside; the new one never arrives
        model.save(out, force=True)
    assert not out.exists()
    [previous] = [p / "previous" for p in tmp_path.iterdir() if p.name.endswith(".old")]
    with pytest.raises(FileNotFoundError) as e:
        lmmrt.load(out, device="cpu")
    assert f"an interrupted save of {out} left the checkpoint it was replacing at {previous}" in str(e.value)
    assert "killed" not in str(e.value)  # it cannot know why `out` is missing
    model.save(out)  # no force: `out` is missing, and nothing is moved back to it
    assert _beside(out) == [] and _snapshot(out) == _snapshot_of(model, tmp_path / "fresh")


def _snapshot_of(model, path):
    model.save(path)
    return _snapshot(path)


@pytest.mark.parametrize("user_does", ["delete", "rename"])
def test_an_old_generation_never_comes_back_after_the_user_removes_the_target(model, tmp_path, monkeypatch,
                                                                              user_does):
    """The reviewer's sequence: a forced save killed after its new checkpoint was in place leaves the old
    generation in `.ckpt.*.old/previous`; the user then deletes (or renames) ckpt. A plain save succeeds
    and writes the model saved; the old generation is deleted, never moved back to ckpt."""
    out = tmp_path / "ckpt"
    tiny_model("llava", seed=9).save(out)
    second = tiny_model("llava", seed=10)
    with monkeypatch.context() as m, pytest.raises(Killed):
        _kill(m, at_rmtree_of=".old")
        second.save(out, force=True)
    generation_2 = _snapshot(out)
    if user_does == "delete":
        shutil.rmtree(out)
    else:
        os.rename(out, tmp_path / "ckpt-v2")
    with pytest.raises(FileNotFoundError, match="an interrupted save of"):
        lmmrt.load(out, device="cpu")
    model.save(out)
    assert _snapshot(out) == _snapshot_of(model, tmp_path / "fresh")
    assert _beside(out) == []
    if user_does == "rename":
        assert _snapshot(tmp_path / "ckpt-v2") == generation_2


def test_a_kill_before_the_old_checkpoint_is_deleted_is_cleaned_by_the_next_forced_save(model, tmp_path, monkeypatch):
    out = tmp_path / "ckpt"
    tiny_model("llava", seed=9).save(out)
    with monkeypatch.context() as m, pytest.raises(Killed):
        _kill(m, at_rmtree_of=".old")
        model.save(out, force=True)
    new = _snapshot(out)
    left = _beside(out)
    assert sorted(n.rsplit(".", 1)[1] for n in left) == ["old", "partial"], left  # the partial: its marker only
    with pytest.raises(OutputExistsError):
        model.save(out)
    assert _beside(out) == left  # a refused save touches nothing
    model.save(out, force=True)
    assert _beside(out) == [] and _snapshot(out) == new
