"""The encoder -> connector -> LM split in config.json: old cross-attention configs keep loading,
splice configs are checked part against part, and a splice model splices only the prompt."""

from __future__ import annotations

import pytest
import torch

from lmmrt.api import Model
from lmmrt.errors import ConfigError
from lmmrt.models.config import DecoderConfig, ModelConfig, PerceiverConfig, VisionConfig, XAttnConfig
from lmmrt.models.connector_config import ConnectorConfig
from lmmrt.models.random_init import random_model
from lmmrt.models.splice import SpliceModel
from lmmrt.runtime.batch import build_batch
from lmmrt.runtime.decode_plan import EagerDecode
from lmmrt.runtime.generate import prompt_logits, run_prefill
from lmmrt.runtime.kv_cache import KVCache

MARK = 61


def _splice(**over) -> dict:
    vision = VisionConfig(image_size=14, patch_size=7, width=16, layers=2, heads=2, mlp_dim=32,
                          output="patch_tokens", feature_layers=[-2])
    kw = dict(vision=vision, perceiver=None, decoder=DecoderConfig(vocab_size=64, dim=24, layers=2, heads=4,
                                                                   kv_heads=2, ffn_dim=40, max_seq_len=128),
              xattn=XAttnConfig(layers=[], media_dim=16), family="llava", media_feed="splice",
              connector=ConnectorConfig(kind="mlp", in_dim=16, hidden_dim=24, out_dim=24), image_token_id=MARK)
    kw.update(over)
    return kw


def test_config_without_split_fields_is_a_cross_attention_model():
    d = ModelConfig(perceiver=PerceiverConfig(dim=1024)).to_dict()
    for name in ("media_feed", "connector"):
        del d[name]
    del d["vision"]["feature_layers"]
    cfg = ModelConfig.from_dict(d)
    assert cfg.media_feed == "cross_attention" and cfg.connector is None and cfg.vision.feature_layers == [-1]


def test_splice_config_round_trips():
    cfg = ModelConfig(**_splice())
    again = ModelConfig.from_dict(cfg.to_dict())
    assert again == cfg and again.media_tokens == 4  # (14 / 7)^2 patches, class token dropped


@pytest.mark.parametrize("over,msg", [
    (dict(connector=None), r"connector: a splice model needs a connector section"),
    (dict(perceiver=PerceiverConfig(dim=16)), r"a splice model has no perceiver section"),
    (dict(connector=ConnectorConfig(in_dim=32, hidden_dim=24, out_dim=24)),
     r"connector.in_dim = 32 differs from the vision features' width 16"),
    (dict(connector=ConnectorConfig(in_dim=16, hidden_dim=24, out_dim=20)),
     r"connector.out_dim = 20 differs from the LM's embedding width decoder.embed_dim = 24"),
    (dict(media_feed="cross_attention"), r"media_feed = 'cross_attention', but family 'llava' models are 'splice'"),
])
def test_splice_config_errors(over, msg):
    with pytest.raises(ConfigError, match=msg):
        ModelConfig(**_splice(**over))


def test_connector_field_errors():
    with pytest.raises(ConfigError, match=r"connector.kind = 'qformerx': must be one of"):
        ConnectorConfig(kind="qformerx")
    with pytest.raises(ConfigError, match=r"connector.bias = 1: must be true or false"):
        ConnectorConfig(bias=1)


def test_only_the_prompt_is_spliced():
    """A generated marker token is a plain token in its decode step (as in transformers, which
    passes pixel values to the first forward only): the decode step equals the LM run over the
    embeddings with the features at the prompt's marker positions and the marker's own row last."""
    cfg = ModelConfig(**_splice())
    model = Model(random_model(cfg, seed=2), cfg, None, backend="torch")
    assert isinstance(model.module, SpliceModel)
    img = torch.randn(3, 14, 14)
    prompt = [1, MARK, 5, 6]
    batch = build_batch(model, [prompt], [[img]])
    T = batch.tokens.shape[1]
    cache = KVCache.allocate(cfg.decoder, 1, T + 1, model.dtype, model.device)
    with torch.inference_mode():
        _, media = run_prefill(model, batch, cache)
        step = EagerDecode(model.module, batch, cache, media)(torch.tensor([MARK]), T)
    # reference: the whole sequence with the features spliced at the prompt's marker positions only
    with torch.inference_mode():
        feats = model.module.encode_media(torch.stack(batch.media))
        x = model.module.decoder.embed(torch.cat([batch.tokens, torch.tensor([[MARK]])], 1))
        x[0, 1:1 + cfg.media_tokens] = feats[0]
        full = _run_embeddings(model.module, x)
    assert torch.allclose(step[0], full[0, -1], atol=1e-5, rtol=1e-5)
    assert torch.allclose(prompt_logits(model, [prompt], [[img]])[0], full[0, :-1], atol=1e-5, rtol=1e-5)


def _run_embeddings(module, x):
    """The LM over input embeddings (1, T, D), causal, from position 0."""
    T = x.shape[1]
    cache = KVCache.allocate(module.cfg.decoder, 1, T, x.dtype, x.device)
    ctx = module.decoder.context(torch.arange(T)[None], 0, T, None, causal=True)
    for i, layer in enumerate(module.decoder.layers):
        x = layer(x, ctx, cache.k[i], cache.v[i])
    return module.decoder.head(x)
