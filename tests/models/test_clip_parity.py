"""CLIP against transformers' CLIPModel in float32: image and text embeddings (normalized, within
1e-5), zero-shot probabilities, the tokenizer and image processor, batching, and the errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from clip_util import EOS_ID, MAX_POSITIONS, make_tokenizer, sample_images, save_tiny_clip

import lmmrt
from lmmrt.cli import main
from lmmrt.runtime.embed import tokenize

TEXTS = ["a photo of a cat.", "dog", "a very big red car on the table .",
         # longer than the model's 12 positions: cut as CLIP's tokenizer does with truncation=True
         "a small blue dog on a red table on a big car on the table"]


@pytest.fixture(scope="module", params=["eos", "legacy_eos"])
def clip_pair(request, tmp_path_factory):
    """(transformers CLIPModel, the lmmrt model converted from it with the CLI)."""
    d = tmp_path_factory.mktemp(f"clip_{request.param}")
    hf = save_tiny_clip(d / "src", legacy_eos=request.param == "legacy_eos")
    assert main(["convert", "clip", str(d / "src"), str(d / "out"), "--quiet"]) == 0
    return hf, lmmrt.load(d / "out", device="cpu")


def hf_text_inputs(texts):
    from transformers import PreTrainedTokenizerFast

    tok = PreTrainedTokenizerFast(tokenizer_object=make_tokenizer(), pad_token="<eos>")
    return tok(texts, padding=True, truncation=True, max_length=MAX_POSITIONS, return_tensors="pt")


def hf_pixels(images):
    from PIL import Image
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    proc = CLIPImageProcessorPil(size={"shortest_edge": 28}, crop_size={"height": 28, "width": 28})
    return proc(images=[Image.fromarray(a) for a in images], return_tensors="pt").pixel_values


def odd_crop_images():
    """sample_images plus sizes whose centre crop has an odd excess (transformers floors the offset)."""
    rng = np.random.default_rng(5)
    return sample_images() + [rng.integers(0, 256, (28, 35, 3), dtype=np.uint8),
                              rng.integers(0, 256, (47, 30, 3), dtype=np.uint8)]


def test_tokenizer_matches_transformers_truncation_and_padding(clip_pair):
    _, model = clip_pair
    ids = tokenize(model, TEXTS)
    ref = hf_text_inputs(TEXTS)
    assert ids.shape[1] == MAX_POSITIONS
    assert torch.equal(ids, ref.input_ids)
    assert (ids[:, 0] == 1).all() and (ids == EOS_ID).any(dim=1).all()


def test_text_embeddings_match_transformers(clip_pair):
    hf, model = clip_pair
    inputs = hf_text_inputs(TEXTS)
    with torch.no_grad():
        ref = F.normalize(hf.get_text_features(**inputs).pooler_output, dim=-1)
    got = lmmrt.embed(model, texts=TEXTS)
    assert got.image is None and got.text.shape == ref.shape
    torch.testing.assert_close(got.text, ref, atol=1e-5, rtol=0)
    torch.testing.assert_close(got.text.norm(dim=-1), torch.ones(len(TEXTS)))


def test_image_embeddings_match_transformers(clip_pair):
    from PIL import Image

    hf, model = clip_pair
    images = odd_crop_images()
    with torch.no_grad():
        ref = F.normalize(hf.get_image_features(pixel_values=hf_pixels(images)).pooler_output, dim=-1)
    # the same images as uint8 arrays, PIL images and uint8 tensors
    mixed = [images[0], Image.fromarray(images[1]), torch.from_numpy(images[2]), *images[3:]]
    got = lmmrt.embed(model, images=mixed)
    assert got.text is None
    torch.testing.assert_close(got.image, ref, atol=1e-5, rtol=0)


def test_zero_shot_matches_transformers_logits(clip_pair):
    hf, model = clip_pair
    images, labels = sample_images(), ["cat", "red dog", "car on the table"]
    inputs = hf_text_inputs([f"a photo of a {lab}." for lab in labels])
    with torch.no_grad():
        ref = hf(**inputs, pixel_values=hf_pixels(images)).logits_per_image.softmax(dim=-1)
    probs = lmmrt.zero_shot(model, images, labels)
    assert probs.shape == (len(images), len(labels))
    torch.testing.assert_close(probs, ref, atol=1e-5, rtol=0)
    # the checkpoint's logit scale is used: exp(1.7), not 1 or 100
    e = lmmrt.embed(model, images=images, texts=[f"a photo of a {lab}." for lab in labels])
    torch.testing.assert_close(probs, torch.softmax(np.exp(1.7) * e.image @ e.text.T, dim=-1), atol=1e-5, rtol=0)


def test_batches_give_the_same_embeddings(clip_pair):
    _, model = clip_pair
    whole = lmmrt.embed(model, images=sample_images(), texts=TEXTS)
    small = lmmrt.embed(model, images=sample_images(), texts=TEXTS, batch_size=3)
    single = [lmmrt.embed(model, texts=[t]).text[0] for t in TEXTS]
    torch.testing.assert_close(small.image, whole.image, atol=1e-6, rtol=0)
    torch.testing.assert_close(small.text, whole.text, atol=1e-6, rtol=0)
    torch.testing.assert_close(torch.stack(single), whole.text, atol=1e-6, rtol=0)


@pytest.mark.parametrize("call, error, match", [
    (lambda m: lmmrt.zero_shot(m, sample_images(), "cat,dog"), TypeError, "labels must be a list"),
    (lambda m: lmmrt.zero_shot(m, sample_images(), []), ValueError, "labels is empty"),
    (lambda m: lmmrt.zero_shot(m, sample_images(), ["cat", " "]), ValueError, r"labels\[1\] is empty"),
    (lambda m: lmmrt.zero_shot(m, sample_images(), ["cat", 3]), TypeError, r"labels\[1\] is a int"),
    (lambda m: lmmrt.zero_shot(m, sample_images(), ["cat", "cat"]), ValueError, "labels repeat"),
    (lambda m: lmmrt.zero_shot(m, sample_images(), ["cat"], template="a photo"), ValueError, "must contain {}"),
    (lambda m: lmmrt.zero_shot(m, sample_images(), ["cat"], template="{} {}"), ValueError, "exactly once"),
    (lambda m: lmmrt.zero_shot(m, [], ["cat"]), ValueError, "images is empty"),
    (lambda m: lmmrt.embed(m), ValueError, "needs images=, texts= or both"),
    (lambda m: lmmrt.embed(m, texts="a cat"), TypeError, "texts must be a list"),
    (lambda m: lmmrt.embed(m, texts=["a cat"], batch_size=0), ValueError, "batch_size"),
    (lambda m: lmmrt.embed(m, images=["x.jpg"]), TypeError, r"images\[0\]: unsupported image type"),
    (lambda m: lmmrt.generate(m, "a cat"), TypeError, "CLIP checkpoint.*lmmrt.embed"),
    (lambda m: lmmrt.logits(m, ["a cat"]), TypeError, "cannot generate"),
    (lambda m: m.generate("a cat"), TypeError, "zero_shot"),
])
def test_clear_errors(clip_pair, call, error, match):
    _, model = clip_pair
    with pytest.raises(error, match=match):
        call(model)


def test_classify_cli_prints_the_zero_shot_table(clip_pair, tmp_path, capsys):
    from PIL import Image

    _, model = clip_pair
    paths = []
    for i, a in enumerate(sample_images()[:2]):
        paths.append(str(tmp_path / f"img{i}.png"))
        Image.fromarray(a).save(paths[-1])
    assert main(["classify", model.path, "-i", paths[0], "-i", paths[1], "--labels", "cat, dog,car",
                 "--template", "the {} .", "--quiet"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0].split() == ["image", "cat", "dog", "car"]
    printed = torch.tensor([[float(v) for v in line.split()[1:]] for line in lines[1:]])
    want = lmmrt.zero_shot(model, [Image.open(p) for p in paths], ["cat", "dog", "car"], "the {} .")
    torch.testing.assert_close(printed, want, atol=6e-5, rtol=0)


@pytest.mark.parametrize("argv, match", [
    (["--labels", ","], "no labels given"),
    (["--labels", "cat,,dog"], "an empty label"),
    (["--labels", "cat", "--template", "a photo"], "must contain {}"),
])
def test_classify_cli_errors(clip_pair, tmp_path, capsys, argv, match):
    from PIL import Image

    _, model = clip_pair
    Image.fromarray(sample_images()[0]).save(tmp_path / "a.png")
    try:  # argument errors exit from argparse, the others return the status
        status = main(["classify", model.path, "-i", str(tmp_path / "a.png"), *argv])
    except SystemExit as e:
        status = e.code
    assert status == 2
    assert match in capsys.readouterr().err


def test_flamingo_loader_and_generate_cli_refuse_a_clip_checkpoint(clip_pair, capsys):
    from lmmrt.errors import CheckpointError
    from lmmrt.runtime.weights import load_checkpoint

    _, model = clip_pair
    with pytest.raises(CheckpointError, match="is a CLIP checkpoint.*lmmrt.embed"):
        load_checkpoint(model.path)
    assert main(["generate", model.path, "-p", "a cat", "--quiet"]) == 2
    assert "use lmmrt.embed, lmmrt.zero_shot or `lmmrt classify`" in capsys.readouterr().err
