"""Bad input gets a clear error that names what is wrong, before anything reaches a kernel."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

import lmmrt
from lmmrt.demo import demo_model, save_demo
from lmmrt.runtime.weights import CheckpointError


@pytest.fixture(scope="module")
def model():
    return demo_model(device="cpu", backend="torch")


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return save_demo(tmp_path_factory.mktemp("demo") / "ckpt")


def _img():
    return np.random.default_rng(0).integers(0, 255, (40, 50, 3), dtype=np.uint8)


def test_more_markers_than_images(model):
    with pytest.raises(ValueError, match=r"prompt 0 has 2 media marker\(s\).*but 1 image\(s\)"):
        lmmrt.generate(model, "a<image>b<image>c", [_img()], max_new_tokens=2)


def test_more_images_than_markers(model):
    with pytest.raises(ValueError, match=r"prompt 1 has 1 media marker\(s\).*but 3 image\(s\)"):
        lmmrt.generate(model, ["x", "<image>y"], [[], [_img(), _img(), _img()]], max_new_tokens=2)


@pytest.mark.parametrize("bad, msg", [
    (np.zeros((40, 50), dtype=np.uint8), r"shape \(H, W, 3\)"),
    (np.zeros((40, 50, 4), dtype=np.uint8), r"shape \(H, W, 3\)"),
    (np.zeros((40, 50, 3), dtype=np.float32), "must be uint8"),
    (torch.zeros(40, 50, 3), r"float image tensor must have shape \(3, H, W\)"),
    (torch.zeros(3, 4, 4, dtype=torch.int32), "not supported"),
    ("cat.png", "unsupported image type str"),
])
def test_wrong_image_shape_or_dtype(model, bad, msg):
    with pytest.raises((ValueError, TypeError), match=msg) as e:
        lmmrt.generate(model, "<image>hi", [bad], max_new_tokens=2)
    assert "images[0][0]" in str(e.value)


def test_prompt_longer_than_context(model):
    long = "a" * (model.config.decoder.max_seq_len - 10)
    with pytest.raises(ValueError, match=r"prompt 0 has \d+ tokens; with max_new_tokens=64 that is \d+, beyond the model's context of 1024"):
        lmmrt.generate(model, long, max_new_tokens=64)


def test_token_ids_out_of_vocab(model):
    with pytest.raises(ValueError, match=r"prompt 0 has token ids outside the vocabulary"):
        lmmrt.generate(model, [[1, 2, 10**6]], max_new_tokens=2)


def test_bad_sampling_options(model):
    with pytest.raises(ValueError, match="top_p"):
        lmmrt.generate(model, "hi", max_new_tokens=2, top_p=0.0)
    with pytest.raises(ValueError, match="max_new_tokens must be >= 0"):
        lmmrt.generate(model, "hi", max_new_tokens=-1)


def test_unknown_backend():
    with pytest.raises(ValueError, match="unknown backend 'fast'"):
        demo_model(device="cpu", backend="fast")


def test_truncated_safetensors(ckpt, tmp_path):
    bad = tmp_path / "trunc"
    bad.mkdir()
    for f in ckpt.iterdir():
        (bad / f.name).write_bytes(f.read_bytes())
    w = bad / "model.safetensors"
    w.write_bytes(w.read_bytes()[: w.stat().st_size // 2])
    with pytest.raises(CheckpointError, match=r"model.safetensors.*(truncated or corrupted|cannot be read)"):
        lmmrt.load(bad, device="cpu")


def test_corrupted_safetensors_header(ckpt, tmp_path):
    bad = tmp_path / "garbage"
    bad.mkdir()
    (bad / "config.json").write_bytes((ckpt / "config.json").read_bytes())
    (bad / "model.safetensors").write_bytes(b"\x00\x01garbage" * 100)
    with pytest.raises(CheckpointError, match="not a readable safetensors file"):
        lmmrt.load(bad, device="cpu")


def test_missing_key_is_named(ckpt, tmp_path):
    from safetensors.torch import load_file, save_file

    bad = tmp_path / "missing"
    bad.mkdir()
    (bad / "config.json").write_bytes((ckpt / "config.json").read_bytes())
    sd = load_file(str(ckpt / "model.safetensors"))
    del sd["xattn.1.wkv.weight"]
    sd["decoder.layers.0.wo.weight"] = sd["decoder.layers.0.wo.weight"][:, :10].contiguous()
    save_file(sd, str(bad / "model.safetensors"))
    with pytest.raises(CheckpointError) as e:
        lmmrt.load(bad, device="cpu")
    assert "missing keys (1): xattn.1.wkv.weight" in str(e.value)
    assert "decoder.layers.0.wo.weight: shape (256, 10), expected (256, 256)" in str(e.value)


def test_transformers_dir_is_not_an_lmmrt_checkpoint(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "mpt"}))
    with pytest.raises(CheckpointError, match="convert it first"):
        lmmrt.load(tmp_path, device="cpu")


def test_transformers_idefics_dir_without_weights(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "idefics"}))
    with pytest.raises(FileNotFoundError, match="no weights in"):
        lmmrt.load(tmp_path, device="cpu")


def test_missing_directory(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope does not exist"):
        lmmrt.load(tmp_path / "nope", device="cpu")
    (tmp_path / "file").write_text("x")
    with pytest.raises(FileNotFoundError, match="file is not a directory"):
        lmmrt.load(tmp_path / "file", device="cpu")


def test_converter_names_missing_source_key(tmp_path):
    from idefics_util import tiny_idefics
    from safetensors.torch import load_file, save_file

    hf = tiny_idefics()
    hf.save_pretrained(tmp_path / "hf")
    w = tmp_path / "hf" / "model.safetensors"
    sd = load_file(str(w))
    del sd["model.layers.1.mlp.up_proj.weight"]
    sd["model.extra.weight"] = torch.zeros(2)
    save_file(sd, str(w))
    r = subprocess.run([sys.executable, "-m", "lmmrt", "convert", "idefics", str(tmp_path / "hf"),
                        str(tmp_path / "out"), "--quiet"], capture_output=True, text=True)
    assert r.returncode == 2
    assert "missing keys (1): model.layers.1.mlp.up_proj.weight" in r.stderr
    assert "unexpected keys (1): model.extra.weight" in r.stderr


def test_cli_generate_reports_missing_image_file(ckpt):
    r = subprocess.run([sys.executable, "-m", "lmmrt", "generate", str(ckpt), "-p", "<image>hi", "-i", "/no/such.png",
                        "--device", "cpu"], capture_output=True, text=True)
    assert r.returncode != 0
    assert "image file not found: /no/such.png" in r.stderr


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on a machine without CUDA")
@pytest.mark.parametrize("device, msg", [("cuda", "CUDA is not available on this machine"),
                                         ("cuda:1", "CUDA is not available on this machine"),
                                         ("gpu", "unknown device 'gpu'"),
                                         ("mps", "device 'mps' is not supported")])
def test_bad_device(ckpt, device, msg):
    with pytest.raises(ValueError, match=msg):
        lmmrt.load(ckpt, device=device)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on a machine without CUDA")
def test_cli_bad_device_fails_before_loading(ckpt):
    r = subprocess.run([sys.executable, "-m", "lmmrt", "generate", str(ckpt), "-p", "hi", "--device", "cuda"],
                       capture_output=True, text=True)
    assert r.returncode == 2 and "CUDA is not available" in r.stderr and "Traceback" not in r.stderr


def test_cli_existing_output_file(tmp_path):
    f = tmp_path / "taken"
    f.write_text("x")
    r = subprocess.run([sys.executable, "-m", "lmmrt", "demo", "--save", str(f)], capture_output=True, text=True)
    assert r.returncode == 2 and "already exists" in r.stderr and "Traceback" not in r.stderr


def test_invalid_config_json_is_named(ckpt, tmp_path):
    bad = tmp_path / "badjson"
    bad.mkdir()
    (bad / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match=r"badjson/config.json is not valid JSON"):
        lmmrt.load(bad, device="cpu")


def test_converting_an_lmmrt_checkpoint(ckpt, tmp_path):
    r = subprocess.run([sys.executable, "-m", "lmmrt", "convert", "idefics", str(ckpt), str(tmp_path / "o"), "--quiet"],
                       capture_output=True, text=True)
    assert r.returncode == 2 and "already an lmmrt checkpoint" in r.stderr


def test_sampling_error_names_only_the_bad_option(model):
    with pytest.raises(ValueError) as e:
        lmmrt.generate(model, "hi", max_new_tokens=2, top_p=0.0)
    assert "top_p=0.0" in str(e.value) and "temperature" not in str(e.value)


def test_single_image_error_path_names_it_once(model):
    with pytest.raises(ValueError, match=r"^images\[0\]\[0\]: a numpy image"):
        lmmrt.generate(model, "<image>hi", [np.zeros((4, 4), dtype=np.uint8)], max_new_tokens=2)


def test_cli_prompt_backslash_n_is_a_newline(ckpt):
    r = subprocess.run([sys.executable, "-m", "lmmrt", "generate", str(ckpt), "-p", "User: hi\\nAssistant:",
                        "--max-new-tokens", "6", "--device", "cpu", "--quiet"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    m = lmmrt.load(ckpt, device="cpu")
    assert r.stdout.rstrip("\n") == lmmrt.generate(m, "User: hi\nAssistant:", max_new_tokens=6)[0].text


# --- images for several prompts: one list per prompt, no guessing ------------------------------------------
@pytest.mark.parametrize("prompts, images, example, got", [
    (["<image><image>a", "b"], "flat2", r"\[\[img, img\], \[\]\] for 2 prompt", "a flat list of 2 media item"),
    (["<image>a", "<image>b"], "flat2", r"\[\[img\], \[img\]\] for 2 prompt", "a flat list of 2 media item"),
    (["<image>a", "b"], "mixed", r"\[\[img\], \[\]\] for 2 prompt", "mixes lists and media items"),
    (["<image>a", "<image>b"], "three", r"\[\[img\], \[img\]\] for 2 prompt", "got 3 lists"),
])
def test_images_must_be_one_list_per_prompt(model, prompts, images, example, got):
    img = _img()
    images = {"flat2": [img, img], "mixed": [[img], img], "three": [[img], [img], [img]]}[images]
    with pytest.raises(ValueError, match=r"images must be one list per prompt: " + example + ".*" + got):
        lmmrt.generate(model, prompts, images, max_new_tokens=2)


def test_one_prompt_takes_a_flat_list_or_one_nested_list(model):
    img = _img()
    a = lmmrt.logits(model, "x<image>y<image>", [img, img])[0]
    b = lmmrt.logits(model, "x<image>y<image>", [[img, img]])[0]
    c = lmmrt.logits(model, ["x<image>y<image>"], [[img, img]])[0]
    torch.testing.assert_close(a, b)
    torch.testing.assert_close(a, c)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_float_pixels_are_named(model, bad):
    px = torch.randn(3, 30, 30)
    px[1, 2, 3] = bad
    with pytest.raises(ValueError, match=r"images\[1\]\[0\]: the float image holds NaN or inf"):
        lmmrt.generate(model, ["<image>a", "b<image>"], [[torch.randn(3, 30, 30)], [px]], max_new_tokens=2)


def test_empty_float_image_is_named(model):
    with pytest.raises(ValueError, match=r"images\[0\]\[0\]: empty image of shape \(3, 0, 5\)"):
        lmmrt.generate(model, "<image>a", [torch.randn(3, 0, 5)], max_new_tokens=2)


# --- token-id prompts: numpy / torch integers accepted, bools and floats refused -----------------------------
def test_numpy_integer_token_ids_are_accepted(model):
    ids = model.tokenizer.encode("hello there")
    ref = lmmrt.generate(model, [ids], max_new_tokens=4)[0].token_ids
    for prompts in ([np.int64(t) for t in ids], [[np.int32(t) for t in ids]], np.array([ids]),
                    np.array(ids, dtype=np.uint16), torch.tensor(ids, dtype=torch.int32)):
        assert lmmrt.generate(model, prompts, max_new_tokens=4)[0].token_ids == ref


@pytest.mark.parametrize("prompts, msg", [
    ([[1, True, 5]], r"prompts\[0\]\[1\] must be a token id \(an int\), got True"),
    ([1, 2.0, 5], r"prompts\[1\] must be a token id \(an int\), got 2\.0"),
    ([[1, 5], [3, np.float64(4)]], r"prompts\[1\]\[1\] must be a token id"),
    (np.array([[1.0, 2.0]]), "integer dtype"),
    (torch.tensor([True, False]), "integer dtype"),
    (torch.ones(1, 2, 3, dtype=torch.long), "1-D or 2-D"),
])
def test_bad_token_ids_are_named(model, prompts, msg):
    with pytest.raises(TypeError, match=msg):
        lmmrt.generate(model, prompts, max_new_tokens=2)
