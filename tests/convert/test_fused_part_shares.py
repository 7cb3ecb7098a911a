"""The sources of a fused q/k/v or gate/up are each checked against their share, and every bad source
tensor is named in one CheckpointError before any tensor is read: parts of the right total but split
wrongly converted into a model that computes something else, and a misshapen Llama 3.2 Vision source
failed part-way through with torch's own message. A present part is checked against its share (from the
config) even when a sibling is missing; CLIP's converter shares the check."""

from __future__ import annotations

import re

import pytest
import torch
from safetensors.torch import load_file, save_file

from lmmrt.convert.blip2 import blip2_state
from lmmrt.convert.clip_model import clip_state
from lmmrt.convert.common import SourceWeights
from lmmrt.convert.idefics import idefics_state
from lmmrt.convert.llava import llava_state
from lmmrt.convert.mllama_files import mllama_source
from lmmrt.errors import CheckpointError

pytestmark = pytest.mark.filterwarnings("ignore:.*has no tokenizer.json")

MLLAMA_K = "language_model.model.layers.0.self_attn.k_proj.weight"


def _tiny(family: str):
    if family == "llava":
        from llava_util import tiny_llava

        return tiny_llava(), llava_state
    if family == "blip2":
        from blip2_util import tiny_blip2

        return tiny_blip2(), blip2_state
    if family == "clip":
        from clip_util import tiny_clip

        return tiny_clip(), clip_state
    if family == "idefics":
        from idefics_util import tiny_idefics

        return tiny_idefics(seed=5), idefics_state
    from mllama_util import tiny_mllama

    return tiny_mllama(), mllama_source


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    """family -> (save_pretrained directory of a tiny random model, its state function)."""
    out = {}
    for family in ("llava", "blip2", "idefics", "mllama", "clip"):
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
    ("mllama", MLLAMA_K, MLLAMA_K.replace("k_proj", "v_proj")),
    ("idefics", "model.layers.0.mlp.gate_proj.weight", "model.layers.0.mlp.up_proj.weight"),
    ("mllama", "language_model.model.layers.1.cross_attn.k_proj.weight",
     "language_model.model.layers.1.cross_attn.v_proj.weight"),
    ("clip", "text_model.encoder.layers.1.self_attn.k_proj.weight",
     "text_model.encoder.layers.1.self_attn.v_proj.weight"),
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


@pytest.mark.parametrize(("family", "gone"), [
    ("llava", "language_model.model.layers.0.self_attn.k_proj.weight"),
    ("mllama", MLLAMA_K),
    ("mllama", "language_model.model.layers.1.cross_attn.k_proj.weight"),
    ("clip", "vision_model.encoder.layers.0.self_attn.k_proj.weight"),
])
def test_a_misshapen_part_is_named_though_a_sibling_is_missing(sources, tmp_path, nothing_read, family, gone):
    """A part's share comes from the config, not from its siblings: with k missing, the misshapen v is named
    in the same error (it was left unchecked, so fixing the missing key only led to the next error)."""
    v = gone.replace("k_proj", "v_proj")
    share = {}

    def edit(sd):
        share[v] = tuple(sd[v].shape)
        del sd[gone]
        sd[v] = torch.randn(sd[v].shape[0] + 5, *sd[v].shape[1:])

    src, state_fn = _edited(sources, family, tmp_path, edit)
    with pytest.raises(CheckpointError) as e:
        state_fn(src, progress=False)
    msg = str(e.value)
    assert f"missing keys (1): {gone}" in msg
    assert f"{gone} missing" in msg
    assert f"{v} ({share[v][0] + 5}, {share[v][1]}) <- misshapen" in msg
    assert f"expected v_proj.weight {share[v]}" in msg


def test_embedding_and_its_added_rows_are_not_split_in_equal_parts(sources, tmp_path):
    """IDEFICS's embedding is the vocabulary and a few added rows: a fused tensor whose parts have no fixed
    share, so the unedited source converts (the share check holds for projections only)."""
    src, state_fn = _edited(sources, "idefics", tmp_path, lambda sd: None)
    assert "decoder.embed.weight" in state_fn(src, progress=False)[1]


def test_mllama_every_misshapen_source_is_named_before_any_is_read(sources, tmp_path, nothing_read):
    up = "language_model.model.layers.2.mlp.up_proj.weight"

    def edit(sd):
        sd[MLLAMA_K] = torch.randn(24, 52)
        sd[up] = torch.randn(84, 48)

    src, _ = _edited(sources, "mllama", tmp_path, edit)
    with pytest.raises(CheckpointError) as e:
        mllama_source(src, progress=False)
    msg = str(e.value)
    assert f"{MLLAMA_K} (24, 52) <- misshapen" in msg and "expected k_proj.weight (24, 48)" in msg
    assert f"{up} (84, 48) <- misshapen" in msg and "expected up_proj.weight (80, 48)" in msg


def test_mllama_missing_unused_and_misshapen_named_together(sources, tmp_path, nothing_read):
    """Text, cross-attention and vision sources, fused parts and folded gates: one error names them all."""
    cross_q = "language_model.model.layers.1.cross_attn.q_proj.weight"
    vision_q = "vision_model.global_transformer.layers.0.self_attn.q_proj.weight"
    gate = "vision_model.global_transformer.layers.1.gate_ffn"
    up = "language_model.model.layers.2.mlp.up_proj.weight"

    def edit(sd):
        del sd[MLLAMA_K], sd[cross_q]
        sd[vision_q] = torch.randn(8, 32)
        sd[gate] = torch.randn(2)
        sd[up] = torch.randn(84, 48)
        sd["language_model.model.extra.weight"] = torch.randn(3)

    src, _ = _edited(sources, "mllama", tmp_path, edit)
    with pytest.raises(CheckpointError) as e:
        mllama_source(src, progress=False)
    msg = str(e.value)
    assert f"missing keys (2): {MLLAMA_K}, {cross_q}" in msg
    assert "unexpected keys (1): language_model.model.extra.weight" in msg
    assert f"{vision_q} (8, 32) <- misshapen" in msg and "expected q_proj.weight (32, 32)" in msg
    assert re.search(rf"{re.escape(gate)}: shape \(2,\), expected \(1,\)", msg)
    assert f"{up} (84, 48) <- misshapen" in msg
