"""Model.save's path edge cases get a clear error naming the path given."""

from __future__ import annotations

import errno
import os
import re
import tempfile

import pytest
from serve_util import tiny_model

from lmmrt.runtime.checkpoint_writer import BadOutputPathError


@pytest.fixture(scope="module")
def model():
    return tiny_model("llava")


def _snapshot(path):
    return {p.name: p.read_bytes() for p in sorted(path.iterdir())}


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
            with pytest.raises(PermissionError, match=re.escape(f"while writing {out}") + "$"):
                model.save(out)
    finally:
        ro.chmod(0o755)


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
