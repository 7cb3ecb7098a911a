"""Fixes from the hostile-user review: each test fails on the code before its fix."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from lmmrt import cli
from lmmrt.runtime.processor import pil_to_rgb

# -- the CLI hands images to the library's conversion (the API's result, the API's refusals) ----------------

def test_cli_keeps_alpha_for_the_library_to_composite(tmp_path):
    rgba = np.random.default_rng(0).integers(0, 256, (5, 7, 4), dtype=np.uint8)
    rgba[..., 3] = np.random.default_rng(1).integers(0, 200, (5, 7), dtype=np.uint8)  # partly transparent
    path = tmp_path / "rgba.png"
    Image.fromarray(rgba, "RGBA").save(path)
    loaded = cli._load_image(str(path))
    expected = pil_to_rgb(Image.fromarray(rgba, "RGBA"), on_white=True, where="api")
    np.testing.assert_array_equal(np.array(pil_to_rgb(loaded, on_white=True, where="cli")), np.array(expected))


def test_cli_refuses_a_16_bit_image_naming_it(tmp_path, capsys):
    path = tmp_path / "deep.png"
    Image.fromarray(np.full((4, 6), 40000, np.uint16)).save(path)  # mode I;16: RGB conversion clips it to white
    assert cli.main(["generate", str(tmp_path / "no-model"), "-p", "<image>x", "-i", str(path)]) == cli.EXIT_ERROR
    err = capsys.readouterr().err
    assert err.startswith("lmmrt: error: ") and str(path) in err and "more than 8 bits per pixel" in err, err


# -- float pixels far outside the normalized range are refused by name, not turned into NaN logits ----------

@pytest.fixture(scope="module")
def model():
    from lmmrt.demo import demo_model

    return demo_model(device="cpu", backend="torch")


@pytest.mark.parametrize("value", [1e30, -300.0])
def test_absurd_float_pixels_are_refused_naming_the_image(model, value):
    import lmmrt

    good = torch.randn(3, 9, 11, generator=torch.Generator().manual_seed(3))
    bad = good.clone()
    bad[1, 4, 5] = value
    with pytest.raises(ValueError, match=r"images\[1\]\[1\]: .*\|x\| <= 100 accepted"):
        lmmrt.generate(model, ["<image>a", "<image>b<image>c"], [[good], [good, bad]], max_new_tokens=1)


# -- config.json values Python's json cannot convert name the file ------------------------------------------

@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    from lmmrt.demo import save_demo

    return save_demo(tmp_path_factory.mktemp("hostile") / "demo")


@pytest.fixture
def copy(saved, tmp_path):
    dst = tmp_path / "copy"
    shutil.copytree(saved, dst)
    return dst


def _set_config(ckpt, **fields):
    cfg = json.loads((ckpt / "config.json").read_text())
    cfg.update(fields)
    (ckpt / "config.json").write_text(json.dumps(cfg))


def test_a_5000_digit_integer_in_config_json_is_a_checkpoint_error_naming_it(copy, tmp_path):
    import lmmrt
    from lmmrt.convert.common import read_source_json
    from lmmrt.errors import CheckpointError

    text = (copy / "config.json").read_text()
    (copy / "config.json").write_text(text.replace("{", '{"huge": ' + "7" * 5000 + ", ", 1))
    with pytest.raises(CheckpointError, match=f"{copy / 'config.json'}.*4300 digits"):
        lmmrt.load(copy, device="cpu")
    with pytest.raises(CheckpointError, match="config.json.*4300 digits"):
        read_source_json(copy / "config.json")  # the converters' reader


# -- config.json must agree with tokenizer.json and with itself at load, not at the first generate ----------

def test_image_token_id_that_the_tokenizer_maps_elsewhere_is_refused_naming_both_files(copy):
    import lmmrt

    marker = json.loads((copy / "config.json").read_text())["image_token_id"]
    _set_config(copy, image_token_id=50)  # an ordinary character of the demo vocabulary
    with pytest.raises(ValueError, match=rf"{copy / 'config.json'} image_token_id 50, but "
                                         rf"{copy / 'tokenizer.json'} maps '<image>' to {marker}"):
        lmmrt.load(copy, device="cpu")


def test_image_token_the_tokenizer_lacks_is_refused(copy):
    import lmmrt

    _set_config(copy, image_token="<picture>")
    with pytest.raises(ValueError, match=rf"{copy / 'tokenizer.json'} has no '<picture>' token"):
        lmmrt.load(copy, device="cpu")


@pytest.mark.parametrize("special", ["eos_token_id", "bos_token_id", "pad_token_id"])
def test_image_token_id_equal_to_a_special_token_is_refused(copy, special):
    import lmmrt

    cfg = json.loads((copy / "config.json").read_text())
    _set_config(copy, image_token_id=cfg[special])
    with pytest.raises(ValueError, match=f"config.json: image_token_id = {cfg[special]} is also {special}"):
        lmmrt.load(copy, device="cpu")


@pytest.mark.parametrize("layers, message", [
    ([-1, -1], r"vision.feature_layers = \[-1, -1\]: names a hidden state twice"),
    ([1, -1], r"vision.feature_layers = \[1, -1\]: names a hidden state twice"),  # with 1 block, state 1 is -1
    ([-1, -2], r"perceiver.dim = \d+ differs from the vision features' width \d+"),
])
def test_vision_feature_layers_that_do_not_fit_are_refused_at_load(copy, layers, message):
    import lmmrt

    vision = json.loads((copy / "config.json").read_text())["vision"]
    if layers == [1, -1]:
        layers = [vision["layers"], -1]
        message = rf"vision.feature_layers = \[{vision['layers']}, -1\]: names a hidden state twice"
    _set_config(copy, vision={**vision, "feature_layers": layers})
    with pytest.raises(ValueError, match=message):
        lmmrt.load(copy, device="cpu")


# -- an output path under a file says so, not "[Errno 17] File exists" --------------------------------------

def test_demo_save_under_a_file_says_the_file_is_not_a_directory(tmp_path, capsys):
    (tmp_path / "red.png").write_bytes(b"x")
    out = tmp_path / "red.png" / "sub" / "demo"
    assert cli.main(["demo", "--save", str(out)]) == cli.EXIT_ERROR
    err = capsys.readouterr().err
    assert err.strip() == f"lmmrt: error: cannot write {out}: {tmp_path / 'red.png'} is a file, not a directory", err


# -- NaN / inf weights are refused at load, naming the tensors -----------------------------------------------

def test_nonfinite_weights_are_refused_at_load_naming_the_keys(copy):
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    import lmmrt
    from lmmrt.errors import CheckpointError

    path = copy / "model.safetensors"
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
    sd = load_file(str(path))
    keys = sorted(k for k, t in sd.items() if t.dim() == 2)[:2]
    sd[keys[0]][1, 2] = float("nan")
    sd[keys[1]][0, -1] = float("-inf")
    save_file(sd, str(path), metadata=meta)
    with pytest.raises(CheckpointError, match=rf"model.safetensors: 2 tensor\(s\) hold NaN or inf values as loaded "
                                              rf"in float32: {keys[0]}, {keys[1]} "):
        lmmrt.load(copy, device="cpu")


@pytest.mark.parametrize("template", ["{foo}{image}", "<x>{image}{}", "{image}{ image }"])
def test_image_prompt_template_fields_other_than_image_are_refused(copy, template):
    import lmmrt

    _set_config(copy, image_prompt_template=template)
    with pytest.raises(ValueError, match=r"image_prompt_template = .*: \{.*\} is not a field; \{image\} is the only"):
        lmmrt.load(copy, device="cpu")
