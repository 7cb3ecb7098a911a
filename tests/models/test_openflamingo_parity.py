"""OpenFlamingo parity: lmmrt against open_flamingo 2.0.1's own modules around tiny transformers
MPT / GPT-NeoX LMs and a tiny open_clip-style ViT, fp32 on the CPU, non-zero gates.

Each checkpoint.pt is written as open_flamingo's training code writes it and converted with the
`lmmrt convert openflamingo` command. lmmrt runs the prompts as one left-padded batch; the
reference runs each prompt alone (OpenFlamingo's batching needs equal image counts)."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("einops_exts")

import openflamingo_util as U  # noqa: E402

if not U.have_open_flamingo():
    pytest.skip("open-flamingo 2.0.1 is not installed (make install-test installs it)", allow_module_level=True)

import lmmrt  # noqa: E402
from lmmrt.cli import main as cli  # noqa: E402
from lmmrt.models.xattn import MediaContext  # noqa: E402

TOL = 1e-4
NEW_TOKENS = 16
I, E = U.IMAGE_ID, U.EOC_ID
# 0, 1 and 3 images; text before the first image (cumulative mode's uniform-average rows), an
# <|endofchunk|> between chunks, different lengths (left padding in the batch).
PROMPTS = [
    [5, 6, 7, 8, 9],
    [3, 4, I, 10, 11, 12, E, 13],
    [2, 4, I, 10, 11, E, I, 14, I, 15, 16, 17, 18],
]
PIXELS = [[], U.random_pixels(1, seed=1), U.random_pixels(3, seed=3)]

_built: dict = {}


@pytest.fixture(scope="module")
def tmp_root(tmp_path_factory):
    return tmp_path_factory.mktemp("openflamingo")


def built(tmp_root, family, every_n, **kw):
    key = (family, every_n, tuple(sorted(kw.items())))
    if key not in _built:
        d = tmp_root / f"{family}-{every_n}-{len(_built)}"
        d.mkdir()
        _built[key] = U.build(d, family, every_n, **kw)
    return _built[key]


def convert(tf, out, immediate: bool, *extra) -> lmmrt.Model:
    rc = cli(["convert", "openflamingo", "--checkpoint", str(tf.checkpoint), "--lm", str(tf.lm_dir),
              "--vision", str(tf.vision_file), str(out), "--only-attend-immediate-media", str(immediate).lower(),
              "--quiet", *extra])
    assert rc == 0
    return lmmrt.load(out, device="cpu", backend="torch")


def _report(name, errs):
    print(f"{name}: max rel err " + ", ".join(f"{k}={v:.2e}" for k, v in errs.items()))


@pytest.mark.parametrize("family", ["mpt", "neox"])
@pytest.mark.parametrize("every_n", [1, 2])
@pytest.mark.parametrize("immediate", [True, False], ids=["immediate", "cumulative"])
def test_whole_model(tmp_root, family, every_n, immediate):
    tf = built(tmp_root, family, every_n)
    model = convert(tf, tmp_root / f"out-{family}-{every_n}-{immediate}", immediate)
    cfg = model.config
    assert cfg.xattn.layers == [i for i in range(cfg.decoder.layers) if (i + 1) % every_n == 0]
    assert cfg.xattn.mask_mode == ("immediate" if immediate else "cumulative")

    got = lmmrt.logits(model, PROMPTS, PIXELS)
    errs = {}
    for k, (ids, px, g) in enumerate(zip(PROMPTS, PIXELS, got)):
        ref = U.reference_logits(tf.model, ids, px, immediate=immediate)
        errs[f"{len(px)}img"] = U.rel_err(g, ref)
        assert g.shape == ref.shape
        assert errs[f"{len(px)}img"] <= TOL, f"prompt {k} ({len(px)} images): {errs}"
    _report(f"{family} n={every_n} {'immediate' if immediate else 'cumulative'} logits", errs)

    # greedy: a batch of two (1 and 3 images), and the text-only prompt alone (its reference is
    # the same in both modes, see openflamingo_util._condition: run once)
    for idx in ([1, 2], [0]) if immediate else ([1, 2],):
        out = lmmrt.generate(model, [PROMPTS[i] for i in idx], [PIXELS[i] for i in idx],
                             max_new_tokens=NEW_TOKENS, ignore_eos=True)
        for i, r in zip(idx, out):
            ref = U.reference_greedy(tf.model, PROMPTS[i], PIXELS[i], NEW_TOKENS, immediate=immediate)
            assert I not in ref  # a generated <image> would start a new media span in OpenFlamingo
            assert r.token_ids == ref, f"prompt {i}: lmmrt {r.token_ids} != open_flamingo {ref}"


def test_neox_sequential_residual(tmp_root):
    """use_parallel_residual=False (the other GPT-NeoX layer form)."""
    tf = built(tmp_root, "neox", 2, parallel_residual=False)
    model = convert(tf, tmp_root / "out-neox-seq", True)
    assert not model.config.decoder.parallel_residual
    got = lmmrt.logits(model, PROMPTS, PIXELS)
    errs = {f"{len(px)}img": U.rel_err(g, U.reference_logits(tf.model, ids, px, immediate=True))
            for ids, px, g in zip(PROMPTS, PIXELS, got)}
    _report("neox sequential residual logits", errs)
    assert max(errs.values()) <= TOL, errs


@torch.no_grad()
def test_vision_perceiver_and_gated_block(tmp_root):
    """The parts alone: patch tokens of the ViT, perceiver latents, one gated block in both modes."""
    tf = built(tmp_root, "mpt", 2)
    ref = tf.model
    model = convert(tf, tmp_root / "out-parts", True)
    m = model.module
    px = torch.stack(U.random_pixels(3, seed=7))

    feats_ref = ref.vision_encoder(px)[1]  # OpenFlamingo: patch tokens, no ln_post
    feats = m.vision(px)
    e_vis = U.rel_err(feats, feats_ref)

    lat_ref = ref.perceiver(feats_ref[None, :, None])[0]  # (b=1, T=3, F=1, v, d) -> (3, 64, d)
    lat = m.perceiver(feats_ref[:, None])
    e_perc = U.rel_err(lat, lat_ref)

    errs = {"vision": e_vis, "perceiver": e_perc}
    ids = torch.tensor([[3, 4, I, 10, 11, I, 12, 13, I, 14, 15]])
    text_time = (ids == I).cumsum(-1).to(torch.int32)
    x = torch.randn(1, ids.shape[1], m.cfg.decoder.dim, generator=torch.Generator().manual_seed(3))
    li = m.cfg.xattn.layers[0]
    blk_ref = ref.lang_encoder.gated_cross_attn_layers[li]
    blk = m.xattn[0]
    for mode in ("immediate", "cumulative"):
        blk_ref.attn.only_attend_immediate_media = mode == "immediate"
        blk.cfg.mask_mode = mode
        y_ref = blk_ref(x, lat_ref[None], media_locations=ids == I)
        media = MediaContext(kv=[blk.project_media(lat_ref)], text_time=text_time,
                             media_start=torch.tensor([0], dtype=torch.int32),
                             media_count=torch.tensor([3], dtype=torch.int32), any_media=True)
        y = blk(x, media, 0)
        errs[f"block-{mode}"] = U.rel_err(y - x, y_ref - x)  # the block's contribution
    blk.cfg.mask_mode = "immediate"
    _report("mpt parts", errs)
    assert max(errs.values()) <= TOL, errs


def test_llama_lm(tmp_root):
    """A LLaMA base LM (OpenFlamingo's deprecated 9B): its untied head is frozen and never saved by
    OpenFlamingo's training code, so the added tokens' head rows are unknown (lmmrt fills them with
    the mean row): compare the base vocabulary's logits."""
    tf = built(tmp_root, "llama", 2)
    model = convert(tf, tmp_root / "out-llama", True)
    got = lmmrt.logits(model, PROMPTS, PIXELS)
    errs = {f"{len(px)}img": U.rel_err(g[:, :U.BASE_VOCAB],
                                       U.reference_logits(tf.model, ids, px, immediate=True)[:, :U.BASE_VOCAB])
            for ids, px, g in zip(PROMPTS, PIXELS, got)}
    _report("llama logits (base vocabulary)", errs)
    assert max(errs.values()) <= TOL, errs
