"""`lmmrt convert blip2`: the CLI with a tokenizer that lacks <image> (text prompts put the image
before BOS, as Blip2Processor does), older q_bias/v_bias files, Flan-T5 refused, bad keys named,
BLIP-2's resize without crop on a non-square image."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from blip2_util import IMAGE_TOKEN_ID, N_QUERIES, tiny_blip2
from PIL import Image
from safetensors.torch import load_file, save_file

import lmmrt
from lmmrt.cli import main
from lmmrt.convert.blip2 import convert_blip2
from lmmrt.errors import CheckpointError

# the tiny models here are saved without tokenizer.json on purpose: the warning users get for that is expected
pytestmark = pytest.mark.filterwarnings("ignore:.*has no tokenizer.json")

WORDS = ["a", "photo", "of", "cat", "dog", "question", "answer", ":", "what", "is", "it"]


def _tokenizer():
    """Word level; OPT's post-processor puts </s> (BOS, id 2) first; no <image>."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors

    vocab = {"<unk>": 0, "<pad>": 1, "</s>": 2, "<unused>": 3, **{w: i + 4 for i, w in enumerate(WORDS)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.post_processor = processors.TemplateProcessing(single="</s> $A", special_tokens=[("</s>", 2)])
    return tok, vocab


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    ref = tiny_blip2(seed=7)
    src = tmp_path_factory.mktemp("blip2") / "src"
    ref.save_pretrained(src)
    _tokenizer()[0].save(str(src / "tokenizer.json"))
    return ref, src


def _image(h=28, w=28, seed=0) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


def _pixels(img, side=28):
    from transformers.models.blip.image_processing_pil_blip import BlipImageProcessorPil

    return BlipImageProcessorPil(size={"height": side, "width": side})(img, return_tensors="pt").pixel_values


def test_cli_text_prompt_puts_image_before_bos(source, tmp_path):
    ref, src = source
    assert main(["convert", "blip2", str(src), str(tmp_path / "out"), "--quiet"]) == 0
    model = lmmrt.load(tmp_path / "out", device="cpu")
    vocab = _tokenizer()[1]
    assert model.config.image_token_id == len(vocab)  # added after the last token
    img = _image(37, 53, seed=1)  # non-square: resized to the square without crop
    got = lmmrt.logits(model, ["<image>question : what is it answer :"], [[img]])[0]
    ids = [IMAGE_TOKEN_ID] * N_QUERIES + [2] + [vocab[w] for w in "question : what is it answer :".split()]
    with torch.no_grad():
        want = ref(input_ids=torch.tensor([ids]), pixel_values=_pixels(img)).logits[0]
    assert got.shape == want.shape
    assert ((got - want).abs().max() / want.abs().max()).item() < 1e-4


def test_q_bias_v_bias_files_convert_alike(source, tmp_path):
    """transformers 4.x wrote the ViT's attention biases as q_bias and v_bias (no k bias)."""
    ref, src = source
    old = tmp_path / "old"
    old.mkdir()
    for f in ("config.json", "tokenizer.json"):
        (old / f).write_bytes((src / f).read_bytes())
    sd = load_file(src / "model.safetensors")
    for k in [k for k in sd if k.endswith("self_attn.qkv.bias")]:
        q, _, v = sd.pop(k).chunk(3)
        sd[k.replace("qkv.bias", "q_bias")], sd[k.replace("qkv.bias", "v_bias")] = q.clone(), v.clone()
        # the k third is what the older layout cannot hold: zero it in the reference too
        ref_bias = dict(ref.named_parameters())[k]
        with torch.no_grad():
            ref_bias[ref_bias.shape[0] // 3: 2 * ref_bias.shape[0] // 3] = 0
    save_file(sd, old / "model.safetensors")
    model = lmmrt.load(convert_blip2(old, tmp_path / "out", progress=False), device="cpu")
    img = _image(seed=2)
    with torch.no_grad():
        want = ref.get_image_features(pixel_values=_pixels(img)).pooler_output
        got = model.module.encode_media(_pixels(img)[:, None])
    assert ((got - want).abs().max() / want.abs().max()).item() < 1e-5


def test_lmmrt_checkpoint_is_not_a_source(source, tmp_path):
    _, src = source
    out = convert_blip2(src, tmp_path / "out", progress=False)
    with pytest.raises(ValueError, match="already an lmmrt checkpoint"):
        convert_blip2(out, tmp_path / "again", progress=False)


def test_flan_t5_refused(tmp_path):
    src = tmp_path / "t5"
    src.mkdir()
    (src / "config.json").write_text(json.dumps({"model_type": "blip-2", "text_config": {
        "model_type": "t5", "is_encoder_decoder": True}}))
    with pytest.raises(ValueError, match="encoder-decoder LM .*Flan-T5"):
        convert_blip2(src, tmp_path / "out", progress=False)


def test_bad_keys_named(source, tmp_path):
    _, src = source
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "config.json").write_bytes((src / "config.json").read_bytes())
    sd = load_file(src / "model.safetensors")
    del sd["qformer.encoder.layer.0.crossattention.attention.key.weight"]
    sd["language_model.model.decoder.layers.0.fc1.weight"] = sd["language_model.model.decoder.layers.0.fc1.weight"][:5]
    sd["qformer.extra.weight"] = torch.ones(2)
    save_file(sd, bad / "model.safetensors")
    with pytest.raises(CheckpointError) as e:
        convert_blip2(bad, tmp_path / "out", progress=False)
    msg = str(e.value)
    for key in ("qformer.encoder.layer.0.crossattention.attention.key.weight", "qformer.extra.weight",
                "language_model.model.decoder.layers.0.fc1.weight"):
        assert key in msg


def test_source_without_tokenizer_warns_at_convert(source, tmp_path):
    src = tmp_path / "src"
    shutil.copytree(source[1], src)
    (src / "tokenizer.json").unlink()
    with pytest.warns(UserWarning, match="has no tokenizer.json: .*token ids only"):
        convert_blip2(src, tmp_path / "out", progress=False)
