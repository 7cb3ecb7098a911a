"""transformers' IDEFICS and lmmrt on the same weights: building both, the workload, one timed
generate per engine, and the decode-step byte count. Shared by bench_generate (GPU, 9B shape) and
bench_cpu_proxy (CPU, small shape).

The transformers model is built with random weights on the device in the benchmark dtype by
transformers itself (no download), with non-zero gates; its state dict is converted in memory to
lmmrt (config_from_hf / weight_map / convert_state, the converter's own path), so both engines run
exactly the same weights. Workload per row: 1 image + a PROMPT_LEN-token prompt (BOS, the image
marker, random text), greedy, EOS ignored (transformers gets no EOS at all, so neither side masks
it out of the logits).
"""

from __future__ import annotations

import time
import warnings

import torch

from bench.harness import short_error

IDEFICS_9B = dict(
    vocab_size=32000, additional_vocab_size=2, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
    num_attention_heads=32, max_position_embeddings=2048, cross_layer_interval=4, qk_layer_norms=False,
    alpha_type="float", alpha_initializer="zeros", use_resampler=True, tie_word_embeddings=False,
    bos_token_id=1, eos_token_id=2, pad_token_id=0,
    vision_config=dict(embed_dim=1280, image_size=224, patch_size=14, num_hidden_layers=32, num_attention_heads=16,
                       intermediate_size=5120, hidden_act="gelu"),
    perceiver_config=dict(use_resampler=True, resampler_n_latents=64, resampler_depth=6, resampler_n_heads=16,
                          resampler_head_dim=96, qk_layer_norms_perceiver=False),
)
IDEFICS_TINY = dict(
    IDEFICS_9B, vocab_size=96, hidden_size=64, intermediate_size=112, num_hidden_layers=4, num_attention_heads=4,
    max_position_embeddings=256, cross_layer_interval=2,
    vision_config=dict(embed_dim=48, image_size=28, patch_size=7, num_hidden_layers=2, num_attention_heads=4,
                       intermediate_size=96, hidden_act="gelu"),
    perceiver_config=dict(use_resampler=True, resampler_n_latents=8, resampler_depth=2, resampler_n_heads=2,
                          resampler_head_dim=16, qk_layer_norms_perceiver=False),
)
PROMPT_LEN = 64
FIRST_TEXT_ID = 3  # random text avoids pad/bos/eos


def build_hf_idefics(spec: dict, device: torch.device, dtype: torch.dtype, seed: int = 0):
    """IdeficsForVisionText2Text with transformers' random init, built directly on `device` in
    `dtype`; gates (zeros at construction: alpha_initializer="normal" crashes) set non-zero."""
    from transformers import IdeficsConfig, IdeficsForVisionText2Text

    torch.manual_seed(seed)
    cfg = IdeficsConfig(**spec)
    prev = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = IdeficsForVisionText2Text(cfg)
    finally:
        torch.set_default_dtype(prev)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("alpha_cross_attn", "alpha_dense")):
                v = (torch.rand(p.shape, generator=g) * 0.6 + 0.3) * torch.sign(torch.randn(p.shape, generator=g))
                p.copy_(v.to(p.dtype))
    return model.to(dtype).eval()


def lmmrt_from_hf(hf_model, backend: str = "auto"):
    """Convert the transformers model's state dict in memory with lmmrt's IDEFICS converter."""
    from lmmrt.api import Model
    from lmmrt.convert.common import SourceWeights, convert_state
    from lmmrt.convert.idefics import IGNORED, config_from_hf, weight_map
    from lmmrt.models.flamingo import FlamingoModel

    hf = hf_model.config.to_dict()
    image_id = hf["vocab_size"] + hf.get("additional_vocab_size", 0) - 1  # IDEFICS: the last extra token
    cfg = config_from_hf(hf, image_id)
    sd = hf_model.state_dict()
    wmap = weight_map(cfg, hf)
    state = convert_state(SourceWeights.from_state_dict(sd), wmap, cfg, ignored_prefixes=IGNORED, progress=False,
                          reshape={k: (cfg.decoder.dim,) if cfg.xattn.gate_type == "vector" else (1,)
                                   for k in wmap if k.endswith("_gate")})
    with torch.device("meta"):
        module = FlamingoModel(cfg)
    module.load_state_dict(state, assign=True)
    return Model(module, cfg, None, backend=backend, path="<converted in memory>")


def make_workload(B: int, vocab: int, image_id: int, bos_id: int | None, image_size: int, seed: int):
    """B prompts of PROMPT_LEN ids (BOS, image marker, random text) and one random image each
    (normalized float pixels (3, S, S)), as lmmrt.generate takes them: one list per prompt."""
    g = torch.Generator().manual_seed(seed)
    prompts, images = [], []
    for _ in range(B):
        head = ([bos_id] if bos_id is not None else []) + [image_id]
        text = torch.randint(FIRST_TEXT_ID, min(vocab - 3, 32000), (PROMPT_LEN - len(head),), generator=g).tolist()
        prompts.append(head + text)
        images.append([torch.randn(3, image_size, image_size, generator=g)])
    return prompts, images


def decode_step_bytes(model, B: int, kv_len: float) -> float:
    cfg, module = model.config, model.module
    e = module.dtype.itemsize if hasattr(module.dtype, "itemsize") else torch.tensor([], dtype=module.dtype).element_size()
    w = 0
    for name, p in module.named_parameters():
        if name.startswith("decoder.embed."):
            w += p.numel() if cfg.decoder.tie_embeddings else B * p.shape[1]
        elif name.startswith("decoder."):
            w += p.numel()
        elif name.startswith("xattn.") and ".wkv." not in name and ".k_norm." not in name:
            w += p.numel()
    dc, xc = cfg.decoder, cfg.xattn
    kv = 2 * dc.layers * B * dc.kv_heads * kv_len * dc.head_dim
    media = 2 * len(xc.layers) * B * cfg.media_tokens * xc.heads * xc.head_dim
    return float(e) * (w + kv + media)


def weights_gib(module) -> float:
    return sum(p.numel() * p.element_size() for p in module.parameters()) / 2**30


class _Mem:
    """Peak allocator memory of a call above what was allocated before it (CUDA only)."""

    def __init__(self, device):
        self.device, self.peak_extra_gib = device, None

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.base = torch.cuda.memory_allocated(self.device)
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak_extra_gib = (torch.cuda.max_memory_allocated(self.device) - self.base) / 2**30


def run_lmmrt(model, prompts, images, new_tokens: int, *, warmup: bool = True) -> dict:
    import lmmrt

    # Warnings (e.g. a failed CUDA-graph capture and its eager fallback) go into the row: they say
    # which path was measured.
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        if warmup:  # the same shapes: a CUDA graph is captured per batch size and cache-length bucket
            lmmrt.generate(model, prompts, images, max_new_tokens=new_tokens, ignore_eos=True)
        with _Mem(model.device) as mem:
            out = lmmrt.generate(model, prompts, images, max_new_tokens=new_tokens, ignore_eos=True)
    s = model.last_stats
    r = dict(ttft_ms=1e3 * s.prefill_s, decode_tok_s=s.decode_tokens_per_s, ms_per_step=s.ms_per_step,
             decode_steps=s.decode_steps, peak_extra_gib=mem.peak_extra_gib, tokens=[res.token_ids for res in out])
    if caught:
        r["warnings"] = sorted({f"{w.category.__name__}: {w.message}"[:300] for w in caught})
    return r


def hf_inputs(prompts, images, image_id: int, device, dtype) -> dict:
    ids = torch.tensor(prompts, dtype=torch.long)
    B, T = ids.shape
    seen = torch.cumsum((ids == image_id).long(), dim=1)  # text_time: 0 before the marker, 1 after
    return dict(input_ids=ids.to(device), attention_mask=torch.ones_like(ids).to(device),
                pixel_values=torch.stack([per[0] for per in images])[:, None].to(device=device, dtype=dtype),
                image_attention_mask=(seen > 0).long()[:, :, None].to(device))


def run_hf(hf_model, inputs: dict, new_tokens: int, device, *, warmup: bool = True) -> dict:
    from transformers import LogitsProcessor, LogitsProcessorList

    class StepClock(LogitsProcessor):
        """Called once per step right after the forward: synchronize and timestamp."""

        def __init__(self):
            self.times: list[float] = []

        def __call__(self, input_ids, scores):
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            self.times.append(time.perf_counter())
            return scores

    def gen(n, clock=None):
        # No EOS at all, as lmmrt's ignore_eos: min_new_tokens would instead mask EOS out of the
        # logits and change the greedy tokens wherever EOS is the argmax.
        kw = dict(max_new_tokens=n, do_sample=False, pad_token_id=0, eos_token_id=None)
        if clock is not None:
            kw["logits_processor"] = LogitsProcessorList([clock])
        with torch.inference_mode():
            return hf_model.generate(**inputs, **kw)

    if warmup:
        gen(min(4, new_tokens))
    clock = StepClock()
    with _Mem(device) as mem:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        out = gen(new_tokens, clock)
    B, T = inputs["input_ids"].shape
    steps = len(clock.times) - 1
    decode_s = clock.times[-1] - clock.times[0] if steps > 0 else float("nan")
    return dict(ttft_ms=1e3 * (clock.times[0] - t0), decode_tok_s=B * steps / decode_s if steps > 0 else float("nan"),
                ms_per_step=1e3 * decode_s / steps if steps > 0 else float("nan"), decode_steps=steps,
                peak_extra_gib=mem.peak_extra_gib, tokens=out[:, T:].tolist())


def agreement(a: list[list[int]], b: list[list[int]], k: int) -> dict:
    lead = []
    for x, y in zip(a, b):
        n = 0
        for s, t in zip(x[:k], y[:k]):
            if s != t:
                break
            n += 1
        lead.append(n)
    return {"steps_compared": k, "rows": len(lead), "rows_agreeing": sum(n == k for n in lead),
            "mean_leading_match": sum(lead) / max(len(lead), 1), "leading_match": lead}


def account_decode_bytes(b, row: dict, model, B: int, new_tokens: int) -> None:
    kv_len = PROMPT_LEN + (1 + new_tokens) / 2  # mean cache length over the timed decode steps
    nbytes = decode_step_bytes(model, B, kv_len)
    row["bytes_per_step"] = nbytes
    if row.get("ms_per_step"):
        row["gbps"] = nbytes / (row["ms_per_step"] * 1e-3) / 1e9
        row["roofline_frac"] = row["gbps"] / b.ceilings["copy_gbps"]


def compare_with_hf(row: dict, tokens: list[list[int]], hf: dict, hf_tokens: list[list[int]], steps: int) -> None:
    """lmmrt's row gets its greedy-token agreement with transformers over `steps` steps, and its decode
    and time-to-first-token speed-ups over transformers' row `hf`."""
    row["agreement"] = agreement(tokens, hf_tokens, steps)
    if hf.get("decode_tok_s") and row.get("decode_tok_s"):
        row["speedup_vs_hf"] = row["decode_tok_s"] / hf["decode_tok_s"]
    if hf.get("ttft_ms") and row.get("ttft_ms"):
        row["ttft_speedup_vs_hf"] = hf["ttft_ms"] / row["ttft_ms"]


def run_lmmrt_and_hf(b, calls, *, row, measure, device: torch.device, steps: int) -> None:
    """calls: (engine, call) for "lmmrt[auto]" then "hf", each run within b's time budget; row(engine, **kw)
    records a skipped or failed one, measure(engine, result) -> the row of a timed one. When both ran,
    lmmrt's row is compared with transformers' (compare_with_hf) and the run saved."""
    results = {}
    for engine, call in calls:
        if b.elapsed > b.budget_s:
            row(engine, status="skipped", note="time budget spent")
            continue
        try:
            r = call()
        except Exception as e:
            row(engine, status="error", error=short_error(e))
            if device.type == "cuda":
                torch.cuda.empty_cache()
            continue
        results[engine] = (measure(engine, r), r["tokens"])
    if len(results) == 2:
        (lm, lm_tokens), (hf, hf_tokens) = results["lmmrt[auto]"], results["hf"]
        compare_with_hf(lm, lm_tokens, hf, hf_tokens, steps)
        b.save()
