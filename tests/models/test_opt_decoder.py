"""The OPT decoder family alone against transformers OPTForCausalLM (float32, tiny random models):
OPT-350m's shape (post-norm layers, no final norm, 32-wide embeddings projected in and out of
48-wide layers) that BLIP-2 never pairs with, and the usual pre-norm shape; text-only prompts of
different lengths (left padding), prompt logits and greedy tokens in the eager and fixed-shape
decode steps."""

from __future__ import annotations

import pytest
import torch
from blip2_util import randomize

import lmmrt
from lmmrt.api import Model
from lmmrt.convert.blip2 import opt_decoder_config, opt_map
from lmmrt.convert.common import SourceWeights, convert_state
from lmmrt.models.config import ModelConfig, VisionConfig, XAttnConfig
from lmmrt.models.connector_config import ConnectorConfig
from lmmrt.models.splice import SpliceModel


def _tiny_opt(**over):
    from transformers import OPTConfig, OPTForCausalLM

    torch.manual_seed(0)
    kw = dict(vocab_size=50, hidden_size=48, ffn_dim=40, num_hidden_layers=2, num_attention_heads=4,
              max_position_embeddings=32, bos_token_id=2, eos_token_id=2, pad_token_id=1, word_embed_proj_dim=48,
              do_layer_norm_before=True)
    kw.update(over)
    model = OPTForCausalLM(OPTConfig(**kw)).eval()
    randomize(model, 1)
    return model


def _lmmrt_model(ref, cuda_graph) -> Model:
    """The OPT as the LM of a splice model (a stand-in vision tower and linear connector: the
    prompts here have no images)."""
    t = ref.config.to_dict()
    dec = opt_decoder_config(t)
    vision = VisionConfig(image_size=14, patch_size=7, width=8, layers=1, heads=1, mlp_dim=8)
    cfg = ModelConfig(vision=vision, perceiver=None, decoder=dec, xattn=XAttnConfig(layers=[]), family="blip2",
                      media_feed="splice", connector=ConnectorConfig(kind="linear", in_dim=8, out_dim=dec.embed_dim),
                      image_token_id=3, bos_token_id=2, eos_token_id=2, pad_token_id=1)
    sd = {"lm." + k: v for k, v in ref.state_dict().items()}
    wmap = {k: [s.replace("language_model.", "lm.", 1) for s in v] for k, v in opt_map("language_model.", dec).items()}
    ignored = ["lm.lm_head.weight"] if dec.tie_embeddings else []
    # the stand-in vision tower and connector: random, never run by text-only prompts
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in SpliceModel(cfg).state_dict().items() if not k.startswith("decoder.")}
    sd.update({"stub." + k: torch.randn(s) for k, s in shapes.items()})
    wmap.update({k: ["stub." + k] for k in shapes})
    state = convert_state(SourceWeights.from_state_dict(sd), wmap, cfg, ignored_prefixes=ignored, progress=False)
    module = SpliceModel(cfg)
    module.load_state_dict(state)
    return Model(module, cfg, None, backend="torch", cuda_graph=cuda_graph)


PROMPTS = [[2, 10, 11, 12, 13, 14, 15, 16], [2, 20, 21], [2, 30, 31, 32, 33]]


@pytest.mark.parametrize("over", [{}, {"do_layer_norm_before": False, "word_embed_proj_dim": 32}],
                         ids=["pre-norm", "opt-350m-shape"])
def test_prompt_logits_and_greedy_tokens(over):
    ref = _tiny_opt(**over)
    T = max(len(p) for p in PROMPTS)
    ids = torch.tensor([[1] * (T - len(p)) + p for p in PROMPTS])
    mask = (ids != 1).long()
    with torch.no_grad():
        want = ref(input_ids=ids, attention_mask=mask).logits
        greedy = ref.generate(input_ids=ids, attention_mask=mask, max_new_tokens=5, do_sample=False,
                              eos_token_id=None, pad_token_id=1)[:, T:]
    for cuda_graph in (False, True):  # True on the CPU: the fixed-shape decode step, run eagerly
        model = _lmmrt_model(ref, cuda_graph)
        for b, got in enumerate(lmmrt.logits(model, PROMPTS)):
            w = want[b, T - len(PROMPTS[b]):]
            assert ((got - w).abs().max() / w.abs().max()).item() < 1e-4
        outs = lmmrt.generate(model, PROMPTS, max_new_tokens=5, ignore_eos=True)
        assert [o.token_ids for o in outs] == greedy.tolist()
