"""tanh gates folded into the output projections at load give the same model; a branch whose gate
is exactly zero is skipped."""

from __future__ import annotations

import dataclasses

import pytest
import torch

import lmmrt
from lmmrt.api import Model
from lmmrt.demo import char_tokenizer, demo_config, demo_images
from lmmrt.models.random_init import random_model
from lmmrt.models.xattn import GatedCrossAttention
from lmmrt.runtime.tokenizer import Tokenizer


def _module(gate_type, zero_block=None):
    cfg = demo_config(char_tokenizer().get_vocab_size())
    cfg.xattn = dataclasses.replace(cfg.xattn, gate_type=gate_type)
    m = random_model(cfg, seed=5)
    if zero_block is not None:
        with torch.no_grad():
            m.xattn[zero_block].attn_gate.zero_()
            m.xattn[zero_block].ff_gate.zero_()
    return cfg, m


def _logits(cfg, module, monkeypatch=None):
    model = Model(module, cfg, Tokenizer(char_tokenizer()), backend="torch")
    return lmmrt.logits(model, "a<image>bc<image>d", demo_images())[0], model


@pytest.mark.parametrize("gate_type", ["float", "vector"])
def test_folded_gates_match_unfolded(gate_type, monkeypatch):
    cfg, m1 = _module(gate_type)
    _, m2 = _module(gate_type)
    folded, model = _logits(cfg, m1)
    assert all(b.gates_folded for b in model.module.xattn)
    monkeypatch.setattr(GatedCrossAttention, "fold_gates", lambda self: None)
    unfolded, model2 = _logits(cfg, m2)
    assert not any(b.gates_folded for b in model2.module.xattn)
    torch.testing.assert_close(folded, unfolded, rtol=1e-5, atol=1e-5)


def test_zero_gate_branch_is_skipped(monkeypatch):
    cfg, m = _module("float", zero_block=1)
    out, model = _logits(cfg, m)
    blk = model.module.xattn[1]
    assert blk.skip_attn and blk.skip_ff
    assert not model.module.xattn[0].skip_attn
    calls = []
    monkeypatch.setattr(blk.ff_norm, "forward", lambda x: calls.append(1) or x)
    again = lmmrt.logits(model, "a<image>bc<image>d", demo_images())[0]
    assert calls == []  # the skipped block's feed-forward never ran
    torch.testing.assert_close(out, again)
