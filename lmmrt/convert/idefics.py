"""transformers IdeficsForVisionText2Text directory -> lmmrt checkpoint.

One weight map from the source names to lmmrt's; q/k/v (and gate/up) projections are fused into
one matrix each, the decoupled extra-token embedding and head are concatenated onto the main ones.
"""

from __future__ import annotations

from pathlib import Path

import torch

from lmmrt.convert.common import (
    SourceWeights,
    clip_vision_map,
    convert_state,
    find_tokenizer_json,
    llama_layers_map,
    read_hf_source_config,
    warn_no_tokenizer,
)
from lmmrt.models.config import DecoderConfig, ModelConfig, PerceiverConfig, VisionConfig, XAttnConfig
from lmmrt.runtime.checkpoint_writer import check_output_path, save_checkpoint
from lmmrt.runtime.tokenizer import Tokenizer

IDEFICS_MEAN = (0.48145466, 0.4578275, 0.40821073)
IDEFICS_STD = (0.26862954, 0.26130258, 0.27577711)

# Source tensors that lmmrt does not need (the post-LayerNorm touches only the pooled vector,
# which IDEFICS never feeds forward).
IGNORED = ("model.vision_model.post_layernorm.",)


def config_from_hf(hf: dict, image_token_id: int) -> ModelConfig:
    v = hf.get("vision_config") or {}
    p = hf.get("perceiver_config") or {}
    d, L = hf.get("hidden_size", 4096), hf.get("num_hidden_layers", 32)
    heads = hf.get("num_attention_heads", 32)
    vocab = hf.get("vocab_size", 32000) + hf.get("additional_vocab_size", 0)
    interval = hf.get("cross_layer_interval", 1)
    rope = hf.get("rope_parameters") or {}
    vision = VisionConfig(
        image_size=v.get("image_size", 224), patch_size=v.get("patch_size", 14), width=v.get("embed_dim", 768),
        layers=v.get("num_hidden_layers", 32), heads=v.get("num_attention_heads", 16),
        mlp_dim=v.get("intermediate_size", 5120), act=v.get("hidden_act", "gelu"),
        ln_eps=v.get("layer_norm_eps", 1e-5), output="all_tokens", resize="resize",
        image_mean=IDEFICS_MEAN, image_std=IDEFICS_STD)
    perceiver = None
    if hf.get("use_resampler", False):
        perceiver = PerceiverConfig(
            dim=vision.width, depth=p.get("resampler_depth", 6), heads=p.get("resampler_n_heads", 16),
            head_dim=p.get("resampler_head_dim", 96), n_latents=p.get("resampler_n_latents", 64),
            mlp_dim=4 * vision.width, mlp_act="relu", qk_norm=p.get("qk_layer_norms_perceiver", False))
    decoder = DecoderConfig(
        family="llama", vocab_size=vocab, dim=d, layers=L, heads=heads, ffn_dim=hf.get("intermediate_size", 11008),
        act=hf.get("hidden_act", "silu"), norm_eps=hf.get("rms_norm_eps", 1e-6),
        rope_theta=float(rope.get("rope_theta", hf.get("rope_theta", 10000.0))),
        max_seq_len=hf.get("max_position_embeddings", 2048), tie_embeddings=False)
    if rope.get("rope_type", "default") not in ("default", None):
        raise ValueError(f"IDEFICS rope_type {rope.get('rope_type')!r} is not supported (only default RoPE)")
    xattn = XAttnConfig(
        style="idefics", layers=[i for i in range(L) if i % interval == 0][: L // interval], heads=heads,
        head_dim=d // heads, media_dim=vision.width, ffn_dim=hf.get("intermediate_size", 11008),
        qk_norm=hf.get("qk_layer_norms", False), norm_eps=hf.get("rms_norm_eps", 1e-6),
        gate_type=hf.get("alpha_type", "float"), mask_mode="immediate")
    return ModelConfig(
        vision=vision, perceiver=perceiver, decoder=decoder, xattn=xattn, family="idefics",
        image_token_id=image_token_id, bos_token_id=hf.get("bos_token_id", 1), eos_token_id=hf.get("eos_token_id", 2),
        pad_token_id=hf.get("pad_token_id", 0), reset_media_after_eos=True)


def weight_map(cfg: ModelConfig, hf: dict) -> dict[str, list[str]]:
    """lmmrt name -> the source tensors concatenated (along dim 0) to make it."""
    m = clip_vision_map("model.vision_model.", cfg.vision.layers)
    if cfg.perceiver is not None:
        P = "model.perceiver_resampler."
        m["perceiver.latents"] = [P + "latents"]
        for s in ("weight", "bias"):
            m[f"perceiver.norm.{s}"] = [P + f"layer_norm.{s}"]
        for i in range(cfg.perceiver.depth):
            src, dst = P + f"blocks.{i}.", f"perceiver.layers.{i}."
            m[dst + "wq.weight"] = [src + "0.q_proj.weight"]
            m[dst + "wkv.weight"] = [src + "0.k_proj.weight", src + "0.v_proj.weight"]
            m[dst + "wo.weight"] = [src + "0.output_proj.weight"]
            m[dst + "fc1.weight"] = [src + "1.fc.weight"]
            m[dst + "fc2.weight"] = [src + "1.c_proj.weight"]
            for s in ("weight", "bias"):
                m[dst + f"norm_media.{s}"] = [src + f"0.context_layer_norm.{s}"]
                m[dst + f"norm_latents.{s}"] = [src + f"0.latents_layer_norm.{s}"]
                m[dst + f"mlp_norm.{s}"] = [src + f"1.ln.{s}"]
                if cfg.perceiver.qk_norm:
                    m[dst + f"q_norm.{s}"] = [src + f"0.q_layer_norm.{s}"]
                    m[dst + f"k_norm.{s}"] = [src + f"0.k_layer_norm.{s}"]
    extra = hf.get("additional_vocab_size", 0) > 0
    m["decoder.embed.weight"] = ["model.embed_tokens.weight"] + (
        ["model.embed_tokens.additional_embedding.weight"] if extra else [])
    m["decoder.lm_head.weight"] = ["lm_head.weight"] + (["lm_head.additional_fc.weight"] if extra else [])
    m["decoder.norm.weight"] = ["model.norm.weight"]
    m.update(llama_layers_map("model.layers.", cfg.decoder.layers))
    for j in range(len(cfg.xattn.layers)):
        src, dst = f"model.gated_cross_attn_layers.{j}.", f"xattn.{j}."
        m[dst + "attn_gate"] = [src + "alpha_cross_attn"]
        m[dst + "ff_gate"] = [src + "alpha_dense"]
        m[dst + "wq.weight"] = [src + "cross_attn.q_proj.weight"]
        m[dst + "wkv.weight"] = [src + "cross_attn.k_proj.weight", src + "cross_attn.v_proj.weight"]
        m[dst + "wo.weight"] = [src + "cross_attn.o_proj.weight"]
        if cfg.xattn.qk_norm:
            m[dst + "q_norm.weight"] = [src + "cross_attn.q_layer_norm.weight"]
            m[dst + "k_norm.weight"] = [src + "cross_attn.k_layer_norm.weight"]
        m[dst + "ff_w13.weight"] = [src + "mlp.gate_proj.weight", src + "mlp.up_proj.weight"]
        m[dst + "ff_w2.weight"] = [src + "mlp.down_proj.weight"]
        m[dst + "attn_norm.weight"] = [src + "input_layernorm.weight"]
        m[dst + "ff_norm.weight"] = [src + "post_attention_layernorm.weight"]
    return m


def idefics_state(src_dir: str | Path, *, dtype: torch.dtype | None = None, image_token_id: int | None = None,
                  progress: bool = True) -> tuple[ModelConfig, dict[str, torch.Tensor], Path | None]:
    """Read a transformers IDEFICS directory: (lmmrt config, lmmrt state dict, tokenizer.json or None)."""
    src = Path(src_dir)
    hf = read_hf_source_config(src, architecture="IdeficsForVisionText2Text", model="IDEFICS", model_type="idefics")
    tok_json = find_tokenizer_json(src)
    tok_image_id = None
    fake_id = None
    if tok_json is not None:
        tok = Tokenizer.from_file(tok_json)
        tok_image_id = tok.token_to_id("<image>")
        fake_id = tok.token_to_id("<fake_token_around_image>")
    if tok_image_id is not None:
        image_id = tok_image_id
    elif image_token_id is not None:
        image_id = image_token_id
    else:
        # IDEFICS's convention: <image> is the last additional token.
        image_id = hf.get("vocab_size", 32000) + hf.get("additional_vocab_size", 0) - 1
    if tok_json is None:
        warn_no_tokenizer(src, "<image>", image_id)
    cfg = config_from_hf(hf, image_id)
    if fake_id is not None:
        cfg.image_prompt_template = "<fake_token_around_image>{image}<fake_token_around_image>"
    if not 0 <= image_id < cfg.decoder.vocab_size:
        raise ValueError(f"image token id {image_id} is outside the vocabulary of {cfg.decoder.vocab_size}")
    weights = SourceWeights.open(src)
    wmap = weight_map(cfg, hf)
    state = convert_state(weights, wmap, cfg, ignored_prefixes=IGNORED, dtype=dtype, progress=progress,
                          reshape={k: (cfg.decoder.dim,) if cfg.xattn.gate_type == "vector" else (1,)
                                   for k in wmap if k.endswith("_gate")})
    return cfg, state, tok_json


def convert_idefics(src_dir: str | Path, out_dir: str | Path, *, dtype: torch.dtype | None = None,
                    image_token_id: int | None = None, progress: bool = True, force: bool = False) -> Path:
    """Convert a transformers IDEFICS directory into an lmmrt checkpoint at `out_dir` (refused if it
    exists, unless force; never inside the source)."""
    check_output_path(out_dir, sources=[src_dir], force=force)
    cfg, state, tok_json = idefics_state(src_dir, dtype=dtype, image_token_id=image_token_id, progress=progress)
    return save_checkpoint(out_dir, cfg, state, tokenizer=tok_json, sources=[src_dir], force=force,
                           metadata={"source": "idefics", "source_dir": Path(src_dir).name})
