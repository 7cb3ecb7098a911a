"""LLaVA-1.5 against transformers' LlavaForConditionalGeneration: tiny random models in float32 on
the CPU (GQA, non-zero everything), converted with `lmmrt convert llava`; prompt logits within
1e-4 relative, identical greedy tokens, batches mixing prompts with 0, 1 and 2 images and
different lengths, non-square images through LLaVA's CLIP processor."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from llava_util import IMAGE_ID, expanded, hf_prompt_logits, tiny_llava

import lmmrt
from lmmrt.convert.llava import convert_llava

# the tiny models here are saved without tokenizer.json on purpose: the warning users get for that is expected
pytestmark = pytest.mark.filterwarnings("ignore:.*has no tokenizer.json")

# (vision_feature_layer, vision_feature_select_strategy): LLaVA-1.5's own, and a list of layers with the CLS kept
VARIANTS = [(-2, "default"), ([-3, -1], "full")]
PROMPTS = [[1, 5, IMAGE_ID, 7, 8, 9, 11], [1, 6, 12], [1, IMAGE_ID, 3, 4, IMAGE_ID, 13, 14, 15, 16]]


@pytest.fixture(scope="module", params=VARIANTS, ids=["layer-2-default", "layers-3,-1-full"])
def pair(request, tmp_path_factory):
    layer, strategy = request.param
    hf = tiny_llava(feature_layer=layer, strategy=strategy)
    d = tmp_path_factory.mktemp("llava")
    hf.save_pretrained(d / "src")
    convert_llava(d / "src", d / "out", progress=False)
    return hf, d / "out"


@pytest.fixture(scope="module")
def pixels():
    g = torch.Generator().manual_seed(3)
    return torch.randn(3, 3, 28, 28, generator=g)


def _images(pixels):
    """Per prompt of PROMPTS: 1, 0 and 2 images."""
    return [[pixels[0]], [], [pixels[1], pixels[2]]]


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


def test_prompt_logits_batch_with_0_1_2_images(pair, pixels):
    hf, out = pair
    model = lmmrt.load(out, device="cpu", backend="torch")
    n = model.config.media_tokens
    got = lmmrt.logits(model, PROMPTS, _images(pixels))
    for ids, imgs, logits in zip(PROMPTS, _images(pixels), got):
        ref = hf_prompt_logits(hf, ids, torch.stack(imgs) if imgs else None, n)
        assert logits.shape == ref.shape == (len(expanded(ids, n)), 96)  # image feature positions included
        assert _rel(logits, ref) < 1e-4


@pytest.mark.parametrize("cuda_graph", [False, True], ids=["eager-step", "fixed-shape-step"])
def test_greedy_tokens_match_transformers(pair, pixels, cuda_graph):
    hf, out = pair
    # cuda_graph=True on the CPU: the fixed-shape decode step CUDA graphs capture, run eagerly
    model = lmmrt.load(out, device="cpu", backend="torch", cuda_graph=cuda_graph)
    n = model.config.media_tokens
    res = lmmrt.generate(model, PROMPTS, _images(pixels), max_new_tokens=16, ignore_eos=True)
    # no end of sequence on either side (min_new_tokens would mask eos out of transformers' logits instead)
    hf.generation_config.eos_token_id = None
    hf.generation_config.pad_token_id = 0
    for ids, imgs, r in zip(PROMPTS, _images(pixels), res):
        media = {"pixel_values": torch.stack(imgs)} if imgs else {}  # transformers' generate refuses None
        with torch.no_grad():
            ref = hf.generate(input_ids=torch.tensor([expanded(ids, n)]), **media, max_new_tokens=16, do_sample=False)
        assert r.token_ids == ref[0, len(expanded(ids, n)):].tolist()


def test_non_square_images_through_llava_processor(tmp_path):
    """uint8 images of other aspect ratios: lmmrt's preprocessing (shortest side, transformers' floored
    centre crop, CLIP mean/std) against CLIPImageProcessor feeding transformers."""
    from transformers import CLIPImageProcessor

    hf = tiny_llava(feature_layer=-2, strategy="default")
    hf.save_pretrained(tmp_path / "src")
    convert_llava(tmp_path / "src", tmp_path / "out", progress=False)
    model = lmmrt.load(tmp_path / "out", device="cpu", backend="torch")
    rng = np.random.default_rng(0)
    imgs = [rng.integers(0, 256, (45, 31, 3), dtype=np.uint8), rng.integers(0, 256, (29, 64, 3), dtype=np.uint8)]
    proc = CLIPImageProcessor(size={"shortest_edge": 28}, crop_size={"height": 28, "width": 28})
    px = proc(images=imgs, return_tensors="pt")["pixel_values"]
    ids = [1, IMAGE_ID, 4, IMAGE_ID, 5]
    got = lmmrt.logits(model, [ids], [imgs])[0]
    assert _rel(got, hf_prompt_logits(hf, ids, px, model.config.media_tokens)) < 1e-4


def test_marker_and_image_count_errors(pair, pixels):
    _, out = pair
    model = lmmrt.load(out, device="cpu", backend="torch")
    with pytest.raises(ValueError, match=r"prompt 0 has 1 media marker\(s\) .* but 2 image\(s\)"):
        lmmrt.logits(model, [[1, IMAGE_ID, 5]], [[pixels[0], pixels[1]]])
    with pytest.raises(ValueError, match=r"prompt 1 has 0 media marker\(s\) .* but 1 image\(s\)"):
        lmmrt.logits(model, [[1, IMAGE_ID, 5], [1, 5]], [[pixels[0]], [pixels[1]]])
    # each image counts its feature tokens against the context (256 positions)
    many = [1] + [IMAGE_ID] * 16
    with pytest.raises(ValueError, match=r"prompt 0 has \d+ tokens \(each image counting \d+\)"):
        lmmrt.generate(model, [many], [[pixels[0]] * 16], max_new_tokens=4)


def test_processor_expanded_markers_are_named_before_the_context(pair, pixels):
    _, out = pair
    model = lmmrt.load(out, device="cpu", backend="torch")
    n = model.config.media_tokens
    ids = expanded([1, IMAGE_ID, 5, 6], n)  # what LLaVA's processor gives for one image
    with pytest.raises(ValueError, match=f"prompt 0 has {n} media marker.* but 1 image.*{n} of them stand in a "
                                         f"row.*already expanded.*one marker per image"):
        lmmrt.generate(model, [ids], [[pixels[0]]], max_new_tokens=4)
