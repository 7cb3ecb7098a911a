"""The embedded default model: a small Flamingo (IDEFICS-style) with deterministic random weights
and a character-level tokenizer, both built in code. `make demo` / `lmmrt demo` run the whole pipeline
on it: images made in code, an interleaved prompt, generation, timings."""

from __future__ import annotations

import time

import numpy as np
import torch

from lmmrt.models.config import DecoderConfig, ModelConfig, PerceiverConfig, VisionConfig, XAttnConfig

SPECIALS = ["<unk>", "<s>", "</s>", "<image>", "<fake_token_around_image>"]


def char_tokenizer():
    """A character-level tokenizer over printable ASCII and newline, plus the special tokens:
    whatever random weights produce, the text stays readable and valid UTF-8."""
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, processors

    vocab = {t: i for i, t in enumerate(SPECIALS)}
    for ch in [chr(i) for i in range(32, 127)] + ["\n"]:
        vocab[ch] = len(vocab)
    tok = HFTokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tok.decoder = decoders.Fuse()
    tok.add_special_tokens(SPECIALS)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", 1)])
    return tok


def demo_config(vocab_size: int) -> ModelConfig:
    vision = VisionConfig(image_size=112, patch_size=14, width=192, layers=3, heads=4, mlp_dim=768, act="gelu")
    d = 256
    return ModelConfig(
        vision=vision,
        perceiver=PerceiverConfig(dim=192, depth=2, heads=4, head_dim=48, n_latents=64, mlp_dim=768,
                                  mlp_act="relu", qk_norm=True),
        decoder=DecoderConfig(family="llama", vocab_size=vocab_size, dim=d, layers=6, heads=8, kv_heads=8,
                              ffn_dim=688, max_seq_len=1024),
        xattn=XAttnConfig(style="idefics", layers=[0, 2, 4], heads=8, head_dim=32, media_dim=192, ffn_dim=688,
                          qk_norm=True, mask_mode="immediate"),
        family="idefics", image_token_id=SPECIALS.index("<image>"), bos_token_id=1, eos_token_id=2,
        pad_token_id=0, image_prompt_template="<fake_token_around_image>{image}<fake_token_around_image>")


def demo_model(device=None, dtype=torch.float32, backend: str | None = None, cuda_graph: bool | str = "auto"):
    from lmmrt.api import Model, parse_device
    from lmmrt.models.random_init import random_model
    from lmmrt.runtime.tokenizer import Tokenizer

    tok = char_tokenizer()
    cfg = demo_config(tok.get_vocab_size())
    module = random_model(cfg, seed=1234, device=parse_device(device), dtype=dtype)
    return Model(module, cfg, Tokenizer(tok), backend=backend or "auto", path="<embedded demo>",
                 cuda_graph=cuda_graph)


def demo_images() -> list[np.ndarray]:
    """Two pictures made in code: a colour gradient and a checkerboard, uint8 (H, W, 3)."""
    h, w = 180, 240
    yy, xx = np.mgrid[0:h, 0:w]
    gradient = np.stack([xx * 255 // w, yy * 255 // h, np.full_like(xx, 128)], axis=-1).astype(np.uint8)
    checker = ((((yy // 20) + (xx // 20)) % 2) * 255).astype(np.uint8)
    checker = np.stack([checker, 255 - checker, checker // 2], axis=-1)
    return [gradient, checker]


def run_demo(device=None, max_new_tokens: int = 32, backend: str | None = None,
             cuda_graph: bool | str = "auto") -> None:
    import lmmrt

    print("lmmrt demo - an embedded IDEFICS-style model with RANDOM weights (no download):")
    print("  the pipeline is real (vision encoder, perceiver, gated cross-attention, KV and media caches),")
    print("  the text is not meaningful.")
    print("building the demo model ...", flush=True)  # several seconds on a CPU: say so before the wait
    t0 = time.perf_counter()
    model = demo_model(device=device, backend=backend, cuda_graph=cuda_graph)
    print(f"  {model}  built in {time.perf_counter() - t0:.2f}s")
    prompt = "User: What is in these pictures?<image><image>\nAssistant:"
    images = demo_images()
    print(f"\nprompt: {prompt!r} with {len(images)} images made in code {[im.shape for im in images]}", flush=True)
    request = dict(max_new_tokens=max_new_tokens, temperature=0.8, top_k=50, seed=0, ignore_eos=True)
    out = lmmrt.generate(model, prompt, images, **request)[0]
    s = model.last_stats
    # Random weights draw special tokens too (<unk>, the padding id, <image>, ...): they decode to no text.
    n_special = sum(1 for t in out.token_ids if t < len(SPECIALS))
    print(f"generated ({out.finish_reason}, {len(out.token_ids)} tokens, {n_special} of them special tokens "
          f"that print as nothing): {out.text!r}")
    print(f"\ntimings: prompt of {s.prompt_tokens} tokens with {len(images)} images; {s.summary()}")
    print("\nstreaming the same request (same seed), each piece printed as it arrives, separated by |:")
    streamed = []
    for piece in lmmrt.generate(model, prompt, images, stream=True, **request):
        streamed.append(piece)
        print(piece, end="|", flush=True)
    same = "the same text as above" if "".join(streamed) == out.text else "DIFFERENT from the text above"
    print(f"\n  {len(streamed)} pieces, {same}")


def save_demo(out_dir, dtype=torch.float32, *, force: bool = False):
    """Write the embedded demo model as an lmmrt checkpoint directory (config, weights, tokenizer);
    an existing `out_dir` is refused unless force."""
    from lmmrt.models.random_init import random_model
    from lmmrt.runtime.checkpoint_writer import check_output_path, save_checkpoint

    check_output_path(out_dir, force=force)
    tok = char_tokenizer()
    cfg = demo_config(tok.get_vocab_size())
    module = random_model(cfg, seed=1234, device="cpu", dtype=dtype)  # gates not folded: stored as trained
    return save_checkpoint(out_dir, cfg, module.state_dict(), tokenizer=tok, force=force,
                           metadata={"source": "lmmrt-demo-random"})
