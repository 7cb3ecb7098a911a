"""A transformers causal-LM directory (MptForCausalLM, GPTNeoXForCausalLM, LlamaForCausalLM) ->
lmmrt DecoderConfig and the weight map of its decoder (`decoder.*` names).

Used by the OpenFlamingo converter, whose checkpoint.pt holds only the trained tensors: the base
LM comes from its own directory. Fused projections are built here: NeoX stores query_key_value
interleaved per head ([q_h, k_h, v_h] for each head h), lmmrt wants all q rows, then k, then v.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from lmmrt.convert.common import llama_layers_map, read_source_json, source_config_path
from lmmrt.models.config import DecoderConfig


@dataclass
class LMSpec:
    """What the OpenFlamingo converter needs to know about a language model."""

    cfg: DecoderConfig
    wmap: dict[str, list[str]]  # lmmrt name -> source names (concatenated on dim 0)
    transforms: dict = field(default_factory=dict)  # lmmrt name -> fn(tensor) -> tensor
    layers_attr: str = ""  # OpenFlamingo's decoder_layers_attr_name, e.g. "transformer.blocks"
    embed_key: str = ""  # source name of the input embedding
    head_key: str | None = None  # source name of the untied output head (None when tied)
    head_aliases: tuple[str, ...] = ()  # older names of the head (NeoX's embed_out)
    eos_token_id: int | None = None
    bos_token_id: int | None = None
    pad_token_id: int | None = None
    zero_fill: dict[str, tuple] = field(default_factory=dict)  # lmmrt names with no source: zeros of shape


def read_hf_config(lm_dir: Path) -> dict:
    p = source_config_path(lm_dir, "a transformers causal-LM directory")
    return read_source_json(p, "a transformers config (a JSON object)")


def _first_id(v):
    if isinstance(v, list):
        return v[0] if v else None
    return v


def _neox_qkv(heads: int, head_dim: int):
    """query_key_value rows (H, 3, hd) per head -> lmmrt's (3, H, hd): q block, k block, v block."""
    def fn(t: torch.Tensor) -> torch.Tensor:
        rest = t.shape[1:]
        return t.reshape(heads, 3, head_dim, *rest).transpose(0, 1).reshape(3 * heads * head_dim, *rest)
    return fn


def _mpt(hf: dict, shape) -> LMSpec:
    attn = hf.get("attn_config") or {}
    d, heads = hf.get("d_model", 2048), hf.get("n_heads", 16)
    if attn.get("qk_ln"):
        raise ValueError("MPT with attn_config.qk_ln=true is not supported")
    if attn.get("softmax_scale") not in (None, (d // heads) ** -0.5):
        raise ValueError(f"MPT attn_config.softmax_scale={attn['softmax_scale']} is not supported "
                         f"(only the default 1/sqrt(head_dim))")
    if attn.get("attn_type", "multihead_attention") != "multihead_attention":
        raise ValueError(f"MPT attn_type {attn.get('attn_type')!r} is not supported (only multihead_attention)")
    if hf.get("logit_scale") not in (None, 1, 1.0):
        raise ValueError(f"MPT logit_scale={hf.get('logit_scale')!r} is not supported")
    if not hf.get("no_bias", True):
        raise ValueError("MPT with no_bias=false is not supported (transformers' MPT has no linear biases either)")
    if not hf.get("tie_word_embeddings", True):
        raise ValueError("MPT with untied embeddings is not supported")
    # transformers' MptMLP always builds 4 * d_model whatever expansion_ratio says (MosaicML's own
    # code follows expansion_ratio): the width is whatever the weights have.
    up = shape("transformer.blocks.0.ffn.up_proj.weight")
    cfg = DecoderConfig(
        family="mpt", vocab_size=hf.get("vocab_size", 50368), dim=d, layers=hf.get("n_layers", 24), heads=heads,
        ffn_dim=up[0] if up else hf.get("expansion_ratio", 4) * d, act="gelu", norm_eps=hf.get("layer_norm_epsilon", 1e-5),
        norm_bias=False, alibi=True, alibi_bias_max=float(attn.get("alibi_bias_max", 8)),
        qkv_clip=float(attn.get("clip_qkv") or 0.0), max_seq_len=hf.get("max_seq_len", 2048),
        tie_embeddings=True)
    m: dict[str, list[str]] = {"decoder.embed.weight": ["transformer.wte.weight"],
                               "decoder.norm.weight": ["transformer.norm_f.weight"]}
    for i in range(cfg.layers):
        s, o = f"transformer.blocks.{i}.", f"decoder.layers.{i}."
        m[o + "attn_norm.weight"] = [s + "norm_1.weight"]
        m[o + "wqkv.weight"] = [s + "attn.Wqkv.weight"]
        m[o + "wo.weight"] = [s + "attn.out_proj.weight"]
        m[o + "mlp_norm.weight"] = [s + "norm_2.weight"]
        m[o + "fc1.weight"] = [s + "ffn.up_proj.weight"]
        m[o + "fc2.weight"] = [s + "ffn.down_proj.weight"]
    return LMSpec(cfg=cfg, wmap=m, layers_attr="transformer.blocks", embed_key="transformer.wte.weight",
                  head_key=None, head_aliases=("lm_head.weight",))


def _neox(hf: dict, shape) -> LMSpec:  # every width is in config.json
    d, heads = hf.get("hidden_size", 6144), hf.get("num_attention_heads", 64)
    rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    if rope.get("rope_type", rope.get("type", "default")) not in ("default", None):
        raise ValueError(f"GPT-NeoX rope_type {rope.get('rope_type')!r} is not supported (only default RoPE)")
    theta = rope.get("rope_theta", hf.get("rotary_emb_base", hf.get("rope_theta", 10000.0)))
    pct = rope.get("partial_rotary_factor", hf.get("rotary_pct", 0.25))
    tied = hf.get("tie_word_embeddings", False)
    cfg = DecoderConfig(
        family="neox", vocab_size=hf.get("vocab_size", 50432), dim=d, layers=hf.get("num_hidden_layers", 44),
        heads=heads, ffn_dim=hf.get("intermediate_size", 4 * d), act=hf.get("hidden_act", "gelu"),
        norm_eps=hf.get("layer_norm_eps", 1e-5), norm_bias=True, rope_theta=float(theta), rotary_pct=float(pct),
        parallel_residual=hf.get("use_parallel_residual", True), max_seq_len=hf.get("max_position_embeddings", 2048),
        tie_embeddings=tied)
    hd = cfg.head_dim
    bias = hf.get("attention_bias", True)
    m: dict[str, list[str]] = {"decoder.embed.weight": ["gpt_neox.embed_in.weight"]}
    for s in ("weight", "bias"):
        m[f"decoder.norm.{s}"] = [f"gpt_neox.final_layer_norm.{s}"]
    tf, zeros = {}, {}
    for i in range(cfg.layers):
        s, o = f"gpt_neox.layers.{i}.", f"decoder.layers.{i}."
        for p in ("weight", "bias"):
            m[o + f"attn_norm.{p}"] = [s + f"input_layernorm.{p}"]
            m[o + f"mlp_norm.{p}"] = [s + f"post_attention_layernorm.{p}"]
            m[o + f"fc1.{p}"] = [s + f"mlp.dense_h_to_4h.{p}"]
            m[o + f"fc2.{p}"] = [s + f"mlp.dense_4h_to_h.{p}"]
        m[o + "wqkv.weight"] = [s + "attention.query_key_value.weight"]
        m[o + "wo.weight"] = [s + "attention.dense.weight"]
        tf[o + "wqkv.weight"] = _neox_qkv(heads, hd)
        if bias:
            m[o + "wqkv.bias"] = [s + "attention.query_key_value.bias"]
            m[o + "wo.bias"] = [s + "attention.dense.bias"]
            tf[o + "wqkv.bias"] = _neox_qkv(heads, hd)
        else:  # attention_bias=false: lmmrt's NeoX layer always has biases; zeros are exact
            zeros[o + "wqkv.bias"] = (3 * d,)
            zeros[o + "wo.bias"] = (d,)
    return LMSpec(cfg=cfg, wmap=m, transforms=tf, layers_attr="gpt_neox.layers", embed_key="gpt_neox.embed_in.weight",
                  head_key=None if tied else "lm_head.weight", head_aliases=("embed_out.weight", "lm_head.weight"),
                  zero_fill=zeros)


def _llama(hf: dict, shape) -> LMSpec:  # every width is in config.json
    d, heads = hf.get("hidden_size", 4096), hf.get("num_attention_heads", 32)
    kv = hf.get("num_key_value_heads") or heads
    rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    if rope.get("rope_type", rope.get("type", "default")) not in ("default", None):
        raise ValueError(f"LLaMA rope_type {rope.get('rope_type')!r} is not supported (only default RoPE)")
    if hf.get("attention_bias") or hf.get("mlp_bias"):
        raise ValueError("LLaMA with attention_bias / mlp_bias is not supported")
    tied = hf.get("tie_word_embeddings", False)
    cfg = DecoderConfig(
        family="llama", vocab_size=hf.get("vocab_size", 32000), dim=d, layers=hf.get("num_hidden_layers", 32),
        heads=heads, kv_heads=kv, head_dim=hf.get("head_dim") or d // heads,
        ffn_dim=hf.get("intermediate_size", 11008), act=hf.get("hidden_act", "silu"),
        norm_eps=hf.get("rms_norm_eps", 1e-6), rope_theta=float(rope.get("rope_theta", hf.get("rope_theta", 10000.0))),
        max_seq_len=hf.get("max_position_embeddings", 2048), tie_embeddings=tied)
    m: dict[str, list[str]] = {"decoder.embed.weight": ["model.embed_tokens.weight"],
                               "decoder.norm.weight": ["model.norm.weight"]}
    m.update(llama_layers_map("model.layers.", cfg.layers))
    return LMSpec(cfg=cfg, wmap=m, layers_attr="model.layers", embed_key="model.embed_tokens.weight",
                  head_key=None if tied else "lm_head.weight", head_aliases=("lm_head.weight",))


FAMILIES = {"mpt": _mpt, "gpt_neox": _neox, "llama": _llama}


def lm_spec(hf: dict, where: str = "config.json", *, shape=None) -> LMSpec:
    """The LM's config and weight map. shape: source key -> its shape, or None when absent (e.g.
    SourceWeights.shape_or_none): a dimension the source implementation takes from the weights
    rather than config.json is read from there."""
    mt = hf.get("model_type")
    if mt not in FAMILIES:
        raise ValueError(f"{where}: model_type {mt!r} is not supported as an OpenFlamingo language model; "
                         f"supported: {sorted(FAMILIES)}")
    spec = FAMILIES[mt](hf, shape or (lambda key: None))
    spec.eos_token_id = _first_id(hf.get("eos_token_id"))
    spec.bos_token_id = _first_id(hf.get("bos_token_id"))
    spec.pad_token_id = _first_id(hf.get("pad_token_id"))
    return spec
