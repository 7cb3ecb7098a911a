"""The sources of a fused q/k/v or gate/up are each checked against their share, and every bad source
tensor is named in one CheckpointError before any tensor is read: parts of the right total but split
wrongly converted into a model that computes something else."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file

from lmmrt.convert.blip2 import blip2_state
from lmmrt.convert.common import SourceWeights
from lmmrt.convert.idefics import idefics_state
from lmmrt.convert.llava import llava_state
from lmmrt.errors import CheckpointError

pytestmark = pytest.mark.filterwarnings("ignore:.*has no tokenizer.json")

def _tiny(family: str):
    if family == "llava":
        from llava_util import tiny_llava

        return tiny_llava(), llava_state
    if family == "blip2":
        from blip2_util import tiny_blip2

        return tiny_blip2(), blip2_state
    from idefics_util import tiny_idefics

    return tiny_idefics(seed=5), idefics_state


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    """family -> (save_pretrained directory of a tiny random model, its state function)."""
    out = {}
    for family in ("llava", "blip2", "idefics"):
        model, state_fn = _tiny(family)
        d = tmp_path_factory.mktemp(family)
        model.save_pretrained(d)
        out[family] = (d, state_fn)
    return out


def _edited(sources, family, tmp_path, edit):
    """A copy of the family's source with its weights edited in place by `edit(state dict)`."""
    base, state_fn = sources[family]
    dst = tmp_path / family
    dst.mkdir()
    for f in base.iterdir():
        if f.name != "model.safetensors":
            (dst / f.name).write_bytes(f.read_bytes())
    sd = load_file(str(base / "model.safetensors"))
    edit(sd)
    save_file(sd, str(dst / "model.safetensors"))
    return dst, state_fn


@pytest.fixture
def nothing_read(monkeypatch):
    """Fails a test if any source tensor is read: the checks must come before any conversion work."""
    def refuse(self, k):
        raise AssertionError(f"tensor {k} read before the source was checked")

    monkeypatch.setattr(SourceWeights, "get", refuse)


def _rows_moved(sd, first, second, rows):
    """`rows` rows taken off `first` and added to `second` (random values): the right total, split wrongly."""
    sd[first] = torch.randn(sd[first].shape[0] - rows, *sd[first].shape[1:])
    sd[second] = torch.randn(sd[second].shape[0] + rows, *sd[second].shape[1:])


@pytest.mark.parametrize(("family", "first", "second"), [
    ("llava", "language_model.model.layers.0.self_attn.k_proj.weight",
     "language_model.model.layers.0.self_attn.v_proj.weight"),
    ("blip2", "language_model.model.decoder.layers.0.self_attn.k_proj.weight",
     "language_model.model.decoder.layers.0.self_attn.v_proj.weight"),
    ("idefics", "model.layers.0.mlp.gate_proj.weight", "model.layers.0.mlp.up_proj.weight"),
])
def test_parts_of_the_right_total_split_wrongly_are_named(sources, tmp_path, nothing_read, family, first, second):
    shapes = {}

    def edit(sd):
        shapes.update({k: tuple(sd[k].shape) for k in (first, second)})
        _rows_moved(sd, first, second, 8)

    src, state_fn = _edited(sources, family, tmp_path, edit)
    with pytest.raises(CheckpointError) as e:
        state_fn(src, progress=False)
    msg = str(e.value)
    for key, rows in ((first, -8), (second, 8)):
        got = (shapes[key][0] + rows, *shapes[key][1:])
        assert f"{key} {got} <- misshapen" in msg
        assert f"{key.rsplit('.', 2)[-2]}.weight {shapes[key]}" in msg.split("; expected ")[1]  # its share
    assert "split wrongly" in msg


def test_embedding_and_its_added_rows_are_not_split_in_equal_parts(sources, tmp_path):
    """IDEFICS's embedding is the vocabulary and a few added rows: a fused tensor whose parts have no fixed
    share, so the unedited source converts (the share check holds for projections only)."""
    src, state_fn = _edited(sources, "idefics", tmp_path, lambda sd: None)
    assert "decoder.embed.weight" in state_fn(src, progress=False)[1]
