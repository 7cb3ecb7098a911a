"""transformers Blip2ForConditionalGeneration directory (OPT language model) -> lmmrt checkpoint.

BLIP-2 is a splice model: ViT (no ln_pre, patch conv with bias, post-LayerNorm over every token)
-> Q-Former connector (lmmrt.models.qformer, with language_projection) -> OPT. The ViT's fused qkv
keeps transformers' layout (q rows, k rows, v rows; the k bias is zero): lmmrt's wqkv as it is.
Older files hold the biases as `q_bias` / `v_bias`: the zero k bias is put back between them.
Flan-T5 variants are encoder-decoder LMs and are refused. The MiniGPT-4 converter reuses the
vision and Q-Former parts.
"""

from __future__ import annotations

from pathlib import Path

import torch

from lmmrt.convert.common import SourceWeights, convert_state, read_hf_source_config, read_source_json
from lmmrt.convert.llava import CHAT_TEMPLATE
from lmmrt.convert.llava import _chat_template as chat_template
from lmmrt.convert.llava import _tokenizer as marker_tokenizer
from lmmrt.models.config import DecoderConfig, ModelConfig, VisionConfig, XAttnConfig
from lmmrt.models.connector_config import ConnectorConfig
from lmmrt.runtime.checkpoint_writer import check_output_path, save_checkpoint

# BlipImageProcessor's defaults (OpenAI CLIP statistics), used when preprocessor_config.json is absent
BLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
BLIP_STD = (0.26862954, 0.26130258, 0.27577711)
IMAGE_TOKEN = "<image>"


def preprocessing(src: Path) -> tuple[int | None, tuple, tuple]:
    """(resize target or None, image_mean, image_std) from preprocessor_config.json when present."""
    p = Path(src) / "preprocessor_config.json"
    if not p.exists():
        return None, BLIP_MEAN, BLIP_STD
    pre = read_source_json(p, "an image processor config (a JSON object)")
    size = pre.get("size")
    side = size.get("height") if isinstance(size, dict) else size
    return side, tuple(pre.get("image_mean", BLIP_MEAN)), tuple(pre.get("image_std", BLIP_STD))


def blip2_vision_config(v: dict, mean, std) -> VisionConfig:
    return VisionConfig(
        image_size=v.get("image_size", 224), patch_size=v.get("patch_size", 14), width=v.get("hidden_size", 1408),
        layers=v.get("num_hidden_layers", 39), heads=v.get("num_attention_heads", 16),
        mlp_dim=v.get("intermediate_size", 6144), act=v.get("hidden_act", "gelu"), ln_eps=v.get("layer_norm_eps", 1e-6),
        output="all_tokens", resize="resize", image_mean=mean, image_std=std, patch_bias=True, ln_pre=False,
        ln_post=True)


def qformer_config(q: dict, *, queries: int, vision_width: int, out_dim: int) -> ConnectorConfig:
    enc = q.get("encoder_hidden_size", 1408)
    if enc != vision_width:
        raise ValueError(f"qformer_config.encoder_hidden_size = {enc} differs from the vision width {vision_width}")
    return ConnectorConfig(
        kind="qformer", in_dim=vision_width, hidden_dim=q.get("hidden_size", 768), out_dim=out_dim,
        act=q.get("hidden_act", "gelu"), bias=True, queries=queries, layers=q.get("num_hidden_layers", 12),
        heads=q.get("num_attention_heads", 12), mlp_dim=q.get("intermediate_size", 3072),
        cross_attention_frequency=q.get("cross_attention_frequency", 2), ln_eps=q.get("layer_norm_eps", 1e-12))


def opt_decoder_config(t: dict) -> DecoderConfig:
    for key, ok in (("enable_bias", True), ("layer_norm_elementwise_affine", True), ("_remove_final_layer_norm", False)):
        if t.get(key, ok) != ok:
            raise ValueError(f"OPT with {key}={t[key]!r} is not supported")
    d = t.get("hidden_size", 2560)
    return DecoderConfig(
        family="opt", vocab_size=t.get("vocab_size", 50272), dim=d, layers=t.get("num_hidden_layers", 32),
        heads=t.get("num_attention_heads", 32), ffn_dim=t.get("ffn_dim", 4 * d),
        act=t.get("activation_function", "relu"), norm_eps=1e-5, norm_bias=True,
        max_seq_len=t.get("max_position_embeddings", 2048), tie_embeddings=t.get("tie_word_embeddings", True),
        embed_dim=t.get("word_embed_proj_dim") or d, pre_norm=t.get("do_layer_norm_before", True))


def vision_map(prefix: str, cfg: VisionConfig, src: SourceWeights) -> tuple[dict, dict, dict]:
    """(weight map, transforms, zero-filled names) of BLIP-2's ViT under `prefix`."""
    e = prefix + "embeddings."
    m = {"vision.class_embed": [e + "class_embedding"], "vision.pos_embed": [e + "position_embedding"],
         "vision.patch_embed.weight": [e + "patch_embedding.weight"],
         "vision.patch_embed.bias": [e + "patch_embedding.bias"]}
    tf, zeros = {}, {}
    for s in ("weight", "bias"):
        m[f"vision.ln_post.{s}"] = [prefix + f"post_layernorm.{s}"]
    d = cfg.width
    for i in range(cfg.layers):
        p, o = prefix + f"encoder.layers.{i}.", f"vision.blocks.{i}."
        m[o + "wqkv.weight"] = [p + "self_attn.qkv.weight"]
        if p + "self_attn.qkv.bias" in src:
            m[o + "wqkv.bias"] = [p + "self_attn.qkv.bias"]
        elif p + "self_attn.q_bias" in src:  # older files: q and v biases only, k's is zero
            m[o + "wqkv.bias"] = [p + "self_attn.q_bias", p + "self_attn.v_bias"]
            tf[o + "wqkv.bias"] = lambda t: torch.cat([t[:d], torch.zeros_like(t[:d]), t[d:]])
        else:  # qkv_bias = false: lmmrt's block has a bias; zeros are exact
            zeros[o + "wqkv.bias"] = (3 * d,)
        for s in ("weight", "bias"):
            m[o + f"wo.{s}"] = [p + f"self_attn.projection.{s}"]
            m[o + f"ln1.{s}"] = [p + f"layer_norm1.{s}"]
            m[o + f"ln2.{s}"] = [p + f"layer_norm2.{s}"]
            m[o + f"fc1.{s}"] = [p + f"mlp.fc1.{s}"]
            m[o + f"fc2.{s}"] = [p + f"mlp.fc2.{s}"]
    return m, tf, zeros


def qformer_map(prefix: str, query_key: str, c: ConnectorConfig) -> dict[str, list[str]]:
    """BLIP-2's Q-Former (transformers names under `prefix`, e.g. "qformer.") -> connector.*; the
    projection is mapped by the caller (language_projection or MiniGPT-4's llama_proj)."""
    m = {"connector.queries": [query_key]}
    for s in ("weight", "bias"):
        m[f"connector.ln_in.{s}"] = [prefix + f"layernorm.{s}"]
    for i in range(c.layers):
        p, o = prefix + f"encoder.layer.{i}.", f"connector.layers.{i}."
        for s in ("weight", "bias"):
            m[o + f"wqkv.{s}"] = [p + f"attention.attention.{n}.{s}" for n in ("query", "key", "value")]
            m[o + f"wo.{s}"] = [p + f"attention.output.dense.{s}"]
            m[o + f"ln_attn.{s}"] = [p + f"attention.output.LayerNorm.{s}"]
            if i % c.cross_attention_frequency == 0:
                m[o + f"cross_wq.{s}"] = [p + f"crossattention.attention.query.{s}"]
                m[o + f"cross_wkv.{s}"] = [p + f"crossattention.attention.{n}.{s}" for n in ("key", "value")]
                m[o + f"cross_wo.{s}"] = [p + f"crossattention.output.dense.{s}"]
                m[o + f"ln_cross.{s}"] = [p + f"crossattention.output.LayerNorm.{s}"]
            m[o + f"fc1.{s}"] = [p + f"intermediate_query.dense.{s}"]
            m[o + f"fc2.{s}"] = [p + f"output_query.dense.{s}"]
            m[o + f"ln_mlp.{s}"] = [p + f"output_query.LayerNorm.{s}"]
    return m


def opt_map(prefix: str, d: DecoderConfig) -> dict[str, list[str]]:
    """transformers OPTForCausalLM names under `prefix` ("language_model.") -> decoder.*."""
    p0 = prefix + "model.decoder."
    m = {"decoder.embed.weight": [p0 + "embed_tokens.weight"],
         "decoder.edges.pos_embed.weight": [p0 + "embed_positions.weight"]}
    if d.embed_dim != d.dim:
        m["decoder.edges.project_in.weight"] = [p0 + "project_in.weight"]
        m["decoder.edges.project_out.weight"] = [p0 + "project_out.weight"]
    if not d.tie_embeddings:
        m["decoder.lm_head.weight"] = [prefix + "lm_head.weight"]
    for s in ("weight", "bias"):
        if d.pre_norm:
            m[f"decoder.norm.{s}"] = [p0 + f"final_layer_norm.{s}"]
        for i in range(d.layers):
            p, o = p0 + f"layers.{i}.", f"decoder.layers.{i}."
            m[o + f"wqkv.{s}"] = [p + f"self_attn.{n}_proj.{s}" for n in "qkv"]
            m[o + f"wo.{s}"] = [p + f"self_attn.out_proj.{s}"]
            m[o + f"attn_norm.{s}"] = [p + f"self_attn_layer_norm.{s}"]
            m[o + f"mlp_norm.{s}"] = [p + f"final_layer_norm.{s}"]
            m[o + f"fc1.{s}"] = [p + f"fc1.{s}"]
            m[o + f"fc2.{s}"] = [p + f"fc2.{s}"]
    return m


def read_blip2_config(src: Path, *, any_lm: bool = False) -> dict:
    """config.json of a BLIP-2 directory; unless `any_lm` (MiniGPT-4 reads only the ViT and the
    Q-Former), its LM must be OPT."""
    hf = read_hf_source_config(src, architecture="Blip2ForConditionalGeneration", model="BLIP-2", model_type="blip-2")
    t = hf.get("text_config") or {}
    if any_lm:
        return hf
    if t.get("is_encoder_decoder") or t.get("model_type", "opt") in ("t5", "mt5", "umt5"):
        raise ValueError(f"{src}: the language model is {t.get('model_type')!r}, an encoder-decoder LM (a Flan-T5 "
                         f"BLIP-2): encoder-decoder LMs are out of scope; lmmrt converts BLIP-2 with OPT")
    if t.get("model_type", "opt") != "opt":
        raise ValueError(f"{src}: the language model is {t.get('model_type')!r}; lmmrt converts BLIP-2 with OPT")
    return hf


def blip2_state(src_dir, *, dtype: torch.dtype | None = None, progress: bool = True,
                tokenizer_image_id: int | None = None) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    """Read a BLIP-2 (OPT) directory: (lmmrt config, lmmrt state dict). tokenizer_image_id: the
    "<image>" id of the tokenizer that goes with the output, when it has one."""
    src = Path(src_dir)
    hf = read_blip2_config(src)
    t = hf.get("text_config") or {}
    side, mean, std = preprocessing(src)
    vision = blip2_vision_config(hf.get("vision_config") or {}, mean, std)
    if side is not None and side != vision.image_size:
        raise ValueError(f"{src}: preprocessor_config.json resizes to {side} px, the ViT takes {vision.image_size}")
    decoder = opt_decoder_config(t)
    connector = qformer_config(hf.get("qformer_config") or {}, queries=hf.get("num_query_tokens", 32),
                               vision_width=vision.width, out_dim=decoder.dim)
    if decoder.embed_dim != decoder.dim:
        raise ValueError(f"{src}: OPT word_embed_proj_dim {decoder.embed_dim} differs from hidden_size {decoder.dim}; "
                         f"BLIP-2's language_projection writes hidden_size-wide embeddings, which such an OPT "
                         f"cannot take (transformers fails on it too)")
    image_id = tokenizer_image_id if tokenizer_image_id is not None else hf.get("image_token_index")
    if image_id is None:
        raise ValueError(f"{src}: no image token: config.json has no image_token_index and no tokenizer.json "
                         f"with {IMAGE_TOKEN!r}")
    cfg = ModelConfig(
        vision=vision, perceiver=None, decoder=decoder, xattn=XAttnConfig(layers=[]), family="blip2",
        media_feed="splice", connector=connector, image_token_id=image_id, bos_token_id=t.get("bos_token_id", 2),
        eos_token_id=t.get("eos_token_id", 2), pad_token_id=t.get("pad_token_id", 1), reset_media_after_eos=False,
        image_token=IMAGE_TOKEN)
    weights = SourceWeights.open(src)
    wmap, tf, zeros = vision_map("vision_model.", vision, weights)
    wmap.update(qformer_map("qformer.", "query_tokens", connector))
    wmap["connector.proj.weight"] = ["language_projection.weight"]
    wmap["connector.proj.bias"] = ["language_projection.bias"]
    wmap.update(opt_map("language_model.", decoder))
    add_zeros(weights, wmap, zeros)
    ignored = qformer_text_branch("qformer.", connector)
    ignored += ["language_model.lm_head.weight"] if decoder.tie_embeddings else []
    state = convert_state(weights, wmap, cfg, ignored_prefixes=ignored, dtype=dtype, progress=progress,
                          transforms=tf, reshape=vision_qformer_reshapes(vision, connector))
    return cfg, state


def add_zeros(weights: SourceWeights, wmap: dict, zeros: dict[str, tuple]) -> None:
    """lmmrt tensors with no source (a bias the source does not have) become zeros, exactly."""
    weights.add_dict({f"zeros:{k}": torch.zeros(shape) for k, shape in zeros.items()}, Path("<zeros>"))
    wmap.update({k: [f"zeros:{k}"] for k in zeros})


def qformer_text_branch(prefix: str, c: ConnectorConfig) -> list[str]:
    """Source prefixes of the Q-Former's text branch (its word embeddings and text FFN), which
    image-to-text generation never runs: read past, not converted."""
    out = [prefix + "embeddings."]
    for i in range(c.layers):
        out += [prefix + f"encoder.layer.{i}.intermediate.", prefix + f"encoder.layer.{i}.output."]
    return out


def vision_qformer_reshapes(vision: VisionConfig, c: ConnectorConfig) -> dict[str, tuple]:
    """transformers keeps a leading batch dim of 1 on these parameters; lmmrt does not."""
    return {"vision.class_embed": (vision.width,), "vision.pos_embed": (vision.grid ** 2 + 1, vision.width),
            "connector.queries": (c.queries, c.hidden_dim)}


def convert_blip2(src_dir, out_dir, *, dtype: torch.dtype | None = None, progress: bool = True,
                  force: bool = False) -> Path:
    """Convert a transformers BLIP-2 (OPT) directory into an lmmrt checkpoint at `out_dir` (refused
    if it exists, unless force; never inside the source). The tokenizer gets "<image>" when it has
    none; a chat template, if any, is kept."""
    check_output_path(out_dir, sources=[src_dir], force=force)
    src = Path(src_dir)
    hf = read_blip2_config(src)
    vocab = (hf.get("text_config") or {}).get("vocab_size", 50272)
    tok, image_id = marker_tokenizer(src, hf.get("image_token_index"), vocab)
    cfg, state = blip2_state(src, dtype=dtype, progress=progress, tokenizer_image_id=image_id)
    template = chat_template(src)
    extra = {CHAT_TEMPLATE: template} if template is not None else {}
    return save_checkpoint(out_dir, cfg, state, tokenizer=tok, sources=[src_dir], force=force, extra_files=extra,
                           metadata={"source": "blip2", "source_dir": src.name})
