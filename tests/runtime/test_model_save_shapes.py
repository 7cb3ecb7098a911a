"""Model.save writes what lmmrt.load accepts for a decoder whose embeddings are narrower than its
layers (OPT's word_embed_proj_dim, BLIP-2): the early shape check compares the embedding, the
head and project_in/out against decoder.embed_dim, the width the model really gives them."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from serve_util import images, tiny_config

import lmmrt
from lmmrt.api import Model
from lmmrt.demo import char_tokenizer
from lmmrt.errors import CheckpointError
from lmmrt.models.random_init import random_model
from lmmrt.runtime.tokenizer import Tokenizer

PROMPT = "User: look<image> and<image> tell\nAssistant:"


def _narrow_opt(tied: bool) -> Model:
    tok = char_tokenizer()
    cfg = tiny_config("blip2", tok.get_vocab_size())
    cfg = dataclasses.replace(cfg, decoder=dataclasses.replace(cfg.decoder, tie_embeddings=tied))
    assert cfg.decoder.embed_dim != cfg.decoder.dim  # the case the check got wrong
    return Model(random_model(cfg, seed=11), cfg, Tokenizer(tok), backend="torch", cuda_graph=False)


@pytest.mark.parametrize("tied", [True, False], ids=["tied-head", "own-head"])
def test_narrow_embedding_model_saves_and_loads_with_the_same_logits(tmp_path, tied):
    m = _narrow_opt(tied)
    pics = images(2, 5)
    want = m.logits([PROMPT], [pics])[0]
    m.save(tmp_path / "ckpt")
    m2 = lmmrt.load(tmp_path / "ckpt", device="cpu", backend="torch", cuda_graph=False)
    torch.testing.assert_close(m2.logits([PROMPT], [pics])[0], want, rtol=0, atol=0)


def test_config_with_a_wrong_embed_dim_is_refused_naming_it(tmp_path):
    _narrow_opt(False).save(tmp_path / "ckpt")
    cfg_path = tmp_path / "ckpt" / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["decoder"]["embed_dim"] = cfg["connector"]["out_dim"] = 40  # consistent, but not the weights' 48
    cfg_path.write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=r"decoder\.embed_dim\) = \(101, 40\), but decoder\.embed\.weight") as e:
        lmmrt.load(tmp_path / "ckpt", device="cpu", backend="torch")
    for key in ("decoder.lm_head.weight", "decoder.edges.project_in.weight", "decoder.edges.project_out.weight"):
        assert key in str(e.value)
