"""A broken checkpoint is one clear CheckpointError naming the file and the field or keys, found
before anything is built: config.json fields (type, sign, range, enums, token ids), config.json
against the tensors in the file, non-float and mixed-dtype weights, unreadable files and links,
and tokenizer.json (issue 11)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
import warnings

import pytest
import torch
from safetensors.torch import load_file, save_file

import lmmrt
from lmmrt.demo import save_demo
from lmmrt.errors import CheckpointError, ConfigError


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return save_demo(tmp_path_factory.mktemp("demo") / "ckpt")


@pytest.fixture(scope="module")
def ckpt_config(ckpt):
    return json.loads((ckpt / "config.json").read_text())


def _copy(ckpt, dst, *, config=None, weights=None, tokenizer: bytes | None = None):
    """A checkpoint directory like `ckpt`, with config.json, the weights or tokenizer.json replaced
    (unchanged files are links to the originals)."""
    dst.mkdir()
    if config is None:
        (dst / "config.json").write_bytes((ckpt / "config.json").read_bytes())
    else:
        (dst / "config.json").write_text(config if isinstance(config, str) else json.dumps(config))
    if weights is None:
        (dst / "model.safetensors").symlink_to(ckpt / "model.safetensors")
    else:
        save_file(weights, str(dst / "model.safetensors"))
    if tokenizer is None:
        (dst / "tokenizer.json").symlink_to(ckpt / "tokenizer.json")
    else:
        (dst / "tokenizer.json").write_bytes(tokenizer)
    return dst


def _load(path):
    return lmmrt.load(path, device="cpu", backend="torch")


def _with(cfg: dict, field: str, value) -> dict:
    cfg = json.loads(json.dumps(cfg))
    *parents, leaf = field.split(".")
    d = cfg
    for p in parents:
        d = d[p]
    d[leaf] = value
    return cfg


# (field, bad value, what the message says); demo: vocab 101, decoder 6 layers of dim 256, 8 heads
BAD_FIELDS = [
    ("vision.patch_size", 0, r"vision\.patch_size = 0: must be between 1 and"),
    ("vision.image_size", 100, r"vision\.image_size = 100 is not a multiple of vision\.patch_size = 14"),
    ("vision.width", -192, r"vision\.width = -192: must be between 1"),
    ("vision.heads", 5, r"vision\.heads = 5 does not divide vision\.width = 192"),
    ("vision.act", "swish", r"vision\.act = 'swish': must be one of gelu"),
    ("vision.output", "cls", r"vision\.output = 'cls': must be one of all_tokens, patch_tokens"),
    ("vision.resize", "stretch", r"vision\.resize = 'stretch': must be one of resize, resize_crop"),
    ("vision.image_std", [0.2, 0.0, 0.3], r"vision\.image_std\[1\] = 0\.0: must be > 0"),
    ("vision.image_std", [0.2, -0.1, 0.3], r"vision\.image_std\[1\] = -0\.1: must be > 0"),
    ("vision.image_mean", [0.5, 0.5], r"vision\.image_mean = \[0\.5, 0\.5\]: must be three numbers"),
    ("perceiver.n_latents", -64, r"perceiver\.n_latents = -64"),
    ("perceiver.mlp_act", "tanh", r"perceiver\.mlp_act = 'tanh': must be one of"),
    ("decoder.family", "gpt2", r"decoder\.family = 'gpt2': must be one of llama, mpt, neox"),
    ("decoder.dim", -256, r"decoder\.dim = -256: must be between 1"),
    ("decoder.layers", 6.0, r"decoder\.layers = 6\.0: must be an integer \(got float\)"),
    ("decoder.layers", "6", r"decoder\.layers = '6': must be an integer \(got str\)"),
    ("decoder.layers", True, r"decoder\.layers = True: must be an integer \(got bool\)"),
    ("decoder.vocab_size", 10**12, r"decoder\.vocab_size = 1000000000000: must be between 1 and"),
    ("decoder.max_seq_len", 10**9, r"decoder\.max_seq_len = 1000000000: must be between 1 and"),
    ("decoder.heads", 7, r"decoder\.heads = 7 must be a multiple of decoder\.kv_heads = 8"),
    ("decoder.norm_eps", math.nan, r"decoder\.norm_eps = nan: must be a finite number"),
    ("decoder.rope_theta", math.inf, r"decoder\.rope_theta = inf: must be a finite number"),
    ("decoder.norm_eps", 0, r"decoder\.norm_eps = 0\.0: must be > 0"),
    ("decoder.act", "swiglu", r"decoder\.act = 'swiglu': must be one of"),
    ("decoder.tie_embeddings", "false", r"decoder\.tie_embeddings = 'false': must be true or false"),
    ("decoder.rotary_pct", 1.5, r"decoder\.rotary_pct = 1\.5: must be <= 1"),
    ("xattn.mask_mode", "sometimes", r"xattn\.mask_mode = 'sometimes': must be one of cumulative, immediate"),
    ("xattn.style", "blip", r"xattn\.style = 'blip': must be one of idefics, mllama, openflamingo"),
    ("xattn.gate_type", "matrix", r"xattn\.gate_type = 'matrix': must be one of float, vector"),
    ("xattn.qk_norm", "true", r"xattn\.qk_norm = 'true': must be true or false"),
    ("xattn.layers", [0, 4, 2], r"xattn\.layers = \[0, 4, 2\]: must be strictly increasing"),
    ("xattn.layers", [0, 2, 40], r"xattn\.layers = \[0, 2, 40\]: layers \[40\] are past the last decoder layer"),
    ("xattn.media_dim", 100, r"xattn\.media_dim = 100 differs from perceiver\.dim = 192"),
    ("family", "gpt", r"family = 'gpt': must be one of blip2, idefics, llava, minigpt4, mllama, openflamingo"),
    ("family", "llava", r"media_feed = 'cross_attention', but family 'llava' models are 'splice' models"),
    ("media_feed", "prefix", r"media_feed = 'prefix': must be one of cross_attention, splice"),
    ("connector", {"kind": "mlp"}, r"connector: cross-attention models take their connector from the perceiver"),
    ("vision.feature_layers", [7], r"vision\.feature_layers\[0\] = 7: must be between"),
    ("pad_token_id", 101, r"pad_token_id = 101: must be between 0 and 100"),
    ("pad_token_id", -1, r"pad_token_id = -1: must be between 0 and 100"),
    ("image_token_id", 10**9, r"image_token_id = 1000000000: must be between 0 and 100"),
    ("image_token_id", None, r"image_token_id = None: must be an integer"),
    ("eos_token_id", 2.0, r"eos_token_id = 2\.0: must be an integer"),
    ("bos_token_id", "1", r"bos_token_id = '1': must be an integer"),
    ("stop_token_ids", [5000], r"stop_token_ids\[0\] = 5000: must be between 0 and 100"),
    ("stop_token_ids", "44", r"stop_token_ids = '44': must be a list of integers"),
    ("reset_media_after_eos", "yes", r"reset_media_after_eos = 'yes': must be true or false"),
    ("image_prompt_template", "<fake_token_around_image>", r"image_prompt_template = .*must contain \"\{image\}\""),
    ("image_token", "", r"image_token: must not be empty"),
    ("format_version", "1", r"format_version = '1': must be an integer"),
    ("vision", [1], r"vision: must be a JSON object, not list"),
]


@pytest.mark.parametrize("field,value,msg", BAD_FIELDS, ids=[f"{f}={v!r}"[:40] for f, v, _ in BAD_FIELDS])
def test_bad_config_field_is_named(ckpt, ckpt_config, tmp_path, field, value, msg):
    bad = _copy(ckpt, tmp_path / "bad", config=_with(ckpt_config, field, value))
    with pytest.raises(ConfigError, match=r"bad/config\.json: " + msg):
        _load(bad)


@pytest.mark.parametrize("text", ["[]", "null", "3", '"config"'])
def test_config_json_that_is_not_an_object(ckpt, tmp_path, text):
    bad = _copy(ckpt, tmp_path / "bad", config=text)
    with pytest.raises(CheckpointError, match=r"bad/config\.json: must hold a JSON object of config fields"):
        _load(bad)


def test_derived_head_dim_needs_heads_to_divide_dim(ckpt, ckpt_config, tmp_path):
    cfg = _with(_with(_with(ckpt_config, "decoder.heads", 7), "decoder.kv_heads", 0), "decoder.head_dim", 0)
    with pytest.raises(ConfigError, match=r"decoder\.heads = 7 does not divide decoder\.dim = 256"):
        _load(_copy(ckpt, tmp_path / "bad", config=cfg))


def test_absurd_layer_count_fails_at_once(ckpt, ckpt_config, tmp_path):
    """10^6 layers is refused by range; 1000 (in range) by the weights, which hold 6 - before the
    model is built either way."""
    t0 = time.perf_counter()
    with pytest.raises(ConfigError, match=r"decoder\.layers = 1000000: must be between 1 and 1024"):
        _load(_copy(ckpt, tmp_path / "a", config=_with(ckpt_config, "decoder.layers", 10**6)))
    with pytest.raises(CheckpointError, match=r"decoder\.layers = 1000, but the weights hold 6 \(decoder\.layers\.\{i\}"):
        _load(_copy(ckpt, tmp_path / "b", config=_with(ckpt_config, "decoder.layers", 1000)))
    assert time.perf_counter() - t0 < 10


@pytest.mark.parametrize("field,value,msg", [
    ("vision.layers", 4, r"vision\.layers = 4, but the weights hold 3"),
    ("perceiver.depth", 1, r"perceiver\.depth = 1, but the weights hold 2"),
    ("decoder.vocab_size", 120, r"\(decoder\.vocab_size, decoder\.dim\) = \(120, 256\), but decoder\.embed\.weight has shape \(101, 256\)"),
    ("vision.patch_size", 16, r"vision\.patch_size\) = \(192, 3, 16, 16\), but vision\.patch_embed\.weight has shape \(192, 3, 14, 14\)"),
    ("perceiver", None, r"no perceiver section, but the weights hold perceiver\.\* tensors"),
])
def test_config_against_the_tensors_in_the_file(ckpt, ckpt_config, tmp_path, field, value, msg):
    cfg = _with(ckpt_config, field, value)
    if field == "perceiver":
        cfg = _with(cfg, "xattn.media_dim", 192)
    with pytest.raises(CheckpointError, match=msg):
        _load(_copy(ckpt, tmp_path / "bad", config=cfg))


def test_integer_and_bool_weights_are_refused(ckpt, tmp_path):
    sd = load_file(str(ckpt / "model.safetensors"))
    ints = {k: (v * 100).to(torch.int32) for k, v in sd.items()}
    with pytest.raises(CheckpointError, match=r"weights must be floating point.*I32 \(\d+\): decoder\.embed\.weight"):
        _load(_copy(ckpt, tmp_path / "ints", weights=ints))
    one_bool = dict(sd, **{"xattn.0.attn_gate": sd["xattn.0.attn_gate"] > 0})
    with pytest.raises(CheckpointError, match=r"these are not: BOOL \(1\): xattn\.0\.attn_gate$"):
        _load(_copy(ckpt, tmp_path / "bool", weights=one_bool))


def test_mixed_float_dtypes_warn_and_load_in_the_majority_dtype(ckpt, tmp_path):
    sd = load_file(str(ckpt / "model.safetensors"))
    mixed = dict(sd, **{"decoder.layers.1.wo.weight": sd["decoder.layers.1.wo.weight"].half()})
    with pytest.warns(UserWarning, match=r"mixes float dtypes.*loading as torch\.float32.*decoder\.layers\.1\.wo\.weight"):
        m = _load(_copy(ckpt, tmp_path / "mostly32", weights=mixed))
    assert m.dtype == torch.float32
    w = m.module.decoder.layers[1].wo.weight
    assert w.dtype == torch.float32 and torch.equal(w, mixed["decoder.layers.1.wo.weight"].float())
    # most elements float16: float16, the float32 keys named
    mostly16 = {k: (v if k == "decoder.norm.weight" else v.half()) for k, v in sd.items()}
    with pytest.warns(UserWarning, match=r"loading as torch\.float16.*\(1\): decoder\.norm\.weight"):
        m = _load(_copy(ckpt, tmp_path / "mostly16", weights=mostly16))
    assert m.dtype == torch.float16 and m.module.decoder.norm.weight.dtype == torch.float16


def test_one_float_dtype_loads_without_warning_and_exactly(ckpt):
    sd = load_file(str(ckpt / "model.safetensors"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        m = lmmrt.load(ckpt, device="cpu", dtype="float16", backend="torch")
    assert torch.equal(m.module.decoder.embed.weight, sd["decoder.embed.weight"].half())
    assert all(p.dtype == torch.float16 and not p.requires_grad for p in m.module.parameters())


def test_unreadable_weights_say_why(ckpt, tmp_path):
    bad = _copy(ckpt, tmp_path / "dir")
    (bad / "model.safetensors").unlink()
    (bad / "model.safetensors").mkdir()
    with pytest.raises(CheckpointError, match=r"cannot read .*dir/model\.safetensors: Is a directory"):
        _load(bad)
    broken = _copy(ckpt, tmp_path / "broken")
    (broken / "model.safetensors").unlink()
    (broken / "model.safetensors").symlink_to(tmp_path / "gone.safetensors")
    with pytest.raises(FileNotFoundError, match=r"model\.safetensors is a broken symbolic link \(to .*gone"):
        _load(broken)


def test_symlink_loops_are_named(ckpt, tmp_path):
    (tmp_path / "loop").symlink_to(tmp_path / "loop")
    with pytest.raises(FileNotFoundError, match=r"loop is a symbolic link loop"):
        _load(tmp_path / "loop")
    bad = _copy(ckpt, tmp_path / "cfgloop")
    (bad / "config.json").unlink()
    (bad / "config.json").symlink_to(bad / "config.json")
    with pytest.raises(FileNotFoundError, match=r"cfgloop/config\.json is a symbolic link loop"):
        _load(bad)
    tok = _copy(ckpt, tmp_path / "tokloop")
    (tok / "tokenizer.json").unlink()
    (tok / "tokenizer.json").symlink_to(tok / "tokenizer.json")
    with pytest.raises(CheckpointError, match=r"tokloop/tokenizer\.json is a symbolic link loop"):
        _load(tok)


@pytest.mark.parametrize("content,msg", [
    (b"{not a tokenizer", r"is not a valid tokenizer\.json"),
    (b"", r"is empty"),
    (b'{"version": "1.0", "model": {"type": "Nope"}}', r"is not a valid tokenizer\.json"),
    (b"\xff\xfe\x00garbage", r"is not a valid tokenizer\.json"),
])
def test_broken_tokenizer_json_is_named(ckpt, tmp_path, content, msg):
    bad = _copy(ckpt, tmp_path / "tok", tokenizer=content)
    with pytest.raises(CheckpointError, match=r"tok/tokenizer\.json " + msg):
        _load(bad)


def test_tokenizer_json_directory(ckpt, tmp_path):
    bad = _copy(ckpt, tmp_path / "tokdir")
    (bad / "tokenizer.json").unlink()
    (bad / "tokenizer.json").mkdir()
    with pytest.raises(CheckpointError, match=r"tokdir/tokenizer\.json is a directory, not a tokenizer\.json file"):
        _load(bad)


def test_cli_reports_a_broken_checkpoint_in_one_line(ckpt, ckpt_config, tmp_path):
    bad = _copy(ckpt, tmp_path / "cli", config=_with(ckpt_config, "vision.patch_size", 0), tokenizer=b"garbage")

    def first_error_line():
        r = subprocess.run([sys.executable, "-m", "lmmrt", "generate", str(bad), "-p", "hi", "--device", "cpu",
                            "--max-new-tokens", "1"], capture_output=True, text=True,
                           env=dict(os.environ, LMMRT_TRACEBACK=""), timeout=120)
        assert r.returncode != 0 and "Traceback" not in r.stderr, r.stderr
        return r.stderr.splitlines()[0]

    line = first_error_line()
    assert line.startswith("lmmrt: error:") and "cli/tokenizer.json is not a valid tokenizer.json" in line
    (bad / "tokenizer.json").unlink()
    (bad / "tokenizer.json").symlink_to(ckpt / "tokenizer.json")
    line = first_error_line()
    assert line.startswith("lmmrt: error:") and "cli/config.json: vision.patch_size = 0" in line


def test_a_tensor_the_checkpoint_cannot_hold_is_not_left_unallocated(ckpt, monkeypatch):
    """A non-persistent buffer is in no checkpoint: the loader must not hand out a model with it
    still on the meta device (no storage); today no module has one, so the loader says so."""
    from lmmrt.models.flamingo import FlamingoModel

    init = FlamingoModel.__init__

    def with_buffer(self, cfg):
        init(self, cfg)
        self.register_buffer("scratch", torch.zeros(3), persistent=False)

    monkeypatch.setattr(FlamingoModel, "__init__", with_buffer)
    with pytest.raises(RuntimeError, match=r"cannot initialise \['scratch'\]"):
        _load(ckpt)
