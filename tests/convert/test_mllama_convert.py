"""`lmmrt convert mllama`: sharded safetensors in both checkpoint key spellings, the tokenizer with
its <|image|> token, the chat template, and every bad input named."""

from __future__ import annotations

import json
import re
import shutil

import numpy as np
import pytest
import torch
from mllama_tokenizer import CHAT_TEMPLATE, mllama_tokenizer
from mllama_util import BOS, IMAGE_ID, tiny_mllama
from safetensors.torch import load_file, save_file

import lmmrt
from lmmrt.cli import main
from lmmrt.convert.mllama_files import convert_mllama
from lmmrt.errors import CheckpointError, ConfigError

PROMPT = [BOS, 5, IMAGE_ID, 7, 8]


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    """(transformers model, a sharded save_pretrained directory with tokenizer.json, converted dir)."""
    hf = tiny_mllama(seed=5)
    d = tmp_path_factory.mktemp("mllama")
    hf.save_pretrained(d / "src", max_shard_size="60KB")
    mllama_tokenizer().save(str(d / "src" / "tokenizer.json"))
    convert_mllama(d / "src", d / "out", progress=False)
    return hf, d / "src", d / "out"


@pytest.fixture(scope="module")
def image():
    return (np.random.default_rng(2).random((20, 47, 3)) * 255).astype(np.uint8)


def _copy(src, dst):
    shutil.copytree(src, dst)
    return dst


def test_sharded_source_keeps_tokenizer_and_chat_template(source, image, tmp_path):
    hf, base, out = source
    assert (base / "model.safetensors.index.json").exists()
    assert len({v for v in json.loads((base / "model.safetensors.index.json").read_text())["weight_map"].values()}) > 2
    src = _copy(base, tmp_path / "src")
    # the template as older hub checkpoints ship it: in tokenizer_config.json
    (src / "tokenizer_config.json").write_text(json.dumps({"chat_template": CHAT_TEMPLATE}))
    assert main(["convert", "mllama", str(src), str(tmp_path / "out"), "--quiet"]) == 0
    assert (tmp_path / "out" / "chat_template.jinja").read_text() == CHAT_TEMPLATE
    model = lmmrt.load(tmp_path / "out", device="cpu", backend="torch")
    assert model.config.family == "mllama"
    assert model.tokenizer.token_to_id("<|image|>") == model.config.image_token_id == IMAGE_ID
    # text through the kept tokenizer equals the same prompt as ids
    by_text = lmmrt.logits(model, "w5 <|image|>w7 w8", [image])[0]
    assert torch.equal(by_text, lmmrt.logits(model, [PROMPT], [[image]])[0])
    assert not (out / "chat_template.jinja").exists()  # the fixture's source has no template: none invented


def _new_spelling(hf_model) -> dict[str, torch.Tensor]:
    """The state dict as transformers >= 4.52 names it in memory: model.language_model.*, model.vision_model.*,
    model.multi_modal_projector.*, lm_head.*."""
    sd = {k: v.contiguous() for k, v in hf_model.state_dict().items()}
    assert any(k.startswith("model.language_model.") for k in sd) and "lm_head.weight" in sd
    return sd


def test_both_key_spellings_convert_to_the_same_weights(source, tmp_path):
    hf, base, out = source
    old = load_file(next(base.glob("model-00001-*.safetensors")))
    assert all(k.startswith(("language_model.", "vision_model.", "multi_modal_projector.")) for k in old)
    src = tmp_path / "new"
    src.mkdir()
    shutil.copy(base / "config.json", src / "config.json")
    shutil.copy(base / "tokenizer.json", src / "tokenizer.json")
    save_file(_new_spelling(hf), src / "model.safetensors")
    convert_mllama(src, tmp_path / "out", progress=False)
    a, b = load_file(out / "model.safetensors"), load_file(tmp_path / "out" / "model.safetensors")
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_dtype_option(source, tmp_path):
    _, base, _ = source
    assert main(["convert", "mllama", str(base), str(tmp_path / "out"), "--dtype", "bfloat16", "--quiet"]) == 0
    assert {t.dtype for t in load_file(tmp_path / "out" / "model.safetensors").values()} == {torch.bfloat16}


def _single_file(base, dst, edit):
    """A copy of the source as one model.safetensors, its tensors edited by `edit(dict)`."""
    dst.mkdir()
    for name in ("config.json", "tokenizer.json"):
        shutil.copy(base / name, dst / name)
    sd = {}
    for shard in sorted(base.glob("model-*.safetensors")):
        sd.update(load_file(shard))
    edit(sd)
    save_file(sd, dst / "model.safetensors")
    return dst


def test_missing_tensor_is_named(source, tmp_path):
    _, base, _ = source
    key = "language_model.model.layers.3.cross_attn.k_norm.weight"
    src = _single_file(base, tmp_path / "src", lambda sd: sd.pop(key))
    with pytest.raises(CheckpointError, match=r"layers\.3\.cross_attn\.k_norm\.weight"):
        convert_mllama(src, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


def test_unknown_tensor_is_named(source, tmp_path):
    _, base, _ = source
    src = _single_file(base, tmp_path / "src",
                       lambda sd: sd.update({"language_model.model.extra_adapter.weight": torch.ones(2, 2)}))
    with pytest.raises(CheckpointError, match=r"unexpected keys \(1\): language_model\.model\.extra_adapter\.weight"):
        convert_mllama(src, tmp_path / "out", progress=False)


def test_tokenizer_and_config_errors(source, tmp_path):
    _, base, _ = source
    src = _copy(base, tmp_path / "src")
    tok = json.loads((src / "tokenizer.json").read_text())
    for added in tok["added_tokens"]:
        if added["content"] == "<|image|>":
            added["content"] = "<|img|>"
    tok["model"]["vocab"]["<|img|>"] = tok["model"]["vocab"].pop("<|image|>")
    (src / "tokenizer.json").write_text(json.dumps(tok))
    with pytest.raises(CheckpointError, match=r"tokenizer\.json has no <\|image\|> token"):
        convert_mllama(src, tmp_path / "out", progress=False)
    (src / "tokenizer.json").unlink()
    with pytest.warns(UserWarning, match=r"no tokenizer\.json.*<\|image\|> is taken to be token id 90"):
        convert_mllama(src, tmp_path / "out", progress=False)
    model = lmmrt.load(tmp_path / "out", device="cpu", backend="torch")
    assert model.tokenizer is None and model.config.image_token_id == IMAGE_ID
    cfg = json.loads((src / "config.json").read_text())
    (src / "config.json").write_text(json.dumps({**cfg, "model_type": "llava"}))
    with pytest.raises(ValueError, match=r"model_type is 'llava', expected 'mllama'"):
        convert_mllama(src, tmp_path / "out2", progress=False)


def test_preprocessor_config(source, tmp_path):
    """Its mean and std become the checkpoint's; a tile size or count unlike the vision tower's is refused."""
    _, base, _ = source
    src = _copy(base, tmp_path / "src")
    pre = {"image_mean": [0.5, 0.4, 0.3], "image_std": [0.2, 0.25, 0.3], "size": {"height": 28, "width": 28},
           "max_image_tiles": 2}
    (src / "preprocessor_config.json").write_text(json.dumps(pre))
    convert_mllama(src, tmp_path / "out", progress=False)
    vision = json.loads((tmp_path / "out" / "config.json").read_text())["vision"]
    assert vision["image_mean"] == [0.5, 0.4, 0.3] and vision["image_std"] == [0.2, 0.25, 0.3]
    (src / "preprocessor_config.json").write_text(json.dumps({**pre, "size": {"height": 560, "width": 560},
                                                              "max_image_tiles": 4}))
    with pytest.raises(CheckpointError, match=r"preprocessor_config\.json: size \[560, 560\], but config\.json's "
                                              r"vision_config has \[28, 28\]; max_image_tiles 4, but .* has 2"):
        convert_mllama(src, tmp_path / "out2", progress=False)


@pytest.mark.parametrize("listed", [[0, 3], [1, 4], [1]])
def test_cross_attention_layers_must_be_where_the_weights_have_them(source, tmp_path, listed):
    """The weights' cross-attention layers are at [1, 3]: a config listing others would place the blocks
    (whose shapes all fit) at the wrong depth."""
    _, base, _ = source
    src = _copy(base, tmp_path / "src")
    cfg = json.loads((src / "config.json").read_text())
    cfg["text_config"]["cross_attention_layers"] = listed
    (src / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=rf"cross_attention_layers = {re.escape(str(listed))}, but the "
                                              r"weights have cross-attention layers .* at \[1, 3\]"):
        convert_mllama(src, tmp_path / "out", progress=False)


@pytest.mark.parametrize("dtype", [None, torch.bfloat16])
def test_integer_source_tensor_is_refused_at_conversion(source, tmp_path, dtype):
    """The loader takes floating-point weights only: an integer tensor (with dtype= as well, which casts
    the float tensors) is refused now, naming it, not written into a checkpoint that cannot load."""
    _, base, _ = source
    key = "language_model.model.norm.weight"
    src = _single_file(base, tmp_path / "src", lambda sd: sd.update({key: sd[key].to(torch.int32)}))
    with pytest.raises(CheckpointError, match=rf"tensor '{re.escape(key)}' is int32, but lmmrt weights are "
                                              r"floating point"):
        convert_mllama(src, tmp_path / "out", dtype=dtype, progress=False)
    assert not (tmp_path / "out").exists()


def _with_ratios(base, dst, ratios):
    src = _copy(base, dst)
    cfg = json.loads((src / "config.json").read_text())
    cfg["vision_config"]["supported_aspect_ratios"] = ratios
    (src / "config.json").write_text(json.dumps(cfg))
    return src


def test_supported_aspect_ratios_in_another_order_number_as_the_processor_does(source, image, tmp_path):
    """transformers' model takes only the list's length; its processor numbers the tile arrangements
    itself ([1, 1], [1, 2], [2, 1] for 2 tiles). A reordered list converts into that numbering and
    gives the logits of the source model (a wide image: 2 tiles, aspect_ratio_id 2)."""
    _, base, out = source
    src = _with_ratios(base, tmp_path / "src", [[2, 1], [1, 1], [1, 2]])
    convert_mllama(src, tmp_path / "out", progress=False)
    model = lmmrt.load(tmp_path / "out", device="cpu", backend="torch")
    assert model.config.vision.supported_aspect_ratios == [[1, 1], [1, 2], [2, 1]]
    want = lmmrt.logits(lmmrt.load(out, device="cpu", backend="torch"), [PROMPT], [[image]])[0]
    assert torch.equal(lmmrt.logits(model, [PROMPT], [[image]])[0], want)


def test_supported_aspect_ratios_without_every_arrangement_are_refused(source, tmp_path):
    _, base, _ = source
    src = _with_ratios(base, tmp_path / "src", [[1, 1], [1, 2]])
    with pytest.raises(ConfigError, match=r"supported_aspect_ratios = \[\[1, 1\], \[1, 2\]\]: Mllama's image "
                                          r"processor numbers the 3 tile arrangements of max_num_tiles = 2 itself "
                                          r"\(\[\[1, 1\], \[1, 2\], \[2, 1\]\]"):
        convert_mllama(src, tmp_path / "out", progress=False)
