"""`lmmrt convert clip`: every source format gives the same checkpoint, every bad key is named in
one error, outputs are never overwritten unasked, and the checkpoint's config is validated."""

from __future__ import annotations

import json

import pytest
import torch
from clip_util import make_tokenizer, open_clip_state_dict, sample_images, save_tiny_clip, tiny_clip

import lmmrt
from lmmrt.cli import main
from lmmrt.convert.clip_model import convert_clip
from lmmrt.errors import CheckpointError, ConfigError
from lmmrt.runtime.checkpoint_writer import OutputExistsError


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    d = tmp_path_factory.mktemp("clip_src")
    save_tiny_clip(d / "src")
    return d / "src"


@pytest.fixture(scope="module")
def converted(source, tmp_path_factory):
    out = tmp_path_factory.mktemp("clip_out") / "ckpt"
    assert main(["convert", "clip", str(source), str(out), "--quiet"]) == 0
    return out


def _tensors(ckpt):
    from safetensors.torch import load_file

    return load_file(str(ckpt / "model.safetensors"))


def test_checkpoint_layout(source, converted):
    cfg = json.loads((converted / "config.json").read_text())
    assert cfg["family"] == "clip" and cfg["text"]["pooling"] == "eos" and cfg["projection_dim"] == 24
    assert cfg["vision"]["resize"] == "resize_crop_hf" and cfg["vision"]["output"] == "all_tokens"
    assert (converted / "tokenizer.json").read_bytes() == (source / "tokenizer.json").read_bytes()
    t = _tensors(converted)
    assert t["logit_scale"].item() == pytest.approx(1.7)
    assert t["text.blocks.1.wqkv.weight"].shape == (96, 32) and t["vision.blocks.0.wqkv.weight"].shape == (120, 40)


@pytest.mark.parametrize("how", ["bin", "sharded"])
def test_bin_and_sharded_sources_give_the_same_tensors(how, converted, tmp_path):
    src = tmp_path / "src"  # the fixture's source again (the same seed), saved another way
    model = save_tiny_clip(src)
    (src / "model.safetensors").unlink()
    if how == "sharded":
        model.save_pretrained(src, max_shard_size="40KB")
        assert (src / "model.safetensors.index.json").exists() and len(list(src.glob("model-*.safetensors"))) > 1
    else:  # transformers 5 writes safetensors only: the older format, as older checkpoints hold it
        torch.save(model.state_dict(), src / "pytorch_model.bin")
    convert_clip(src, tmp_path / "out", progress=False)
    want, got = _tensors(converted), _tensors(tmp_path / "out")
    assert want.keys() == got.keys()
    for k in want:
        assert torch.equal(want[k], got[k]), k


def test_every_bad_key_is_named_in_one_error(source, tmp_path):
    from safetensors.torch import load_file, save_file

    src = tmp_path / "src"
    src.mkdir()
    for f in ("config.json", "tokenizer.json"):
        (src / f).write_bytes((source / f).read_bytes())
    sd = load_file(str(source / "model.safetensors"))
    del sd["text_model.encoder.layers.1.self_attn.k_proj.weight"]
    sd["vision_model.post_layernorm.weight"] = torch.ones(7)
    sd["text_model.extra_head.weight"] = torch.ones(3)
    save_file(sd, str(src / "model.safetensors"))
    with pytest.raises(CheckpointError) as e:
        convert_clip(src, tmp_path / "out", progress=False)
    msg = str(e.value)
    assert "missing keys (1): text_model.encoder.layers.1.self_attn.k_proj.weight" in msg
    assert "unexpected keys (1): text_model.extra_head.weight" in msg
    assert "vision_post_ln.weight needs (40,): from vision_model.post_layernorm.weight (7,)" in msg
    assert not (tmp_path / "out").exists()


def test_output_is_never_overwritten_unasked(source, converted, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "config.json").write_text("{}")
    with pytest.raises(OutputExistsError):
        convert_clip(source, out, progress=False)
    assert main(["convert", "clip", str(source), str(out), "--quiet", "--force", "--dtype", "float16"]) == 0
    assert all(t.dtype == torch.float16 for t in _tensors(out).values())
    with pytest.raises(ValueError, match="is inside the source|inside the source"):
        convert_clip(source, source / "out", progress=False)


def test_wrong_sources_are_refused(converted, tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    (src / "config.json").write_text(json.dumps({"model_type": "llava"}))
    with pytest.raises(ValueError, match="model_type is 'llava', expected 'clip'"):
        convert_clip(src, tmp_path / "out", progress=False)
    with pytest.raises(ValueError, match="already an lmmrt checkpoint"):
        convert_clip(converted, tmp_path / "out2", progress=False)


@pytest.mark.parametrize("edit, match", [
    (lambda c: c["text"].update(heads=5), r"text\.heads = 5 does not divide text\.width = 32"),
    (lambda c: c["text"].update(pooling="mean"), r"text\.pooling = 'mean': must be one of argmax, eos"),
    (lambda c: c["text"].update(eos_token_id=99), r"text\.eos_token_id = 99: must be between 0 and 19"),
    (lambda c: c.update(projection_dim=0), r"projection_dim = 0: must be between 1"),
    (lambda c: c["vision"].update(output="patch_tokens"), r"vision\.output = 'patch_tokens'.*'all_tokens'"),
    (lambda c: c.update(temperature=1), r"unknown fields \['temperature'\]"),
    (lambda c: c.pop("text"), r"text: must be a JSON object"),
])
def test_config_is_validated_at_load(converted, tmp_path, edit, match):
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    for f in ("model.safetensors", "tokenizer.json"):
        (ckpt / f).symlink_to(converted / f)
    cfg = json.loads((converted / "config.json").read_text())
    edit(cfg)
    (ckpt / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConfigError, match=match):
        lmmrt.load(ckpt, device="cpu")


def test_weights_are_checked_against_the_config(converted, tmp_path):
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    (ckpt / "model.safetensors").symlink_to(converted / "model.safetensors")
    cfg = json.loads((converted / "config.json").read_text())
    cfg["projection_dim"] = 16
    (ckpt / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=r"visual_proj\.weight: shape \(24, 40\), expected \(16, 40\)"):
        lmmrt.load(ckpt, device="cpu")


def test_without_tokenizer_images_only(converted, tmp_path):
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    for f in ("model.safetensors", "config.json"):
        (ckpt / f).symlink_to(converted / f)
    model = lmmrt.load(ckpt, device="cpu")
    assert lmmrt.embed(model, images=sample_images()[:1]).image.shape == (1, 24)
    with pytest.raises(ValueError, match="has no tokenizer.json, so it embeds images only"):
        lmmrt.embed(model, texts=["a cat"])


def test_open_clip_state_dict_matches_transformers(tmp_path):
    """The same weights as an open_clip file (argmax pooling, QuickGELU, heads of 64) give
    transformers' embeddings; the tokenizer comes from --tokenizer."""
    import torch.nn.functional as F
    from safetensors.torch import save_file

    from lmmrt.runtime.embed import tokenize
    from lmmrt.runtime.processor import preprocess_images

    hf = tiny_clip(3, legacy_eos=True, open_clip_shapes=True)
    save_file({"module." + k: v for k, v in open_clip_state_dict(hf).items()}, str(tmp_path / "clip.safetensors"))
    make_tokenizer().save(str(tmp_path / "tokenizer.json"))
    assert main(["convert", "clip", str(tmp_path / "clip.safetensors"), str(tmp_path / "out"), "--quiet",
                 "--tokenizer", str(tmp_path / "tokenizer.json")]) == 0
    model = lmmrt.load(tmp_path / "out", device="cpu")
    assert model.config.text.pooling == "argmax" and model.config.vision.resize == "resize_crop"
    texts = ["a photo of a cat.", "dog", "a very big red car on the table ."]
    e = lmmrt.embed(model, images=sample_images(), texts=texts)
    ids = tokenize(model, texts)
    with torch.no_grad():
        ref_text = F.normalize(hf.get_text_features(input_ids=ids).pooler_output, dim=-1)
        pixels = preprocess_images(sample_images(), model.config.vision)
        ref_image = F.normalize(hf.get_image_features(pixel_values=pixels).pooler_output, dim=-1)
    torch.testing.assert_close(e.text, ref_text, atol=1e-5, rtol=0)
    torch.testing.assert_close(e.image, ref_image, atol=1e-5, rtol=0)


def test_open_clip_file_without_text_tower_is_refused(tmp_path):
    from safetensors.torch import save_file

    sd = {k: v for k, v in open_clip_state_dict(tiny_clip(3, open_clip_shapes=True)).items()
          if k.startswith("visual.")}
    save_file(sd, str(tmp_path / "visual.safetensors"))
    with pytest.raises(CheckpointError, match="no token_embedding.weight: an open_clip CLIP state dict"):
        convert_clip(tmp_path / "visual.safetensors", tmp_path / "out", progress=False)


def test_non_finite_source_weights_are_refused(source, tmp_path):
    from safetensors.torch import load_file, save_file

    src = tmp_path / "src"
    src.mkdir()
    for f in ("config.json", "tokenizer.json"):
        (src / f).write_bytes((source / f).read_bytes())
    sd = load_file(str(source / "model.safetensors"))
    sd["text_model.final_layer_norm.bias"][2] = float("inf")
    save_file(sd, str(src / "model.safetensors"))
    with pytest.raises(CheckpointError, match="1 tensor.* NaN or inf .*text_model.final_layer_norm.bias"):
        convert_clip(src, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


def test_source_without_tokenizer_warns_at_convert(source, tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    for f in ("config.json", "model.safetensors"):
        (src / f).symlink_to(source / f)
    with pytest.warns(UserWarning, match="has no tokenizer.json: the model will embed images only"):
        convert_clip(src, tmp_path / "out", progress=False)
