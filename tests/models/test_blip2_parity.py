"""BLIP-2 (OPT) against transformers Blip2ForConditionalGeneration in float32 on tiny random models:
the ViT, the Q-Former connector, prompt logits (1e-4 relative) and greedy tokens, batches with and
without images, left padding, both OPT layer-norm placements."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from blip2_util import IMAGE_TOKEN_ID, N_QUERIES, tiny_blip2
from PIL import Image

import lmmrt
from lmmrt.convert.blip2 import convert_blip2

# the tiny models here are saved without tokenizer.json on purpose: the warning users get for that is expected
pytestmark = pytest.mark.filterwarnings("ignore:.*has no tokenizer.json")

MEAN = torch.tensor([0.48145466, 0.4578275, 0.40821073])
STD = torch.tensor([0.26862954, 0.26130258, 0.27577711])


def _image(seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (28, 28, 3), dtype=np.uint8))  # the ViT's size: no resampling


def _pixels(img: Image.Image) -> torch.Tensor:
    x = torch.from_numpy(np.array(img)).float().permute(2, 0, 1) / 255.0
    return ((x - MEAN[:, None, None]) / STD[:, None, None])[None]


def _convert(ref, tmp_path, name="blip2"):
    src = tmp_path / f"{name}-hf"
    ref.save_pretrained(src)
    out = convert_blip2(src, tmp_path / name, progress=False)
    return lmmrt.load(out, device="cpu", backend="torch")


def _ref_logits(ref, ids: list[int], img) -> torch.Tensor:
    """transformers with the markers already expanded to the query count, as its processor does."""
    full = [t for i in ids for t in ([IMAGE_TOKEN_ID] * N_QUERIES if i == IMAGE_TOKEN_ID else [i])]
    kw = {} if img is None else {"pixel_values": _pixels(img)}
    with torch.no_grad():
        if img is None:
            return ref.language_model(input_ids=torch.tensor([full])).logits[0]
        return ref(input_ids=torch.tensor([full]), **kw).logits[0]


@pytest.fixture(scope="module")
def blip2(tmp_path_factory):
    ref = tiny_blip2(seed=3)
    return ref, _convert(ref, tmp_path_factory.mktemp("blip2"))


def _rel_err(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


def test_vision_and_qformer_match(blip2):
    ref, model = blip2
    img = _image(0)
    with torch.no_grad():
        want = ref.get_image_features(pixel_values=_pixels(img)).pooler_output
        got = model.module.encode_media(_pixels(img)[:, None])
    assert got.shape == want.shape == (1, N_QUERIES, 48)
    assert _rel_err(got, want) < 1e-5


def test_prompt_logits_batch_with_padding(blip2):
    ref, model = blip2
    # BLIP-2's prompt: image features first, then BOS (2) and the text; one prompt without an image
    prompts = [[IMAGE_TOKEN_ID, 2, 10, 11, 12, 13, 14], [IMAGE_TOKEN_ID, 2, 20, 21], [2, 30, 31, 32]]
    images = [[_image(1)], [_image(2)], []]
    got = lmmrt.logits(model, prompts, images)
    for ids, imgs, g in zip(prompts, images, got):
        want = _ref_logits(ref, ids, imgs[0] if imgs else None)
        assert g.shape == want.shape
        assert _rel_err(g, want) < 1e-4


def _ref_greedy(ref, ids: list[int], img, n: int) -> list[int]:
    """transformers' greedy continuation, one full forward per token (no stop token)."""
    out = list(ids)
    for _ in range(n):
        out.append(int(_ref_logits(ref, out, img)[-1].argmax()))
    return out[len(ids):]


@pytest.mark.parametrize("cuda_graph", [False, True], ids=["eager-step", "fixed-shape-step"])
def test_greedy_tokens_match(blip2, cuda_graph):
    """Left padding, one prompt without an image; cuda_graph=True on the CPU runs the fixed-shape
    decode step that CUDA graphs capture (OPT's positions from the device-side slot)."""
    ref, model = blip2
    model = lmmrt.load(model.path, device="cpu", backend="torch", cuda_graph=cuda_graph)
    prompts = [[IMAGE_TOKEN_ID, 2, 10, 11, 12], [2, 40, 41, 42, 43, 44, 45]]
    images = [[_image(4)], []]
    got = lmmrt.generate(model, prompts, images, max_new_tokens=6, ignore_eos=True)
    for ids, imgs, g in zip(prompts, images, got):
        assert g.token_ids == _ref_greedy(ref, ids, imgs[0] if imgs else None, 6)


@pytest.mark.parametrize("opt", [{"do_layer_norm_before": False}, {"tie_word_embeddings": False}])
def test_opt_variants(tmp_path, opt):
    """OPT-350m's post-norm layers (no final norm); an untied head."""
    ref = tiny_blip2(seed=5, opt=opt, cross_attention_frequency=1)
    model = _convert(ref, tmp_path)
    prompts = [[IMAGE_TOKEN_ID, 2, 10, 11, 12], [IMAGE_TOKEN_ID, 2, 7]]
    images = [[_image(5)], [_image(6)]]
    for ids, imgs, g in zip(prompts, images, lmmrt.logits(model, prompts, images)):
        assert _rel_err(g, _ref_logits(ref, ids, imgs[0])) < 1e-4


def test_float16_load_runs_close_to_float32(blip2):
    """The whole model in float16 (the CPU runs fp16 matmuls): finite and near the float32 logits."""
    ref, model = blip2
    half = lmmrt.load(model.path, device="cpu", dtype="float16", backend="torch")
    prompts, images = [[IMAGE_TOKEN_ID, 2, 10, 11, 12], [2, 20, 21]], [[_image(8)], []]
    for got, want in zip(lmmrt.logits(half, prompts, images), lmmrt.logits(model, prompts, images)):
        assert torch.isfinite(got).all()
        assert _rel_err(got, want) < 2e-2
