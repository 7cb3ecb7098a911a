"""Checkpoint writes lose nothing: an existing output is refused unless forced, sources are never
written over or into, a failure midway leaves the old checkpoint intact and no partial output, and
Model.save round-trips a loaded model (its folded gates are not applied twice)."""

from __future__ import annotations

import errno
import os

import pytest
import torch
from safetensors import safe_open

import lmmrt
from lmmrt.convert.idefics import convert_idefics
from lmmrt.demo import char_tokenizer, demo_config, demo_images, save_demo
from lmmrt.models.random_init import random_model
from lmmrt.runtime import checkpoint_writer
from lmmrt.runtime.checkpoint_writer import (
    OutputExistsError,
    OutputIsSourceError,
    save_checkpoint,
    write_safetensors,
)


@pytest.fixture(scope="module")
def demo_ckpt(tmp_path_factory):
    return save_demo(tmp_path_factory.mktemp("writer") / "demo")


def _demo_cfg_state():
    cfg = demo_config(char_tokenizer().get_vocab_size())
    return cfg, random_model(cfg, seed=7, device="cpu", dtype=torch.float32).state_dict()


def _snapshot(path):
    return {p.name: p.read_bytes() for p in sorted(path.iterdir())}


def _leftovers(parent, keep):
    return sorted(p.name for p in parent.iterdir() if p.name not in keep)


def test_safetensors_written_here_read_by_safetensors(tmp_path):
    g = torch.Generator().manual_seed(0)
    state = {"a": torch.randn(3, 5, generator=g), "b.bf16": torch.randn(7, generator=g).bfloat16(),
             "c": torch.randn(2, 3, 4, generator=g).half().transpose(0, 2),  # non-contiguous
             "scalar": torch.tensor(1.5, dtype=torch.float64), "empty": torch.zeros(0, 3)}
    write_safetensors(tmp_path / "w.safetensors", state, {"k": "v"})
    with safe_open(str(tmp_path / "w.safetensors"), framework="pt") as f:
        assert f.metadata() == {"k": "v"}
        assert set(f.keys()) == set(state)
        for k, t in state.items():
            got = f.get_tensor(k)
            assert got.dtype == t.dtype and got.shape == t.shape and torch.equal(got, t), k


def test_existing_output_refused_before_any_work(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    # the source does not even exist: the refusal comes first, before anything is read
    with pytest.raises(OutputExistsError, match="already exists.*force"):
        convert_idefics(tmp_path / "no-such-source", out)
    (tmp_path / "file").write_text("x")
    with pytest.raises(OutputExistsError, match="already exists"):
        save_demo(tmp_path / "file")
    assert (out / "keep.txt").read_text() == "mine" and (tmp_path / "file").read_text() == "x"


def test_force_replaces_a_checkpoint_but_never_a_foreign_directory(demo_ckpt, tmp_path):
    out = tmp_path / "ckpt"
    out.mkdir()
    (out / "config.json").write_text("{}")  # an old, different checkpoint
    (out / "tokenizer.json").write_text("old")
    save_demo(out, force=True)
    assert _snapshot(out) == _snapshot(demo_ckpt)
    assert _leftovers(tmp_path, {"ckpt"}) == []
    home = tmp_path / "home"
    home.mkdir()
    (home / "thesis.tex").write_text("years of work")
    with pytest.raises(OutputExistsError, match="not an lmmrt checkpoint.*thesis.tex"):
        save_demo(home, force=True)
    assert (home / "thesis.tex").read_text() == "years of work"


@pytest.mark.parametrize("where", ["same", "inside", "contains", "symlink"])
def test_sources_are_never_written_even_with_force(tmp_path, where):
    src = tmp_path / "parent" / "src"
    src.mkdir(parents=True)
    (src / "config.json").write_text('{"model_type": "idefics"}')
    before = _snapshot(src)
    out = {"same": src, "inside": src / "sub", "contains": tmp_path / "parent", "symlink": tmp_path / "link"}[where]
    if where == "symlink":
        out.symlink_to(src)
    with pytest.raises(OutputIsSourceError, match="source"):
        convert_idefics(src, out, force=True)
    assert _snapshot(src) == before


def test_full_disk_midway_keeps_the_old_checkpoint(demo_ckpt, tmp_path, monkeypatch):
    out = tmp_path / "ckpt"
    out.mkdir()
    for p in demo_ckpt.iterdir():
        (out / p.name).write_bytes(p.read_bytes())
    before = _snapshot(out)
    real, calls = checkpoint_writer._tensor_bytes, []

    def fills_up(t):
        calls.append(1)
        if len(calls) == 5:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(t)

    monkeypatch.setattr(checkpoint_writer, "_tensor_bytes", fills_up)
    cfg, state = _demo_cfg_state()
    with pytest.raises(OSError, match=r"no space left on device while writing .*ckpt/model.safetensors") as e:
        save_checkpoint(out, cfg, state, force=True)
    assert e.value.errno == errno.ENOSPC and len(calls) == 5
    assert _snapshot(out) == before
    assert _leftovers(tmp_path, {"ckpt"}) == []  # no partial directory left beside it
    monkeypatch.undo()
    new = tmp_path / "new"
    monkeypatch.setattr(checkpoint_writer, "_tensor_bytes", fills_up)
    calls.clear()
    with pytest.raises(OSError, match="no space left"):
        save_checkpoint(new, cfg, state)
    assert not new.exists() and _leftovers(tmp_path, {"ckpt"}) == []


def test_model_save_roundtrip_same_logits(demo_ckpt, tmp_path):
    m = lmmrt.load(demo_ckpt, device="cpu", backend="torch")
    gates = [b.attn_gate for b in m.module.xattn] + [b.ff_gate for b in m.module.xattn]
    assert all(bool((g != 0).all()) for g in gates) and all(b.gates_folded for b in m.module.xattn)
    ids = [1, 5, 3, 40, 41, 42, 3, 50]
    images = [demo_images()]
    want = lmmrt.logits(m, [ids], images)[0]
    lmmrt.generate(m, [ids], images, max_new_tokens=3)  # a used model (caches made) saves the same
    m.save(tmp_path / "saved")
    m2 = lmmrt.load(tmp_path / "saved", device="cpu", backend="torch")
    torch.testing.assert_close(lmmrt.logits(m2, [ids], images)[0], want, rtol=0, atol=0)
    assert m2.tokenizer is not None and m2.tokenizer.encode("ab") == m.tokenizer.encode("ab")
    with pytest.raises(OutputExistsError):
        m.save(tmp_path / "saved")
    m.save(tmp_path / "saved", force=True)
    with pytest.raises(OutputIsSourceError):
        m2.save(tmp_path / "saved", force=True)  # the directory it was loaded from


def test_gate_folding_leaves_the_callers_tensors_alone():
    """load_state_dict(assign=True) shares memory with the caller's tensors: folding the gates
    must not scale the caller's wo / ff_w2 (a transformers model converted in memory stays usable)."""
    from lmmrt.api import Model
    from lmmrt.models.flamingo import FlamingoModel

    cfg, state = _demo_cfg_state()
    before = {k: v.clone() for k, v in state.items()}
    with torch.device("meta"):
        module = FlamingoModel(cfg)
    module.load_state_dict(state, assign=True)
    Model(module, cfg, None, backend="torch")
    assert all(torch.equal(state[k], before[k]) for k in state)


def test_force_into_the_current_directory(demo_ckpt, tmp_path, monkeypatch):
    """"." has no name and its parent is itself: the temporary directory must still go beside it."""
    (tmp_path / "here").mkdir()
    monkeypatch.chdir(tmp_path / "here")
    with pytest.raises(OutputExistsError):
        save_demo(".")
    save_demo(".", force=True)
    assert _snapshot(tmp_path / "here") == _snapshot(demo_ckpt)
    assert _leftovers(tmp_path, {"here"}) == []
