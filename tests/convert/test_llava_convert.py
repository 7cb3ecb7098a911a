"""`lmmrt convert llava`: weight files of every kind, the tokenizer's <image> marker, the chat
template, and every bad key named."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from llava_util import IMAGE_ID, VOCAB, hf_prompt_logits, tiny_llava
from safetensors.torch import load_file, save_file

import lmmrt
from lmmrt.cli import main
from lmmrt.convert.llava import convert_llava
from lmmrt.errors import CheckpointError

# the tiny models here are saved without tokenizer.json on purpose: the warning users get for that is expected
pytestmark = pytest.mark.filterwarnings("ignore:.*has no tokenizer.json")

TEMPLATE = "{% for m in messages %}USER: {{ m['content'] }}\n{% endfor %}ASSISTANT:"


def _word_tokenizer():
    """A word-level tokenizer over w0..w89 (ids 0..89) with no <image> token."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    tok = Tokenizer(models.WordLevel({f"w{i}": i for i in range(IMAGE_ID)}, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return tok


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    hf = tiny_llava(seed=4)
    src = tmp_path_factory.mktemp("llava") / "src"
    hf.save_pretrained(src)
    return hf, src


@pytest.fixture(scope="module")
def pixels():
    return torch.randn(1, 3, 28, 28, generator=torch.Generator().manual_seed(5))


def _logits(out, ids, pixels):
    model = lmmrt.load(out, device="cpu", backend="torch")
    return lmmrt.logits(model, [ids], [[pixels[0]]])[0], model


def test_cli_adds_image_marker_and_keeps_chat_template(source, pixels, tmp_path):
    hf, base = source
    src = tmp_path / "src"
    shutil.copytree(base, src)
    _word_tokenizer().save(str(src / "tokenizer.json"))
    (src / "tokenizer_config.json").write_text(json.dumps({"chat_template": TEMPLATE}))
    assert main(["convert", "llava", str(src), str(tmp_path / "out"), "--quiet"]) == 0
    out = tmp_path / "out"
    assert (out / "chat_template.jinja").read_text() == TEMPLATE
    model = lmmrt.load(out, device="cpu", backend="torch")
    assert model.tokenizer.token_to_id("<image>") == model.config.image_token_id == IMAGE_ID
    got = lmmrt.logits(model, "w1 w5 <image> w7 w8", [pixels[0]])[0]
    ref = hf_prompt_logits(hf, [1, 5, IMAGE_ID, 7, 8], pixels, model.config.media_tokens)
    assert ((got - ref).abs().max() / ref.abs().max()).item() < 1e-4
    # the template travels with the checkpoint: model.save, and a forced re-conversion over it
    model.save(tmp_path / "saved")
    assert (tmp_path / "saved" / "chat_template.jinja").read_text() == TEMPLATE
    assert main(["convert", "llava", str(src), str(tmp_path / "saved"), "--quiet", "--force"]) == 0


def test_sharded_safetensors_and_bin_weights(source, pixels, tmp_path):
    hf, base = source
    ids = [1, IMAGE_ID, 9, 10]
    ref = hf_prompt_logits(hf, ids, pixels, 16)
    sharded = tmp_path / "sharded"
    hf.save_pretrained(sharded, max_shard_size="40KB")
    assert (sharded / "model.safetensors.index.json").exists()
    binary = tmp_path / "bin"
    shutil.copytree(base, binary)
    torch.save(load_file(binary / "model.safetensors"), binary / "pytorch_model.bin")
    (binary / "model.safetensors").unlink()
    for src in (sharded, binary):
        convert_llava(src, tmp_path / f"{src.name}-out", progress=False, dtype=torch.float32)
        got, _ = _logits(tmp_path / f"{src.name}-out", ids, pixels)
        assert ((got - ref).abs().max() / ref.abs().max()).item() < 1e-4


def test_every_bad_key_is_named(source, tmp_path):
    _, base = source
    src = tmp_path / "src"
    shutil.copytree(base, src)
    sd = load_file(src / "model.safetensors")
    del sd["multi_modal_projector.linear_2.bias"]
    sd["multi_modal_projector.linear_3.weight"] = torch.ones(2, 2)
    sd["language_model.model.layers.1.mlp.up_proj.weight"] = torch.ones(7, 48)
    save_file(sd, src / "model.safetensors")
    with pytest.raises(CheckpointError) as e:
        convert_llava(src, tmp_path / "out", progress=False)
    msg = str(e.value)
    assert "multi_modal_projector.linear_2.bias" in msg  # missing
    assert "multi_modal_projector.linear_3.weight" in msg  # unexpected
    assert "language_model.model.layers.1.mlp.up_proj.weight (7, 48) <- misshapen" in msg
    assert not (tmp_path / "out").exists()


def test_source_errors(source, tmp_path):
    _, base = source
    src = tmp_path / "src"
    shutil.copytree(base, src)
    cfg = json.loads((src / "config.json").read_text())
    (src / "config.json").write_text(json.dumps({**cfg, "model_type": "idefics"}))
    with pytest.raises(ValueError, match=r"model_type is 'idefics', expected 'llava'"):
        convert_llava(src, tmp_path / "out", progress=False)
    text = {**cfg["text_config"], "model_type": "mistral"}
    (src / "config.json").write_text(json.dumps({**cfg, "text_config": text}))
    with pytest.raises(ValueError, match=r"language model 'mistral' is not supported"):
        convert_llava(src, tmp_path / "out", progress=False)
    (src / "config.json").write_text(json.dumps({**cfg, "vision_feature_select_strategy": "cls"}))
    with pytest.raises(ValueError, match=r"vision_feature_select_strategy 'cls' is not supported"):
        convert_llava(src, tmp_path / "out", progress=False)
    # a tokenizer whose <image> lands outside the LM's embedding rows
    from tokenizers import Tokenizer, models

    (src / "config.json").write_text(json.dumps(cfg))
    Tokenizer(models.WordLevel({f"w{i}": i for i in range(VOCAB)}, unk_token="w0")).save(str(src / "tokenizer.json"))
    with pytest.raises(CheckpointError, match=rf"<image> is token {VOCAB}, outside the LM's vocabulary of {VOCAB}"):
        convert_llava(src, tmp_path / "out", progress=False)


def test_source_without_tokenizer_warns_at_convert(source, tmp_path):
    _, src = source  # the fixture's source has no tokenizer.json
    with pytest.warns(UserWarning, match=f"has no tokenizer.json: .*token ids only.*<image> is taken to be token id "
                                         f"{IMAGE_ID}"):
        convert_llava(src, tmp_path / "out", progress=False)
