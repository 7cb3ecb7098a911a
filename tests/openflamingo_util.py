"""Tiny OpenFlamingo models for parity tests, built from open_flamingo 2.0.1's own modules.

The reference is open_flamingo's `Flamingo` (PerceiverResampler, GatedCrossAttentionBlock,
FlamingoLMMixin via extend_instance) around a tiny transformers MPT or GPT-NeoX and a tiny
open_clip-style ViT written here in plain torch (open_clip itself needs torchvision, which is
broken beside the CPU torch wheel; open_flamingo's package __init__ imports it, so a stub module
stands in for it). Everything trainable is random, gates non-zero (a zero gate hides every
cross-attention bug), and the checkpoint is written the way open_flamingo's train_utils does.
"""

from __future__ import annotations

import json
import sys
import types
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn

# The tiny tokenizer: "<|endoftext|>" = 0 and words w1..w89; OpenFlamingo's factory then adds
# <|endofchunk|> = 90, <image> = 91 and, as there is no pad token, <PAD> = 92.
BASE_VOCAB = 90
EOC_ID, IMAGE_ID, PAD_ID = 90, 91, 92
VOCAB = 93
IMAGE_SIZE, PATCH = 28, 7


def have_open_flamingo() -> bool:
    import importlib.util

    return importlib.util.find_spec("open_flamingo") is not None


def open_flamingo_modules():
    """(Flamingo, FlamingoLMMixin, extend_instance, helpers) from the installed open_flamingo."""
    try:
        import open_clip  # noqa: F401
    except Exception:
        sys.modules["open_clip"] = types.ModuleType("open_clip")  # only factory.py uses it
    from open_flamingo.src import helpers
    from open_flamingo.src.flamingo import Flamingo
    from open_flamingo.src.flamingo_lm import FlamingoLMMixin
    from open_flamingo.src.utils import extend_instance

    return Flamingo, FlamingoLMMixin, extend_instance, helpers


# --- a tiny open_clip VisionTransformer (open_clip <= 2.20 naming and output convention) --------
class QuickGELU(nn.Module):
    def forward(self, x):
        return x * torch.sigmoid(1.702 * x)


class ResidualAttentionBlock(nn.Module):
    def __init__(self, d, heads, mlp):
        super().__init__()
        self.ln_1 = nn.LayerNorm(d)
        self.attn = nn.MultiheadAttention(d, heads, batch_first=True)
        self.ln_2 = nn.LayerNorm(d)
        self.mlp = nn.Sequential(OrderedDict(c_fc=nn.Linear(d, mlp), gelu=QuickGELU(), c_proj=nn.Linear(mlp, d)))

    def forward(self, x):
        h = self.ln_1(x)
        x = x + self.attn(h, h, h, need_weights=False)[0]
        return x + self.mlp(self.ln_2(x))


class Transformer(nn.Module):
    def __init__(self, d, layers, heads, mlp):
        super().__init__()
        self.resblocks = nn.ModuleList(ResidualAttentionBlock(d, heads, mlp) for _ in range(layers))

    def forward(self, x):
        for blk in self.resblocks:
            x = blk(x)
        return x


class VisionTransformer(nn.Module):
    """forward -> (pooled, tokens): tokens are the patch tokens without ln_post (output_tokens=True)."""

    def __init__(self, width=128, layers=2, heads=2, mlp=256, image_size=IMAGE_SIZE, patch=PATCH, out_dim=24):
        super().__init__()
        grid = image_size // patch
        self.conv1 = nn.Conv2d(3, width, patch, stride=patch, bias=False)
        self.class_embedding = nn.Parameter(torch.randn(width))
        self.positional_embedding = nn.Parameter(torch.randn(grid * grid + 1, width))
        self.ln_pre = nn.LayerNorm(width)
        self.transformer = Transformer(width, layers, heads, mlp)
        self.ln_post = nn.LayerNorm(width)
        self.proj = nn.Parameter(torch.randn(width, out_dim))

    def forward(self, x):
        x = self.conv1(x).flatten(2).transpose(1, 2)
        x = torch.cat([self.class_embedding.expand(x.shape[0], 1, -1), x], dim=1) + self.positional_embedding
        x = self.transformer(self.ln_pre(x))
        pooled, tokens = x[:, 0], x[:, 1:]
        return self.ln_post(pooled) @ self.proj, tokens


class TinyCLIP(nn.Module):
    def __init__(self, **kw):
        super().__init__()
        self.visual = VisionTransformer(**kw)


# --- tiny language models ----------------------------------------------------------------------
def tiny_lm(family: str, *, parallel_residual: bool = True):
    if family == "mpt":
        from transformers import MptConfig, MptForCausalLM

        # 6 heads: not a power of two, so MPT's interleaved slope order is exercised
        cfg = MptConfig(d_model=96, n_heads=6, n_layers=4, vocab_size=96, max_seq_len=128, expansion_ratio=4)
        return MptForCausalLM(cfg), "transformer.blocks"
    if family == "neox":
        from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

        cfg = GPTNeoXConfig(hidden_size=64, num_attention_heads=4, num_hidden_layers=4, intermediate_size=160,
                            vocab_size=BASE_VOCAB, rotary_pct=0.5, rotary_emb_base=10000,
                            use_parallel_residual=parallel_residual, max_position_embeddings=128,
                            tie_word_embeddings=False, bos_token_id=0, eos_token_id=0)
        return GPTNeoXForCausalLM(cfg), "gpt_neox.layers"
    if family == "llama":
        from transformers import LlamaConfig, LlamaForCausalLM

        cfg = LlamaConfig(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=4,
                          intermediate_size=112, vocab_size=BASE_VOCAB, max_position_embeddings=128,
                          tie_word_embeddings=False, bos_token_id=0, eos_token_id=0)
        return LlamaForCausalLM(cfg), "model.layers"
    raise ValueError(family)


def write_tokenizer(d: Path) -> None:
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import Whitespace

    vocab = {"<|endoftext|>": 0, **{f"w{i}": i for i in range(1, BASE_VOCAB)}}
    tok = Tokenizer(WordLevel(vocab, unk_token="<|endoftext|>"))
    tok.pre_tokenizer = Whitespace()
    tok.save(str(d / "tokenizer.json"))
    (d / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|endoftext|>", "bos_token": "<|endoftext|>"}))


@torch.no_grad()
def _randomize(module: nn.Module, g: torch.Generator, std: float = 0.2) -> None:
    for name, p in module.named_parameters():
        if name.endswith(("attn_gate", "ff_gate")):
            p.copy_((torch.rand(p.shape, generator=g) * 0.6 + 0.3) * torch.sign(torch.randn(p.shape, generator=g)))
        elif p.dim() == 1 and name.endswith("weight"):
            p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=g))
        elif name.endswith("bias"):
            p.copy_(0.1 * torch.randn(p.shape, generator=g))
        elif name.endswith(("latents", "class_embedding", "positional_embedding", "frame_embs", "media_time_embs")):
            p.copy_(torch.randn(p.shape, generator=g))
        else:
            p.copy_(std * torch.randn(p.shape, generator=g))


@dataclass
class TinyOpenFlamingo:
    model: nn.Module  # open_flamingo Flamingo, eval, fp32
    family: str
    every_n: int
    lm_dir: Path
    vision_file: Path
    checkpoint: Path


def trainable_state_dict(model, family: str) -> dict:
    """What open_flamingo's train_utils.filter_state_dict_to_trainable keeps: the trainable
    parameters (perceiver, gated blocks) and every parameter with "embed" in its name, without the
    duplicate old_decoder_blocks / gated_cross_attn_layers names and without vision_encoder."""
    model.requires_grad_(False)
    model.perceiver.requires_grad_(True)
    model.lang_encoder.gated_cross_attn_layers.requires_grad_(True)
    model.lang_encoder.get_input_embeddings().requires_grad_(True)
    sd = model.state_dict()
    for name, p in model.named_parameters():
        if "embed" in name:
            continue
        if not p.requires_grad and name in sd:
            del sd[name]
    if family == "neox":
        # The released OpenFlamingo-4B was trained with transformers < 4.40, where NeoX's head was
        # `embed_out` ("embed" in the name: kept). transformers 5 calls it lm_head.
        sd["lang_encoder.embed_out.weight"] = model.lang_encoder.lm_head.weight.detach().clone()
    for n in [n for n in sd if "lang_encoder.old_decoder_blocks" in n or "lang_encoder.gated_cross_attn_layers" in n
              or "vision_encoder" in n]:
        del sd[n]
    return {k: v.detach().clone() for k, v in sd.items()}


def build(tmp: Path, family: str, every_n: int, *, seed: int = 0, parallel_residual: bool = True,
          vision_format: str = "pt") -> TinyOpenFlamingo:
    """Tiny LM dir + open_clip vision file + OpenFlamingo checkpoint.pt under tmp, and the reference."""
    Flamingo, FlamingoLMMixin, extend_instance, _ = open_flamingo_modules()
    tmp = Path(tmp)
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed + 1)
    lm, layers_attr = tiny_lm(family, parallel_residual=parallel_residual)
    _randomize(lm, g)
    lm.eval()
    lm_dir = tmp / f"{family}-lm"
    lm.save_pretrained(lm_dir)
    write_tokenizer(lm_dir)

    clip = TinyCLIP()
    _randomize(clip, g)
    vstate = {f"visual.{k}": v.detach().clone() for k, v in clip.visual.state_dict().items()}
    # a whole open_clip model file: the text tower sits beside the visual one and must be ignored
    vstate.update({"positional_embedding": torch.randn(8, 32), "token_embedding.weight": torch.randn(50, 32),
                   "transformer.resblocks.0.ln_1.weight": torch.ones(32), "logit_scale": torch.ones(())})
    vision_file = tmp / f"open_clip_vit.{vision_format}"
    if vision_format == "safetensors":
        from safetensors.torch import save_file

        save_file(vstate, str(vision_file))
    else:
        torch.save(vstate, vision_file)

    extend_instance(lm, FlamingoLMMixin)
    lm.set_decoder_layers_attr_name(layers_attr)
    lm.resize_token_embeddings(VOCAB)
    model = Flamingo(clip, lm, eoc_token_id=EOC_ID, media_token_id=IMAGE_ID,
                     vis_dim=clip.visual.conv1.out_channels, cross_attn_every_n_layers=every_n)
    _randomize(model.perceiver, g)
    _randomize(model.lang_encoder.gated_cross_attn_layers, g)
    with torch.no_grad():  # training changes the whole input embedding, the new rows included
        emb = model.lang_encoder.get_input_embeddings().weight
        emb.copy_(0.2 * torch.randn(emb.shape, generator=g))
        if family == "neox":
            head = model.lang_encoder.lm_head.weight
            head.copy_(0.2 * torch.randn(head.shape, generator=g))
    model.eval()
    ckpt = tmp / f"{family}-n{every_n}-checkpoint.pt"
    torch.save(trainable_state_dict(model, family), ckpt)
    return TinyOpenFlamingo(model=model, family=family, every_n=every_n, lm_dir=lm_dir, vision_file=vision_file,
                            checkpoint=ckpt)


def set_mask_mode(model, immediate: bool) -> None:
    for blk in model.lang_encoder.gated_cross_attn_layers:
        if blk is not None:
            blk.attn.only_attend_immediate_media = immediate


@torch.no_grad()
def _condition(model, pixels: list[torch.Tensor], immediate: bool) -> None:
    """Encode the images once (Flamingo._encode_vision_x) and set the mask mode.

    A prompt without images: OpenFlamingo cannot take T_img = 0 (amax over no keys), so one dummy
    image is passed that no token sees; in cumulative mode text before any image would average
    over it, so such a prompt runs in immediate mode, where its attention rows are exactly zero
    (what lmmrt computes for a prompt with no media in both modes)."""
    set_mask_mode(model, immediate or not pixels)
    px = torch.stack(pixels) if pixels else torch.zeros(1, 3, IMAGE_SIZE, IMAGE_SIZE)
    model._encode_vision_x(vision_x=px[None, :, None])


@torch.no_grad()
def _lm_logits(model, ids: list[int]) -> torch.Tensor:
    # FlamingoLMMixin.forward derives media_locations from the ids (<image> tokens) itself
    x = torch.tensor([ids])
    return model.lang_encoder(input_ids=x, attention_mask=torch.ones_like(x)).logits[0].float()


@torch.no_grad()
def reference_logits(model, ids: list[int], pixels: list[torch.Tensor], *, immediate: bool) -> torch.Tensor:
    """open_flamingo's Flamingo on one prompt: (T, V) float32."""
    _condition(model, pixels, immediate)
    try:
        return _lm_logits(model, ids)
    finally:
        model.lang_encoder.clear_conditioned_layers()


@torch.no_grad()
def reference_greedy(model, ids: list[int], pixels: list[torch.Tensor], n: int, *, immediate: bool) -> list[int]:
    """Greedy tokens by re-running the whole sequence each step (no KV cache, images encoded
    once): generated tokens take the media of the last prompt token, as in OpenFlamingo's
    generate()."""
    _condition(model, pixels, immediate)
    seq = list(ids)
    try:
        for _ in range(n):
            seq.append(int(_lm_logits(model, seq)[-1].argmax()))
    finally:
        model.lang_encoder.clear_conditioned_layers()
    return seq[len(ids):]


def random_pixels(n: int, seed: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(3, IMAGE_SIZE, IMAGE_SIZE, generator=g) for _ in range(n)]


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).abs().max() / b.float().abs().max().clamp_min(1e-12))
