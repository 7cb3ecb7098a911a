"""Llama 3.2 Vision end to end against transformers' MllamaForConditionalGeneration: a tiny random
model (tests/mllama_util: local + global vision layers, 2 cross-attention layers, non-zero gates)
saved sharded, converted with `lmmrt convert mllama`, run through lmmrt.logits / lmmrt.generate in
float32 on the CPU. transformers gets its own processor's pixels and cross-attention mask for each
prompt alone; lmmrt batches prompts with 0, 1 and 2 images of two aspect ratios, text before the
first image, consecutive markers and text between images."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from mllama_tokenizer import CHAT_TEMPLATE, mllama_tokenizer
from mllama_util import BOS, IMAGE_ID, tiny_mllama
from PIL import Image

import lmmrt
from lmmrt.convert.mllama_files import convert_mllama

I = IMAGE_ID  # noqa: E741 - the marker, short so prompts read as written
PROMPTS = [
    [BOS, 5, 6, I, 7, 8, 9],  # text before the first image; a wide image
    [BOS, 10, 11, 12],  # no image
    [I, BOS, 13, 14, I, 15, 16, 17],  # text between two images (tall, then wide)
    [BOS, I, I, 20, 21, 22],  # two consecutive markers share the text after them
]
SIZES = [[(20, 50)], [], [(45, 19), (21, 60)], [(33, 30), (16, 40)]]  # (h, w): 1x2, 2x1 and 1x1 tile grids


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    hf = tiny_mllama(seed=3)
    d = tmp_path_factory.mktemp("mllama")
    hf.save_pretrained(d / "src", max_shard_size="60KB")
    mllama_tokenizer().save(str(d / "src" / "tokenizer.json"))
    (d / "src" / "chat_template.jinja").write_text(CHAT_TEMPLATE)
    convert_mllama(d / "src", d / "out", progress=False)
    return hf, d / "out"


@pytest.fixture(scope="module")
def images():
    rng = np.random.default_rng(7)
    return [[(rng.random((h, w, 3)) * 255).astype(np.uint8) for h, w in sizes] for sizes in SIZES]


def hf_inputs(hf_model, ids: list[int], imgs: list, vision) -> dict:
    """transformers' inputs for one prompt: its processor's tiles and its dense cross-attention mask."""
    from transformers.models.mllama.image_processing_pil_mllama import MllamaImageProcessorPil
    from transformers.models.mllama.processing_mllama import (
        convert_sparse_cross_attention_mask_to_dense,
        get_cross_attention_token_mask,
    )

    inputs = {"input_ids": torch.tensor([ids])}
    if imgs:
        proc = MllamaImageProcessorPil(size={"height": vision.image_size, "width": vision.image_size},
                                       max_image_tiles=vision.max_num_tiles, image_mean=list(vision.image_mean),
                                       image_std=list(vision.image_std))
        px = proc([[Image.fromarray(a) for a in imgs]], return_tensors="pt")
        mask = convert_sparse_cross_attention_mask_to_dense(
            [get_cross_attention_token_mask(ids, IMAGE_ID)], px["num_tiles"], vision.max_num_tiles, len(ids))
        inputs.update(pixel_values=px["pixel_values"], aspect_ratio_ids=px["aspect_ratio_ids"],
                      aspect_ratio_mask=px["aspect_ratio_mask"], cross_attention_mask=torch.from_numpy(mask))
    return inputs


def hf_logits(hf_model, ids, imgs, vision) -> torch.Tensor:
    with torch.no_grad():
        return hf_model(**hf_inputs(hf_model, ids, imgs, vision)).logits[0].float()


def hf_greedy(hf_model, ids, imgs, vision, n: int, **kw) -> list[int]:
    # no end of sequence on either side (min_new_tokens would mask eos out of the logits instead)
    with torch.no_grad():
        out = hf_model.generate(**hf_inputs(hf_model, ids, imgs, vision), max_new_tokens=n, do_sample=False,
                                eos_token_id=None, pad_token_id=0, **kw)
    return out[0, len(ids):].tolist()


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


def test_prompt_logits_batch_matches_each_prompt_alone(pair, images):
    hf, out = pair
    model = lmmrt.load(out, device="cpu", backend="torch")
    got = lmmrt.logits(model, PROMPTS, images)
    for ids, imgs, logits in zip(PROMPTS, images, got):
        ref = hf_logits(hf, ids, imgs, model.config.vision)
        assert logits.shape == ref.shape == (len(ids), ref.shape[-1])
        assert _rel(logits, ref) < 1e-4, (ids, _rel(logits, ref))


def test_float16_on_the_cpu_is_as_close_as_transformers_float16(pair, images):
    """float16 logits against transformers' float32 ones, beside transformers' own float16 error: the
    mean error within 1.5x of it (measured 0.8-1.1x), the largest within 2.5x (one logit of a few
    hundred; measured up to 1.7x). transformers runs a fresh float16 copy: hf.half() in place would
    round the float32 reference's weights too and make transformers' float16 look closer than it is."""
    hf, out = pair
    half = copy.deepcopy(hf).half()
    model = lmmrt.load(out, device="cpu", backend="torch", dtype=torch.float16)
    got = lmmrt.logits(model, PROMPTS, images)
    for ids, imgs, logits in zip(PROMPTS, images, got):
        ref = hf_logits(hf, ids, imgs, model.config.vision)
        theirs = hf_logits(half, ids, imgs, model.config.vision)
        mean_ours, mean_theirs = (logits - ref).abs().mean().item(), (theirs - ref).abs().mean().item()
        assert mean_ours <= 1.5 * mean_theirs, (ids, mean_ours, mean_theirs)
        assert _rel(logits, ref) <= 2.5 * _rel(theirs, ref), (ids, _rel(logits, ref), _rel(theirs, ref))


@pytest.mark.parametrize("cuda_graph", [False, True], ids=["eager-step", "fixed-shape-step"])
def test_greedy_tokens_match_transformers(pair, images, cuda_graph):
    hf, out = pair
    # cuda_graph=True on the CPU: the fixed-shape decode step CUDA graphs capture, run eagerly
    model = lmmrt.load(out, device="cpu", backend="torch", cuda_graph=cuda_graph)
    res = lmmrt.generate(model, PROMPTS, images, max_new_tokens=10, ignore_eos=True)
    for ids, imgs, r in zip(PROMPTS, images, res):
        assert r.token_ids == hf_greedy(hf, ids, imgs, model.config.vision, 10), ids


def test_graph_step_inputs_refilled_per_call(pair, images, monkeypatch):
    """The CUDA-graph path's pooled inputs (media K/V, media_len, text_time_first) on the CPU: generate
    takes the graph step (told capture works), which then runs eagerly over the pooled buffers;
    a second call of the same bucket with other prompts must refill them all."""
    from lmmrt.runtime import generate as gen

    hf, out = pair
    monkeypatch.setattr(gen, "graph_capturable", lambda model: True)
    model = lmmrt.load(out, device="cpu", backend="torch", cuda_graph=True)
    for rows in ([0, 2, 3], [3, 0, 2]):
        prompts, imgs = [PROMPTS[i] for i in rows], [images[i] for i in rows]
        res = lmmrt.generate(model, prompts, imgs, max_new_tokens=6, ignore_eos=True)
        for ids, im, r in zip(prompts, imgs, res):
            assert r.token_ids == hf_greedy(hf, ids, im, model.config.vision, 6), ids
    assert len(model.decode_state.graphs) == 1  # one bucket, reused


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_cuda_graph_decode_on_gpu(pair, images):
    """The decode step captured as a CUDA graph (Triton kernels, images tiled on the GPU): each greedy
    token must be transformers' argmax for the sequence so far, up to float32-with-TF32 tolerance
    (robust to near-ties, where comparing token streams is not)."""
    hf, out = pair
    model = lmmrt.load(out, device="cuda", dtype=torch.float32, cuda_graph=True)
    res = lmmrt.generate(model, PROMPTS, images, max_new_tokens=8, ignore_eos=True)
    assert model.decode_state.graph_error is None and model.decode_state.graphs
    for ids, imgs, r in zip(PROMPTS, images, res):
        full = hf_logits(hf, ids + r.token_ids, imgs, model.config.vision)
        for i, t in enumerate(r.token_ids):
            row = full[len(ids) - 1 + i]
            assert float(row.max() - row[t]) <= 1e-2 * (1 + float(row.abs().max())), (ids, i, t)


def test_repetition_penalty_matches_transformers(pair, images):
    """The penalty reaches the scored vocabulary only (Mllama's embedding has 8 more rows than its head)."""
    hf, out = pair
    model = lmmrt.load(out, device="cpu", backend="torch")
    ids, imgs = PROMPTS[2], images[2]
    r = lmmrt.generate(model, [ids], [imgs], max_new_tokens=8, ignore_eos=True, repetition_penalty=1.7)[0]
    assert r.token_ids == hf_greedy(hf, ids, imgs, model.config.vision, 8, repetition_penalty=1.7)


def test_triton_backend_matches_transformers(pair, images):
    """The Triton kernels (under the interpreter on the CPU) in the whole model: prompt logits and decode."""
    hf, out = pair
    model = lmmrt.load(out, device="cpu", backend="triton", cuda_graph=False)
    rows = [0, 2, 3]
    got = lmmrt.logits(model, [PROMPTS[i] for i in rows], [images[i] for i in rows])
    for i, logits in zip(rows, got):
        assert _rel(logits, hf_logits(hf, PROMPTS[i], images[i], model.config.vision)) < 1e-4
    res = lmmrt.generate(model, [PROMPTS[i] for i in rows], [images[i] for i in rows], max_new_tokens=4,
                         ignore_eos=True)
    for i, r in zip(rows, res):
        assert r.token_ids == hf_greedy(hf, PROMPTS[i], images[i], model.config.vision, 4)


def test_text_prompts_through_the_tokenizer_and_chat_template(pair, images):
    """A text prompt gets one BOS after its leading markers (MllamaProcessor's rule); a prompt rendered
    from the kept chat template starts with its own <|begin_of_text|> and gets no second one."""
    from jinja2 import Template

    hf, out = pair
    model = lmmrt.load(out, device="cpu", backend="torch")
    assert (out / "chat_template.jinja").read_text() == CHAT_TEMPLATE
    assert model.tokenizer.token_to_id("<|image|>") == model.config.image_token_id == IMAGE_ID
    got = lmmrt.logits(model, "<|image|>w13 w14 <|image|>w15", [images[2]])[0]
    ref = hf_logits(hf, [I, BOS, 13, 14, I, 15], images[2], model.config.vision)
    assert _rel(got, ref) < 1e-4
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "w7 w8"}]}]
    chat = Template(CHAT_TEMPLATE).render(messages=messages, bos_token="<|begin_of_text|>",
                                          add_generation_prompt=True)
    ids = [BOS, 91, 3, 92, I, 7, 8, 2, 91, 4, 92]  # what the template renders, tokenized once
    got = lmmrt.logits(model, chat, [images[0]])[0]
    assert got.shape[0] == len(ids)
    assert _rel(got, hf_logits(hf, ids, images[0], model.config.vision)) < 1e-4


def test_pil_images_of_any_mode(pair, images):
    hf, out = pair
    model = lmmrt.load(out, device="cpu", backend="torch")
    rgba = Image.fromarray(images[0][0]).convert("RGBA")
    got = lmmrt.logits(model, [PROMPTS[0]], [[rgba]])[0]
    ref = lmmrt.logits(model, [PROMPTS[0]], [[np.array(rgba.convert("RGB"))]])[0]
    assert torch.equal(got, ref)  # an opaque RGBA image is its RGB image


def test_image_errors_are_named(pair, images):
    _, out = pair
    model = lmmrt.load(out, device="cpu", backend="torch")
    with pytest.raises(ValueError, match=r"prompt 0 has 1 media marker\(s\) \('<\|image\|>', id 90\) but 2 image"):
        lmmrt.logits(model, [PROMPTS[0]], [[images[2][0], images[2][1]]])
    with pytest.raises(ValueError, match=r"images\[1\]\[0\]: Llama 3.2 Vision takes images, not video clips"):
        clip = type("Clip", (), {"frames": [images[0][0]]})()
        lmmrt.logits(model, [PROMPTS[1], PROMPTS[0]], [[], [clip]])
    with pytest.raises((TypeError, ValueError), match=r"images\[0\]\[0\]"):
        lmmrt.logits(model, [PROMPTS[0]], [[np.zeros((4, 4, 3), dtype=np.float32)]])
    # the whole batch's images are tiled in one call: a bad one is still named by prompt and position
    with pytest.raises((TypeError, ValueError), match=r"images\[2\]\[1\]"):
        lmmrt.logits(model, [PROMPTS[0], PROMPTS[1], PROMPTS[2]],
                     [[images[0][0]], [], [images[2][0], np.zeros((4, 4, 3), dtype=np.float32)]])
