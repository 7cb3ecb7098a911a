"""Fixes from the hostile-user review: each test fails on the code before its fix."""

from __future__ import annotations

import numpy as np
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
