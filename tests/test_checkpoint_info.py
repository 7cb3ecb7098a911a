"""`lmmrt info CHECKPOINT` (lmmrt.checkpoint_info): a checkpoint's family and the image marker its prompts
use, read from config.json alone, for every kind of directory a user may point it at; and `lmmrt generate
--help`, which sends the user there, naming every family's marker as the converters write it."""

from __future__ import annotations

import json

import pytest
from cli_util import assert_one_error_line

from lmmrt.checkpoint_info import CHAT_TEMPLATE_FILES
from lmmrt.cli import build_parser, main


@pytest.fixture(scope="module")
def demo_ckpt(tmp_path_factory):
    from lmmrt.demo import save_demo

    return save_demo(tmp_path_factory.mktemp("info") / "demo")


@pytest.fixture(scope="module")
def mllama_dirs(tmp_path_factory):
    """(the transformers directory, its lmmrt conversion) of a tiny random Llama 3.2 Vision."""
    pytest.importorskip("transformers")
    from mllama_util import tiny_mllama

    root = tmp_path_factory.mktemp("info-mllama")
    tiny_mllama(seed=2).save_pretrained(root / "hf")
    assert main(["convert", "mllama", str(root / "hf"), str(root / "lmmrt"), "--quiet"]) == 0  # no tokenizer.json
    return root / "hf", root / "lmmrt"


def info(capsys, *args) -> str:
    assert main(["info", *map(str, args)]) == 0
    return capsys.readouterr().out


def test_generate_help_names_each_familys_marker_as_its_converter_writes_it():
    from lmmrt.convert import blip2, llava, minigpt4, mllama, openflamingo
    from lmmrt.models.config import ModelConfig

    generate = next(a for a in build_parser()._actions if a.dest == "cmd").choices["generate"]
    text = " ".join(generate.format_help().split())
    markers = {"IDEFICS": ModelConfig().image_token, "OpenFlamingo": openflamingo.IMAGE_TOKEN,
               "LLaVA": llava.IMAGE_TOKEN, "BLIP-2": blip2.IMAGE_TOKEN, "Llama 3.2 Vision": mllama.IMAGE_TOKEN,
               "MiniGPT-4": minigpt4.IMAGE_TOKEN}
    for family, marker in markers.items():
        said = text[text.index(marker):]  # "<image> for IDEFICS, OpenFlamingo, ..." then the next marker
        assert family in said[:said.index(";")], (family, marker, text)
    assert "`lmmrt info CHECKPOINT` shows it" in text


def test_info_of_an_idefics_style_checkpoint(demo_ckpt, capsys):
    out = info(capsys, demo_ckpt)
    assert "family: IDEFICS (cross-attention)" in out and "image marker: <image> (" in out, out
    assert "tokenizer: tokenizer.json" in out and "chat template: none" in out, out
    (demo_ckpt / "chat_template.jinja").write_text("{{ messages }}")
    try:
        d = json.loads(info(capsys, demo_ckpt, "--json"))
    finally:
        (demo_ckpt / "chat_template.jinja").unlink()
    assert (d["family"], d["image_marker"], d["chat_template"], d["tokenizer"]) == (
        "idefics", "<image>", "chat_template.jinja", True)


def test_info_of_a_converted_mllama_and_of_its_transformers_source(mllama_dirs, capsys):
    from mllama_util import tiny_mllama_config

    hf, converted = mllama_dirs
    out = info(capsys, converted)
    assert "family: Llama 3.2 Vision (Mllama) (cross-attention)" in out and "image marker: <|image|> (" in out, out
    assert "tokenizer: none" in out, out
    text = tiny_mllama_config().text_config
    lm = json.loads(info(capsys, converted, "--json"))["language_model"]
    assert (lm["dim"], lm["heads"], lm["kv_heads"], lm["vocab_size"]) == (
        text.hidden_size, text.num_attention_heads, text.num_key_value_heads, text.vocab_size)
    xattn = len(text.cross_attention_layers)  # Mllama counts its cross-attention layers in num_hidden_layers
    assert (lm["layers"], lm["cross_attention_layers"]) == (text.num_hidden_layers - xattn, xattn)
    assert main(["info", str(hf)]) == 2
    err = capsys.readouterr().err
    assert_one_error_line(err)
    assert f"`lmmrt convert mllama {hf} OUT`" in err, err


def test_info_of_a_transformers_idefics_directory_and_of_a_clip_checkpoint(tmp_path, capsys):
    from lmmrt.models.clip_config import ClipConfig

    (tmp_path / "idefics").mkdir()
    (tmp_path / "idefics" / "config.json").write_text(json.dumps({"model_type": "idefics"}))
    out = info(capsys, tmp_path / "idefics")
    assert "(transformers (converted in memory at every load))" in out and "image marker: <image> (" in out, out
    (tmp_path / "clip").mkdir()
    (tmp_path / "clip" / "config.json").write_text(json.dumps(ClipConfig().to_dict()))
    out = info(capsys, tmp_path / "clip")
    assert "family: CLIP (embeddings only)" in out and "image marker: none" in out, out


def test_the_chat_template_files_are_the_ones_serve_reads():
    chat_template = pytest.importorskip("lmmrt.serve.chat_template")
    assert CHAT_TEMPLATE_FILES == chat_template.TEMPLATE_FILES
