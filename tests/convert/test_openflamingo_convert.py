"""`lmmrt convert openflamingo`: accepted checkpoint forms, refusals with clear errors, the
tokenizer's added tokens, the vision sources, and the decoder families' ALiBi slopes."""

from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("einops_exts")

import openflamingo_util as U  # noqa: E402

from lmmrt.cli import main as cli  # noqa: E402

if not U.have_open_flamingo():
    pytest.skip("open-flamingo 2.0.1 is not installed (make install-test installs it)", allow_module_level=True)


class NotATensor:
    """Any object a weights-only load must refuse."""

    def __init__(self):
        self.payload = "arbitrary code could run here"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    d = tmp_path_factory.mktemp("of-convert")
    return U.build(d, "mpt", 2, vision_format="safetensors"), d


def run(tf, ckpt, out, *extra, vision=None):
    return cli(["convert", "openflamingo", "--checkpoint", str(ckpt), "--lm", str(tf.lm_dir),
                "--vision", str(vision or tf.vision_file), str(out), "--quiet", *extra])


def weights(out):
    from safetensors.torch import load_file

    return load_file(str(out / "model.safetensors"))


def test_tokens_config_and_tokenizer(tiny):
    tf, d = tiny
    assert run(tf, tf.checkpoint, d / "plain") == 0
    cfg = json.loads((d / "plain" / "config.json").read_text())
    assert cfg["family"] == "openflamingo"
    assert cfg["image_token_id"] == U.IMAGE_ID and cfg["end_of_chunk_token_id"] == U.EOC_ID
    assert cfg["pad_token_id"] == U.PAD_ID and cfg["eos_token_id"] == 0
    assert cfg["stop_token_ids"] == [U.EOC_ID] and cfg["reset_media_after_eos"] is False
    assert cfg["decoder"]["vocab_size"] == U.VOCAB and cfg["decoder"]["family"] == "mpt"
    assert cfg["vision"]["output"] == "patch_tokens" and cfg["vision"]["resize"] == "resize_crop"
    assert cfg["vision"]["act"] == "quick_gelu"
    import lmmrt

    m = lmmrt.load(d / "plain", device="cpu", backend="torch")
    assert m.tokenizer.encode("w3 <image>w4 w5<|endofchunk|>") == [3, U.IMAGE_ID, 4, 5, U.EOC_ID]
    assert m.tokenizer.token_to_id("<PAD>") == U.PAD_ID
    # a text prompt with an image; generation stops at a stop token of the config
    px = U.random_pixels(1, seed=5)
    free = lmmrt.generate(m, "<image>w3 w4", px, max_new_tokens=8, ignore_eos=True)[0]
    m.config.stop_token_ids = [free.token_ids[2]]
    stopped = lmmrt.generate(m, "<image>w3 w4", px, max_new_tokens=8)[0]
    first = free.token_ids.index(free.token_ids[2])
    assert stopped.token_ids == free.token_ids[:first + 1] and stopped.finish_reason == "stop"


def test_key_forms_give_identical_weights(tiny):
    """{"model_state_dict": ...} + module. prefixes + the gated_cross_attn_layers alias, and an
    unfiltered Flamingo.state_dict() with frozen LM / vision copies, convert like the plain file."""
    tf, d = tiny
    if not (d / "plain").exists():
        assert run(tf, tf.checkpoint, d / "plain") == 0
    ref = weights(d / "plain")
    sd = torch.load(tf.checkpoint, weights_only=True)
    alias = {}
    for k, v in sd.items():
        if ".gated_cross_attn_layer." in k:
            layer = k.split(".")[3]
            k = f"lang_encoder.gated_cross_attn_layers.{layer}." + k.split(".gated_cross_attn_layer.")[1]
        alias["module." + k] = v
    wrapped = d / "wrapped.pt"
    torch.save({"epoch": 3, "model_state_dict": alias}, wrapped)
    assert run(tf, wrapped, d / "wrapped") == 0
    full = d / "full.pt"
    torch.save(tf.model.state_dict(), full)
    assert run(tf, full, d / "full") == 0
    for name in ("wrapped", "full"):
        got = weights(d / name)
        assert got.keys() == ref.keys()
        for k in ref:
            assert torch.equal(got[k], ref[k]), (name, k)


def test_refuses_pickled_objects(tiny, capsys):
    tf, d = tiny
    bad = d / "evil.pt"
    sd = torch.load(tf.checkpoint, weights_only=True)
    torch.save({"model_state_dict": sd, "extra": NotATensor()}, bad)
    assert run(tf, bad, d / "evil-out") == 2
    err = capsys.readouterr().err
    assert "refuses to unpickle objects" in err and "weights_only=False" not in err
    assert not (d / "evil-out" / "model.safetensors").exists()


def test_missing_and_unexpected_keys_are_named(tiny, capsys):
    tf, d = tiny
    sd = torch.load(tf.checkpoint, weights_only=True)
    del sd["perceiver.layers.1.0.to_kv.weight"]
    sd["lang_encoder.transformer.blocks.1.gated_cross_attn_layer.attn.bogus"] = torch.zeros(3)
    sd["something.else"] = torch.zeros(2)
    p = d / "broken.pt"
    torch.save(sd, p)
    assert run(tf, p, d / "broken-out") == 2
    err = capsys.readouterr().err
    assert "missing keys (1): checkpoint:perceiver.layers.1.0.to_kv.weight" in err
    assert "checkpoint:something.else" in err and "gated_cross_attn_layer.attn.bogus" in err


def test_every_n_layers_inferred_or_checked(tiny, capsys):
    tf, d = tiny
    assert run(tf, tf.checkpoint, d / "n2", "--cross-attn-every-n-layers", "2") == 0
    assert json.loads((d / "n2" / "config.json").read_text())["xattn"]["layers"] == [1, 3]
    assert run(tf, tf.checkpoint, d / "n1", "--cross-attn-every-n-layers", "1") == 2
    err = capsys.readouterr().err
    assert "--cross-attn-every-n-layers 1" in err and "missing keys: blocks [0, 2]" in err


def test_untied_head_missing_from_checkpoint(tmp_path):
    """A NeoX checkpoint saved without its head (transformers >= 4.40 names it lm_head, which
    OpenFlamingo's filter drops): the LM's rows are used, the added tokens' rows get their mean."""
    tf = U.build(tmp_path, "neox", 2)
    sd = torch.load(tf.checkpoint, weights_only=True)
    del sd["lang_encoder.embed_out.weight"]
    p = tmp_path / "nohead.pt"
    torch.save(sd, p)
    assert run(tf, p, tmp_path / "out") == 0
    w = weights(tmp_path / "out")
    from safetensors.torch import load_file

    lm_head = load_file(str(tf.lm_dir / "model.safetensors"))["embed_out.weight"]
    assert torch.equal(w["decoder.lm_head.weight"][:U.BASE_VOCAB], lm_head)
    assert torch.allclose(w["decoder.lm_head.weight"][U.BASE_VOCAB:], lm_head.mean(0).expand(3, -1))


@torch.no_grad()
def test_vision_from_transformers_clip_dir(tmp_path):
    """A transformers CLIPVisionModel directory: lmmrt's patch tokens equal last_hidden_state[:, 1:]."""
    from transformers import CLIPVisionConfig, CLIPVisionModel

    from lmmrt.convert.clip import open_vision, vision_config, vision_weight_map
    from lmmrt.models.vision import VisionEncoder

    torch.manual_seed(0)
    hf = CLIPVisionModel(CLIPVisionConfig(hidden_size=48, intermediate_size=96, num_hidden_layers=2,
                                          num_attention_heads=4, image_size=28, patch_size=7,
                                          hidden_act="quick_gelu")).eval()
    U._randomize(hf, torch.Generator().manual_seed(1))
    hf.save_pretrained(tmp_path / "clip")
    src = open_vision(tmp_path / "clip")
    cfg = vision_config(src)
    assert (cfg.width, cfg.heads, cfg.layers, cfg.act) == (48, 4, 2, "quick_gelu")
    wmap, _, _ = vision_weight_map(src, cfg)
    enc = VisionEncoder(cfg)
    enc.load_state_dict({k[len("vision."):]: torch.cat([src.weights.get(s) for s in v]) for k, v in wmap.items()})
    px = torch.randn(2, 3, 28, 28)
    ref = hf(pixel_values=px).last_hidden_state[:, 1:]
    assert U.rel_err(enc(px), ref) <= 1e-5


def test_alibi_slopes_match_transformers():
    from transformers.models.mpt.modeling_mpt import build_mpt_alibi_tensor

    from lmmrt.models.decoder import alibi_slopes

    for heads in (1, 4, 6, 12, 16, 32):
        ref = build_mpt_alibi_tensor(heads, 2)[:, 0, 0] * -1  # key at distance 1: -slope
        assert torch.allclose(alibi_slopes(heads), ref), heads
