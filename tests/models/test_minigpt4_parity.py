"""MiniGPT-4 against a reference assembled from transformers parts, as MiniGPT-4 runs: BLIP-2's ViT
and Q-Former, the llama_proj linear layer and a LlamaForCausalLM, the image embeddings spliced into
inputs_embeds between prompt pieces tokenized on their own (BOS on the first only). Float32, tiny
random models: prompt logits within 1e-4 relative, identical greedy tokens, a batch of prompts with
2, 1 and 0 images."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from blip2_util import randomize, tiny_blip2
from PIL import Image

import lmmrt
from lmmrt.cli import main
from lmmrt.errors import CheckpointError

WORDS = ["describe", "the", "image", "a", "photo", "of", "cat", "dog", "and", "###human:", "###assistant:",
         "<img>", "</img>", "what", "is", "it"]


def _tokenizer():
    """LLaMA-like: <unk> 0, <s> 1, </s> 2; the post-processor puts <s> first; no <ImageHere>."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{w: i + 3 for i, w in enumerate(WORDS)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return tok


def _tiny_llama(seed: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=40, hidden_size=48, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128, bos_token_id=1,
                      eos_token_id=2, pad_token_id=0, tie_word_embeddings=False)
    model = LlamaForCausalLM(cfg).eval()
    randomize(model, seed + 1)
    return model


class Reference:
    """MiniGPT-4's forward from transformers parts (minigpt4 encode_img + get_context_emb)."""

    def __init__(self, blip2, proj: torch.nn.Linear, llama, tok):
        self.blip2, self.proj, self.llama, self.tok = blip2, proj, llama, tok

    def image_embeds(self, img) -> torch.Tensor:
        from transformers.models.blip.image_processing_pil_blip import BlipImageProcessorPil

        px = BlipImageProcessorPil(size={"height": 28, "width": 28})(img, return_tensors="pt").pixel_values
        out = self.blip2.get_image_features(pixel_values=px)
        return self.proj(out.qformer_outputs.last_hidden_state)

    def context(self, prompt: str, imgs) -> torch.Tensor:
        segs = prompt.split("<ImageHere>")
        assert len(segs) == len(imgs) + 1
        embed = self.llama.get_input_embeddings()
        seg_embs = [embed(torch.tensor([self.tok.encode(s, add_special_tokens=i == 0).ids], dtype=torch.long))
                    for i, s in enumerate(segs)]
        mixed = [e for pair in zip(seg_embs[:-1], [self.image_embeds(im) for im in imgs]) for e in pair]
        return torch.cat(mixed + [seg_embs[-1]], dim=1)

    @torch.no_grad()
    def logits(self, prompt, imgs) -> torch.Tensor:
        return self.llama(inputs_embeds=self.context(prompt, imgs)).logits[0]

    @torch.no_grad()
    def greedy(self, prompt, imgs, n: int) -> list[int]:
        embs, out = self.context(prompt, imgs), []
        for _ in range(n):
            t = int(self.llama(inputs_embeds=embs).logits[0, -1].argmax())
            out.append(t)
            embs = torch.cat([embs, self.llama.get_input_embeddings()(torch.tensor([[t]]))], dim=1)
        return out


def _image(seed, h=28, w=28):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


@pytest.fixture(scope="module")
def minigpt4(tmp_path_factory):
    root = tmp_path_factory.mktemp("minigpt4")
    blip2 = tiny_blip2(seed=11)
    blip2.save_pretrained(root / "blip2")
    llama = _tiny_llama(seed=12)
    llama.save_pretrained(root / "vicuna")
    tok = _tokenizer()
    tok.save(str(root / "vicuna" / "tokenizer.json"))
    proj = torch.nn.Linear(32, 48)
    randomize(proj, 13)
    # MiniGPT-4 saves {"model": ...}; an unfiltered one holds every other tensor too
    torch.save({"model": {"llama_proj.weight": proj.weight.data, "llama_proj.bias": proj.bias.data,
                          "llama_model.model.norm.weight": torch.ones(48)}, "epoch": 3}, root / "ckpt.pth")
    assert main(["convert", "minigpt4", "--blip2", str(root / "blip2"), "--checkpoint", str(root / "ckpt.pth"),
                 "--lm", str(root / "vicuna"), str(root / "out"), "--quiet"]) == 0
    return Reference(blip2, proj, llama, tok), lmmrt.load(root / "out", device="cpu", backend="torch"), root


PROMPTS = ["###human: <img><ImageHere></img> describe the image ###assistant:",
           "###human: <img><ImageHere></img> a photo <img><ImageHere></img> what is it ###assistant:",
           "###human: what is a cat ###assistant:"]


def test_prompt_logits_batch(minigpt4):
    ref, model, _ = minigpt4
    images = [[_image(1, 40, 31)], [_image(2), _image(3, 50, 28)], []]
    for prompt, imgs, got in zip(PROMPTS, images, lmmrt.logits(model, PROMPTS, images)):
        want = ref.logits(prompt, imgs)
        assert got.shape == want.shape
        assert ((got - want).abs().max() / want.abs().max()).item() < 1e-4


def test_greedy_tokens(minigpt4):
    ref, model, _ = minigpt4
    images = [[_image(4)], [_image(5), _image(6)]]
    outs = lmmrt.generate(model, PROMPTS[:2], images, max_new_tokens=6, ignore_eos=True)
    for prompt, imgs, out in zip(PROMPTS[:2], images, outs):
        assert out.token_ids == ref.greedy(prompt, imgs, 6)


def test_token_id_prompt_uses_the_marker_id(minigpt4):
    """Token-id prompts carry the marker id (the tokenizer's <unk>) once per image."""
    ref, model, _ = minigpt4
    assert model.config.image_token_id == 0 and model.config.image_token == "<ImageHere>"
    img = _image(7)
    text = "###human: <img><ImageHere></img> describe ###assistant:"
    ids = model.tokenizer.encode("###human: <img>") + [0] + model.tokenizer.encode(
        "</img> describe ###assistant:", add_special_tokens=False)
    got = lmmrt.logits(model, [ids], [[img]])[0]
    assert torch.allclose(got, lmmrt.logits(model, [text], [[img]])[0])


def test_checkpoint_without_llama_proj(minigpt4, tmp_path):
    _, _, root = minigpt4
    torch.save({"model": {"something.else": torch.ones(2)}}, tmp_path / "bad.pth")
    from lmmrt.convert.minigpt4 import convert_minigpt4

    with pytest.raises(CheckpointError, match="llama_proj.weight, llama_proj.bias"):
        convert_minigpt4(root / "blip2", tmp_path / "bad.pth", root / "vicuna", tmp_path / "out", progress=False)


@pytest.mark.parametrize("prompt, images", [("###human: <image> describe", 1), ("zzzz cat", 0),
                                            ("<img><ImageHere></img> what is <unk>", 1)])
def test_text_that_tokenizes_to_the_marker_is_refused(minigpt4, prompt, images):
    """<unk> is the marker id: only <ImageHere> may become an image slot, never unknown words."""
    _, model, _ = minigpt4
    with pytest.raises(ValueError, match="reads as its image marker id 0.*only '<ImageHere>'"):
        lmmrt.logits(model, [prompt], [[_image(8)] * images])


def test_non_finite_source_weights_are_refused_at_convert(minigpt4, tmp_path, capsys):
    ref, _, root = minigpt4
    weight = ref.proj.weight.data.clone()
    weight[3, 5] = float("nan")
    torch.save({"model": {"llama_proj.weight": weight, "llama_proj.bias": ref.proj.bias.data}}, tmp_path / "nan.pth")
    rc = main(["convert", "minigpt4", "--blip2", str(root / "blip2"), "--checkpoint", str(tmp_path / "nan.pth"),
               "--lm", str(root / "vicuna"), str(tmp_path / "out"), "--quiet"])
    assert rc == 2 and not (tmp_path / "out").exists()
    err = capsys.readouterr().err
    assert "NaN or inf" in err and "checkpoint:llama_proj.weight" in err


def test_lm_without_tokenizer_warns_at_convert(minigpt4, tmp_path):
    _, _, root = minigpt4
    lm = tmp_path / "vicuna"
    lm.mkdir()
    for f in (root / "vicuna").iterdir():
        if f.name != "tokenizer.json":
            (lm / f.name).symlink_to(f)
    from lmmrt.convert.minigpt4 import convert_minigpt4

    with pytest.warns(UserWarning, match="has no tokenizer.json: .*<ImageHere> is taken to be token id 0"):
        convert_minigpt4(root / "blip2", root / "ckpt.pth", lm, tmp_path / "out", progress=False)


def test_truncated_checkpoint_exits_2_naming_it(minigpt4, tmp_path, capsys):
    _, _, root = minigpt4
    cut = tmp_path / "cut.pth"
    cut.write_bytes((root / "ckpt.pth").read_bytes()[:-64])
    rc = main(["convert", "minigpt4", "--blip2", str(root / "blip2"), "--checkpoint", str(cut),
               "--lm", str(root / "vicuna"), str(tmp_path / "out"), "--quiet"])
    assert rc == 2 and f"{cut}: truncated or corrupted torch file" in capsys.readouterr().err
