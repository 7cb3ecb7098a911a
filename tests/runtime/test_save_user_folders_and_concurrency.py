"""What a save of a checkpoint never does to the folders beside it, however they are named; saves of one
target from several processes at once; a save waiting for its turn; a target name too long for the save's temporary directory."""

from __future__ import annotations

import fcntl
import multiprocessing
import os
import re
import shutil
import threading
import time

import pytest
import torch
from serve_util import tiny_model

import lmmrt
from lmmrt.runtime.checkpoint_writer import BadOutputPathError, save_checkpoint
from lmmrt.runtime.save_leftovers import MARKER, TurnTimeoutError


class Killed(BaseException):
    """What the process would have died of."""


@pytest.fixture(scope="module")
def model():
    return tiny_model("llava")


def _tree(path):
    return {str(p.relative_to(path)): p.read_bytes() if p.is_file() else None for p in sorted(path.rglob("*"))}


def _age(path, seconds=7200):
    """Old enough for any rule that takes an unchanged folder for a dead save's (the reviewer's: 60 s)."""
    t = time.time() - seconds
    for p in [path, *path.rglob("*")]:
        os.utime(p, (t, t), follow_symlinks=False)


def _users_folder(path, files):
    path.mkdir()
    for name, text in files.items():
        (path / name).parent.mkdir(parents=True, exist_ok=True)
        (path / name).write_text(text)
    _age(path)
    return _tree(path)


def test_a_users_old_folder_survives_a_save_of_the_target_it_is_named_after(model, tmp_path):
    backup = tmp_path / ".ckpt.20240101.old"
    before = _users_folder(backup, {"notes.txt": "mine"})
    model.save(tmp_path / "ckpt")
    model.save(tmp_path / "ckpt", force=True)
    assert _tree(backup) == before


def test_a_users_previous_folder_is_never_taken_for_a_missing_targets_checkpoint(model, tmp_path):
    backup = tmp_path / ".ckpt.20240101.old"
    before = _users_folder(backup, {"previous/thesis.tex": "x"})
    with pytest.raises(FileNotFoundError) as e:
        lmmrt.load(tmp_path / "ckpt", device="cpu")
    assert str(backup) not in str(e.value)
    model.save(tmp_path / "ckpt")  # neither a warning nor a refusal: nothing of lmmrt's was there
    assert _tree(backup) == before
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == ["config.json", "model.safetensors", "tokenizer.json"]


def test_a_users_partial_folder_holding_checkpoint_file_names_survives(model, tmp_path):
    partial = tmp_path / ".m2.abcdefgh.partial"
    before = _users_folder(partial, {"config.json": '{"mine": 1}'})
    model.save(tmp_path / "m2")
    assert _tree(partial) == before


def test_only_a_leftover_with_its_own_marker_is_deleted(model, tmp_path, monkeypatch):
    """A killed save's partial is deleted; a copy of it under another name, or one whose marker was
    emptied, is not lmmrt's leftover (the marker names the directory it was written into)."""
    out = tmp_path / "ckpt"

    def killed(*a, **k):
        raise Killed

    with monkeypatch.context() as m, pytest.raises(Killed):
        m.setattr("lmmrt.runtime.checkpoint_writer.write_safetensors", killed)
        m.setattr(shutil, "rmtree", lambda *a, **k: None)  # a dead process cleans nothing up
        model.save(out)
    [partial] = [p for p in tmp_path.iterdir() if p.name.endswith(".partial")]
    assert (partial / MARKER).is_file()
    copy, emptied = tmp_path / ".ckpt.copyofit.partial", tmp_path / ".ckpt.emptymrk.partial"
    shutil.copytree(partial, copy)
    shutil.copytree(partial, emptied)
    (emptied / MARKER).write_bytes(b"")
    kept = {p: _tree(p) for p in (copy, emptied)}
    model.save(out)
    assert not partial.exists() and out.is_dir()
    assert {p: _tree(p) for p in kept} == kept


def _save_many(out, cfg, state, who: int, saves: int, start, errors) -> None:
    """One writer: `saves` forced saves of `out`. It computes nothing with torch: a child forked after
    the parent's thread pools ran hangs in its first parallel op."""
    real_rename = os.rename

    def slow_rename(a, b):  # a busy disk, or a writer preempted between its renames: races show at once
        real_rename(a, b)
        time.sleep(0.002)

    os.rename = slow_rename  # in this forked writer only
    start.wait()
    for _ in range(saves):
        try:
            save_checkpoint(out, cfg, state, force=True, metadata={"who": str(who)})
        except Exception as e:  # every one is a failure; the test prints what they were
            errors.put(f"{type(e).__name__}: {e}")
    errors.put(None)


def test_concurrent_forced_saves_of_one_target_take_turns(model, tmp_path):
    out, writers, saves = tmp_path / "ck", 3, 25
    states = [{"x": torch.randn(50_000, generator=torch.Generator().manual_seed(who))} for who in range(writers)]
    ctx = multiprocessing.get_context("fork")
    start, errors = ctx.Event(), ctx.Queue()
    procs = [ctx.Process(target=_save_many, args=(out, model.config, states[who], who, saves, start, errors),
                         daemon=True) for who in range(writers)]
    for p in procs:
        p.start()
    start.set()
    failures, done = [], 0
    try:
        while done < writers:
            e = errors.get(timeout=60)
            done += e is None
            failures += [] if e is None else [e]
    finally:
        for p in procs:
            p.join(timeout=10)
            if p.is_alive():
                p.kill()
    assert failures == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck"]  # nothing left beside it
    from safetensors import safe_open
    with safe_open(out / "model.safetensors", "pt") as f:
        who = int(f.metadata()["who"])
        assert torch.equal(f.get_tensor("x"), states[who]["x"])  # one writer's, whole


def _flock(directory):
    """Hold an flock on `directory` as any other process could (a separate open file description
    conflicts with the save's even in this process)."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    fcntl.flock(fd, fcntl.LOCK_EX)
    return fd


def test_a_save_waits_a_bounded_time_for_a_lock_held_on_its_directory(model, tmp_path, monkeypatch):
    monkeypatch.setattr("lmmrt.runtime.save_leftovers.TURN_TIMEOUT_S", 0.3)
    fd = _flock(tmp_path)
    try:
        with pytest.warns(UserWarning, match=re.escape(f"waiting for another save into {tmp_path}")) as w:
            with pytest.raises(TurnTimeoutError, match=re.escape(f"saving into {tmp_path} after waiting 0.3 s: "
                                                                 f"another process holds its lock")):
                model.save(tmp_path / "ck")
    finally:
        os.close(fd)
    assert len([x for x in w if "waiting for another save" in str(x.message)]) == 1  # said once, not per poll
    assert list(tmp_path.iterdir()) == []


def test_a_save_goes_on_once_the_lock_on_its_directory_is_released(model, tmp_path):
    fd = _flock(tmp_path)
    threading.Timer(0.3, os.close, (fd,)).start()
    with pytest.warns(UserWarning, match="waiting for another save"):
        model.save(tmp_path / "ck")
    assert sorted(p.name for p in (tmp_path / "ck").iterdir()) == ["config.json", "model.safetensors", "tokenizer.json"]


@pytest.mark.parametrize("extra", [1, 19], ids=["temporary-name-too-long", "name-itself-too-long"])
def test_a_name_too_long_for_the_temporary_directory_is_refused_clearly(model, tmp_path, extra):
    longest = os.pathconf(tmp_path, "PC_NAME_MAX") - len(".partial") - 10  # . NAME . XXXXXXXX .partial
    out = tmp_path / ("n" * (longest + extra))
    with pytest.raises(BadOutputPathError) as e:
        model.save(out)
    msg = str(e.value)
    assert str(out) in msg and ".partial" in msg and f"at most {longest} bytes" in msg, msg
    assert list(tmp_path.iterdir()) == []
    model.save(tmp_path / ("n" * longest))
