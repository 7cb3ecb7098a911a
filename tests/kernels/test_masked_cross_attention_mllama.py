"""Masked cross-attention with Mllama's options: mode "range" (text_time_first..text_time), media_len
(valid keys per media item: the image's tiles) and grouped-query k/v. The reference against an
independent per-row loop driven by transformers' own processor mask rule; the Triton prefill and
decode kernels against the float64 reference; the CUDA dispatch's routing of these options."""

from __future__ import annotations

import importlib

import pytest
import torch
from transformers.models.mllama.processing_mllama import get_cross_attention_token_mask

from lmmrt.kernels import masked_cross_attention_cuda as mxa_cuda
from lmmrt.kernels.masked_cross_attention import masked_cross_attention, masked_cross_attention_reference

try:  # tests/kernels may or may not be a package, depending on how pytest imports it
    from .kernel_testing import DEVICE, DTYPES, KernelSpy, assert_close, gpu_only, nan_buffer, needs_triton
except ImportError:
    from kernel_testing import DEVICE, DTYPES, KernelSpy, assert_close, gpu_only, nan_buffer, needs_triton

mx = importlib.import_module("lmmrt.kernels.masked_cross_attention")
pytestmark = pytest.mark.filterwarnings("ignore:Conversion of an array with ndim:DeprecationWarning")
MARKER = -7  # the image marker token in the generated prompts


def _prompt(T: int, count: int, g: torch.Generator) -> list[int]:
    """T tokens holding `count` image markers in runs of 1-3 consecutive markers at random places
    (the first run sometimes at position 0, text between and after runs)."""
    runs = []
    while sum(runs) < count:
        runs.append(min(int(torch.randint(1, 4, (1,), generator=g)), count - sum(runs)))
    gaps = torch.multinomial(torch.ones(len(runs) + 1), T - count, replacement=True, generator=g) \
        if T > count else torch.zeros(0, dtype=torch.long)
    text = torch.bincount(gaps, minlength=len(runs) + 1).tolist()
    tokens = [0] * text[0]
    for run, n_text in zip(runs, text[1:]):
        tokens += [MARKER] * run + [1] * n_text
    return tokens


def _times(tokens: list[int]) -> tuple[list[int], list[int]]:
    """lmmrt's (text_time, text_time_first) of one prompt: markers so far, and the first image of
    the run of consecutive markers holding the last of them (0 before any marker)."""
    tt, ttf, n, first = [], [], 0, 0
    for i, tok in enumerate(tokens):
        if tok == MARKER:
            n += 1
            first = first if i > 0 and tokens[i - 1] == MARKER else n
        tt.append(n)
        ttf.append(first)
    return tt, ttf


def _visible(tokens: list[int]) -> list[set[int]]:
    """Per token, the 1-based images transformers' processor lets it see (its [start, end) spans)."""
    seen = [set() for _ in tokens]
    for i, (lo, hi) in enumerate(get_cross_attention_token_mask(tokens, MARKER)):
        for p in range(lo, len(tokens) if hi == -1 else hi):
            seen[p].add(i + 1)
    return seen


def _inputs(B, T, H, KVH, dh, L, counts, dtype, *, media_len, layout="contiguous", seed=0, prompt_len=None):
    """Random inputs; media packed in reverse sequence order between two unused media items.
    The indices are those of the last T tokens of prompts of prompt_len (default T) tokens.
    media_len: None, "random" (1..L keys per item, some exactly L) or an int (tiles of that many
    keys: each item has 1..L // tile whole tiles). Returns q, k, v, index dict, prompts."""
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape):
        return torch.randn(*shape, generator=g).to(dtype=dtype, device=DEVICE)

    N = sum(counts) + 2
    starts, nxt = [0] * B, 1
    for b in reversed(range(B)):
        starts[b], nxt = nxt, nxt + counts[b]
    if layout == "fused":  # q a slice of a wider projection, k/v halves of one tensor
        q = rnd(B, T, H, 2 * dh)[..., :dh]
        kv = rnd(N, L, 2, KVH, dh)
        k, v = kv[:, :, 0], kv[:, :, 1]
    elif layout == "heads_major":
        q = rnd(B, H, T, dh).transpose(1, 2)
        k, v = rnd(N, KVH, L, dh).transpose(1, 2), rnd(N, KVH, L, dh).transpose(1, 2)
    else:
        q, k, v = rnd(B, T, H, dh), rnd(N, L, KVH, dh), rnd(N, L, KVH, dh)
    prompts = [_prompt(prompt_len or T, c, g) for c in counts]
    times = [_times(p) for p in prompts]
    idx = dict(text_time=torch.tensor([t[-T:] for t, _ in times], dtype=torch.int32, device=DEVICE),
               text_time_first=torch.tensor([f[-T:] for _, f in times], dtype=torch.int32, device=DEVICE),
               media_start=torch.tensor(starts, dtype=torch.int32, device=DEVICE),
               media_count=torch.tensor(counts, dtype=torch.int32, device=DEVICE))
    if media_len == "random":
        lens = torch.randint(1, L + 1, (N,), generator=g)
        lens[::3] = L
        idx["media_len"] = lens.to(torch.int32).to(DEVICE)
    elif media_len is not None:
        idx["media_len"] = (torch.randint(1, L // media_len + 1, (N,), generator=g) * media_len).to(torch.int32)
        idx["media_len"] = idx["media_len"].to(DEVICE)
    return q, k, v, idx, prompts


def _ref64(q, k, v, idx, mode):
    kw = {n: t for n, t in idx.items() if n != "text_time_first" or mode == "range"}
    return masked_cross_attention_reference(q.double(), k.double(), v.double(), **kw, mode=mode)


def _naive(q, k, v, idx, prompts, mode):
    """One row and head at a time in float64; range mode's visible images from transformers'
    processor spans, the others from flamingo.md §4.1; keys cut at media_len; kv head h // group."""
    B, T, H, dh = q.shape
    group = H // k.shape[2]
    out = torch.zeros(q.shape, dtype=torch.float64)
    lens = idx.get("media_len", torch.full((k.shape[0],), k.shape[1])).tolist()
    for b in range(B):
        s, c = int(idx["media_start"][b]), int(idx["media_count"][b])
        visible = _visible(prompts[b])
        for t in range(T):
            o = int(idx["text_time"][b, t])
            uniform = mode == "cumulative" and o == 0
            if mode == "range":
                media = sorted(visible[t])
            elif mode == "immediate":
                media = [o] if 1 <= o <= c else []
            else:
                media = list(range(1, c + 1)) if uniform else list(range(1, min(o, c) + 1))
            for h in range(H):
                keys = [k[s + m - 1, :lens[s + m - 1], h // group] for m in media]
                vals = [v[s + m - 1, :lens[s + m - 1], h // group] for m in media]
                if not media or sum(len(x) for x in keys) == 0:
                    continue  # zero row
                keys, vals = torch.cat(keys).double(), torch.cat(vals).double()
                scores = torch.zeros(len(keys), dtype=torch.float64) if uniform else keys @ q[b, t, h].double()
                out[b, t, h] = torch.softmax(scores * dh**-0.5, 0) @ vals
    return out


@pytest.mark.parametrize("mode", ["range", "immediate", "cumulative"])
@pytest.mark.parametrize("media_len", [None, "random", 3], ids=["all-keys", "random-len", "tiles"])
def test_reference_matches_naive_loop(mode, media_len):
    q, k, v, idx, prompts = _inputs(4, 17, 4, 2, 8, 6, [3, 0, 5, 1], torch.float64, media_len=media_len,
                                    layout="fused", seed=5)
    ref = _ref64(q, k, v, idx, mode)
    naive = _naive(*(t.cpu() for t in (q, k, v)), {n: t.cpu() for n, t in idx.items()}, prompts, mode)
    torch.testing.assert_close(ref.cpu(), naive, atol=1e-12, rtol=1e-12)


def test_range_bounds_are_the_processor_rule():
    # text_time_first..text_time is exactly the set of images transformers' processor opens.
    g = torch.Generator().manual_seed(11)
    for T, count in [(12, 5), (9, 9), (30, 7), (6, 1)]:
        tokens = _prompt(T, count, g)
        for (hi, lo), seen in zip(zip(*_times(tokens)), _visible(tokens)):
            assert seen == set(range(lo, hi + 1)) if hi else not seen, (tokens, hi, lo, seen)


def test_range_text_before_the_first_image_and_no_images_is_zero():
    q, k, v, idx, prompts = _inputs(2, 11, 2, 1, 8, 5, [2, 0], torch.float32, media_len="random", seed=2)
    out = masked_cross_attention(q, k, v, **idx, mode="range")
    assert (out[1] == 0).all()
    before = idx["text_time"][0] == 0
    assert (out[0][before] == 0).all() and (out[0][~before] != 0).all()


def _run(case, dtype, mode="range", num_splits=0):
    B, T, H, KVH, dh, L, counts, media_len, layout = case
    # decode (T == 1): the last token of a 13-token prompt
    q, k, v, idx, _ = _inputs(B, T, H, KVH, dh, L, counts, dtype, media_len=media_len, layout=layout,
                              seed=T * 7 + L + KVH, prompt_len=max(T, 13))
    if mode != "range":
        del idx["text_time_first"]
    storage, out = nan_buffer(q.shape, dtype, strided=layout != "contiguous")
    if num_splits:
        res = mx.masked_cross_attention_triton(q, k, v, **idx, mode=mode, out=out, num_splits=num_splits)
    else:
        res = masked_cross_attention(q, k, v, **idx, mode=mode, backend="triton", out=out)
    assert res.data_ptr() == out.data_ptr()
    assert not torch.isnan(storage).any(), "kernel left elements of out unwritten"
    assert_close(out, _ref64(q, k, v, idx, mode), dtype, f"{mode} {case}")


# (B, T, H, KVH, dh, L, per-sequence media counts, media_len, layout); GQA groups 1, 2, 3 and 4
PREFILL = [
    (3, 37, 4, 2, 64, 51, [2, 0, 5], 17, "fused"),          # 3 tiles of 17 keys, 1-3 valid
    (2, 19, 4, 1, 32, 130, [4, 1], "random", "heads_major"),  # L past one 128-key block
    (2, 23, 4, 4, 16, 1, [3, 2], None, "contiguous"),        # one key per media item
    (1, 70, 2, 2, 64, 40, [9], "random", "contiguous"),      # long runs of markers
    (2, 50, 6, 2, 16, 40, [4, 2], "random", "fused"),        # 3 heads a kv head: 150 rows, a token's split
]
DECODE = [
    (3, 1, 8, 2, 64, 200, [3, 1, 0], "random", "fused"),
    (2, 1, 4, 1, 32, 65, [6, 2], 13, "contiguous"),
    (2, 1, 2, 2, 32, 70, [3, 2], "random", "heads_major"),  # one kv head per query head
]


@needs_triton
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", PREFILL + DECODE, ids=lambda c: "-".join(map(str, c[:9])))
def test_kernel_range_matches_reference(case, dtype):
    _run(case, dtype)


@needs_triton
@pytest.mark.parametrize("mode", ["immediate", "cumulative"])
@pytest.mark.parametrize("case", [PREFILL[0], DECODE[0]], ids=["prefill", "decode"])
def test_kernel_other_modes_with_media_len_and_gqa(case, mode):
    _run(case, torch.float32, mode=mode)


@needs_triton
@pytest.mark.parametrize("case", [PREFILL[0], PREFILL[1], DECODE[0], DECODE[1]], ids=lambda c: f"T={c[1]}")
def test_keys_never_seen_are_never_read(case):
    # NaN in every key past media_len and in the unused media items: the output stays exact.
    B, T, H, KVH, dh, L, counts, media_len, layout = case
    q, k, v, idx, _ = _inputs(B, T, H, KVH, dh, L, counts, torch.float32, media_len=media_len, layout=layout,
                              seed=3, prompt_len=max(T, 13))
    unseen = torch.arange(L, device=DEVICE)[None, :] >= idx["media_len"][:, None]
    unseen[[0, -1]] = True
    k[unseen], v[unseen] = float("nan"), float("nan")
    ref = _ref64(q, k, v, idx, "range")
    assert not torch.isnan(ref).any()
    assert_close(masked_cross_attention(q, k, v, **idx, mode="range", backend="triton"), ref, torch.float32)


@needs_triton
@pytest.mark.parametrize("T,kv_heads", [(19, 2), (1, 2), (1, 4)], ids=["prefill", "decode-gqa", "decode"])
def test_media_len_out_of_range_reads_nothing_outside(T, kv_heads):
    # Index tensors are trusted, but a negative length sees no key and one past L sees all L, as
    # in the reference; no read outside the item's keys (NaN in every neighbouring item).
    q, k, v, idx, _ = _inputs(2, T, 4, kv_heads, 16, 9, [2, 3], torch.float32, media_len="random",
                              prompt_len=max(T, 9), seed=4)
    idx["media_len"] = torch.tensor([0, -3, 4, 9, -1, 9 + 5, 0], dtype=torch.int32, device=DEVICE)
    k[[0, 6]], v[[0, 6]] = float("nan"), float("nan")  # the unused items at both ends
    ref = _ref64(q, k, v, idx, "range")
    assert not torch.isnan(ref).any()
    assert_close(masked_cross_attention(q, k, v, **idx, mode="range", backend="triton"), ref, torch.float32)


@needs_triton
def test_grouped_decode_runs_one_program_per_kv_head(monkeypatch):
    spies = {n: KernelSpy(getattr(mx, n)) for n in ("_xattn_decode_kernel", "_xattn_decode_gqa_kernel")}
    for n, s in spies.items():
        monkeypatch.setattr(mx, n, s)
    for kv_heads, launched in ((4, (1, 0)), (2, (1, 1))):
        q, k, v, idx, _ = _inputs(2, 1, 4, kv_heads, 16, 8, [1, 2], torch.float32, media_len=None, prompt_len=5)
        masked_cross_attention(q, k, v, **idx, mode="range", backend="triton")
        assert tuple(s.launches for s in spies.values()) == launched


@needs_triton
@pytest.mark.parametrize("case", [PREFILL[4], DECODE[0]], ids=["prefill", "decode"])
def test_gpu_launch_configs(monkeypatch, case):
    # The tiles and split counts the GPU path picks (64-row blocks: a token's 3 query heads split
    # across blocks; 64-key tiles; splits sized for 132 SMs), through the interpreter here.
    monkeypatch.setattr(mx, "_interpreted", lambda device: False)
    monkeypatch.setattr(mx, "_sm_count", lambda device: 132)
    _run(case, torch.float32)


@needs_triton
@pytest.mark.parametrize("num_splits", [1, 3, 16])
def test_decode_forced_splits(num_splits):
    # more splits than key blocks leaves some splits empty: the combine must ignore them
    _run(DECODE[0], torch.float32, num_splits=num_splits)


@needs_triton
def test_torch_compile_fullgraph_with_mllama_options():
    # text_time_first / media_len are optional tensors of the custom op: no graph break either way.
    q, k, v, idx, _ = _inputs(2, 19, 4, 2, 32, 40, [2, 3], torch.float32, media_len="random", prompt_len=19)
    fn = torch.compile(lambda q, k, v, idx: masked_cross_attention(q, k, v, **idx, mode="range", backend="triton"),
                       fullgraph=True)
    assert_close(fn(q, k, v, idx), _ref64(q, k, v, idx, "range"), torch.float32, "compiled range")


@gpu_only
@needs_triton
def test_gpu_llama_vision_shapes_and_graph_capture():
    # Llama-3.2-11B-Vision: 32 heads over 8 kv heads x 128, images of 4 tile slots x 1601 keys with
    # 1-4 valid tiles, batch 8 (2-3 images each, runs of markers); the decode step captured in a
    # CUDA graph and replayed after every row moved to its last image.
    B, H, KVH, dh, L = 8, 32, 8, 128, 4 * 1601
    q, k, v, idx, _ = _inputs(B, 1, H, KVH, dh, L, [2, 3] * 4, torch.bfloat16, media_len=1601, prompt_len=40,
                              seed=9)
    fn = lambda: masked_cross_attention(q, k, v, **idx, mode="range", backend="triton")
    assert_close(fn(), _ref64(q, k, v, idx, "range"), torch.bfloat16, "decode")
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fn()
    idx["text_time"].copy_(idx["media_count"][:, None])
    idx["text_time_first"].copy_(idx["media_count"][:, None])
    graph.replay()
    torch.cuda.synchronize()
    assert_close(out, _ref64(q, k, v, idx, "range"), torch.bfloat16, "graph replay")
    _run((2, 64, 32, 8, 128, 4 * 1601, [1, 2], 1601, "contiguous"), torch.bfloat16)  # prefill


def test_bad_mllama_inputs_are_reported():
    q, k, v, idx, _ = _inputs(2, 5, 4, 2, 8, 4, [1, 2], torch.float32, media_len="random")
    tt, ttf, ms, mc, ml = (idx[n] for n in ("text_time", "text_time_first", "media_start", "media_count",
                                             "media_len"))
    with pytest.raises(ValueError, match="mode 'range' needs text_time_first"):
        masked_cross_attention(q, k, v, tt, ms, mc, mode="range")
    with pytest.raises(ValueError, match="text_time_first is only read in mode 'range'"):
        masked_cross_attention(q, k, v, tt, ms, mc, mode="immediate", text_time_first=ttf)
    with pytest.raises(ValueError, match="k/v have 3 heads, which must divide q's 4 heads"):
        masked_cross_attention(q, k[:, :, :1].expand(-1, -1, 3, -1), v[:, :, :1].expand(-1, -1, 3, -1),
                               tt, ms, mc)
    with pytest.raises(ValueError, match=r"media_len has shape \(3,\), expected \(5,\)"):
        masked_cross_attention(q, k, v, tt, ms, mc, mode="range", text_time_first=ttf, media_len=ml[:3])
    with pytest.raises(ValueError, match="text_time_first must be int32 or int64"):
        masked_cross_attention(q, k, v, tt, ms, mc, mode="range", text_time_first=ttf.float())
    with pytest.raises(ValueError, match=r"text_time_first has shape \(2, 4\)"):
        masked_cross_attention(q, k, v, tt, ms, mc, mode="range", text_time_first=ttf[:, :4])


@pytest.mark.parametrize("option", ["range", "media_len", "gqa", "none"])
def test_cuda_dispatch_routes_mllama_options_to_triton(monkeypatch, option):
    # The CUDA decode kernel implements immediate/cumulative with whole media items and one kv head
    # per query head: calls using Mllama's options must reach the Triton kernel, explicitly.
    calls = []
    monkeypatch.setattr(mxa_cuda, "masked_cross_attention_decode", lambda *a, **kw: calls.append("cuda"))
    monkeypatch.setattr(mxa_cuda, "_fallback", lambda: lambda *a, **kw: calls.append(("fallback", kw)))
    q, k, v, idx, _ = _inputs(2, 1, 4, 2 if option == "gqa" else 4, 64, 8, [1, 2], torch.bfloat16,
                              media_len="random" if option == "media_len" else None, prompt_len=5)
    if option != "range":
        del idx["text_time_first"]
    mxa_cuda.masked_cross_attention_cuda(q, k, v, **idx, mode="range" if option == "range" else "immediate")
    if option == "none":
        assert calls == ["cuda"]
    else:
        assert calls[0][0] == "fallback"
        kw = calls[0][1]
        assert (kw["text_time_first"] is idx.get("text_time_first") and kw["media_len"] is idx.get("media_len")
                and kw["mode"] == ("range" if option == "range" else "immediate"))
