"""Converters report every problem of a source in one clear error naming the file and the keys:
misshapen tensors feeding a fused weight, a broken sharded index, invalid JSON, unreadable weights,
a missing or broken tokenizer; and they read MPT's FFN width from the weights, as transformers does."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from lmmrt.convert.idefics import idefics_state
from lmmrt.errors import CheckpointError

# the sources here have no tokenizer.json on purpose; the warning about it is tested once below
pytestmark = pytest.mark.filterwarnings("ignore:.*has no tokenizer.json")


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory):
    from idefics_util import tiny_idefics

    model = tiny_idefics(seed=5)
    d = tmp_path_factory.mktemp("hf-src")
    model.save_pretrained(d / "single")
    model.save_pretrained(d / "sharded", max_shard_size="100KB")
    return d


@pytest.fixture
def single(hf_dirs, tmp_path):
    return shutil.copytree(hf_dirs / "single", tmp_path / "single")


@pytest.fixture
def sharded(hf_dirs, tmp_path):
    return shutil.copytree(hf_dirs / "sharded", tmp_path / "sharded")


def _edit_weights(src, edit):
    w = src / "model.safetensors"
    sd = load_file(str(w))
    edit(sd)
    save_file(sd, str(w))


def _state(src):
    return idefics_state(src, progress=False)


def test_every_bad_key_named_in_one_error(single):
    def edit(sd):
        del sd["model.layers.1.mlp.up_proj.weight"]  # missing
        sd["model.layers.0.self_attn.k_proj.weight"] = torch.randn(60, 64)  # q/k/v: 60 rows, not 64
        sd["model.gated_cross_attn_layers.0.mlp.gate_proj.weight"] = torch.randn(112, 60)  # gate/up: 60 cols
        sd["model.vision_model.encoder.layers.0.self_attn.v_proj.bias"] = torch.randn(40)  # 40, not 48

    _edit_weights(single, edit)
    with pytest.raises(CheckpointError) as e, pytest.warns(UserWarning, match="no tokenizer.json"):
        _state(single)
    msg = str(e.value)
    assert "missing keys (1): model.layers.1.mlp.up_proj.weight" in msg
    assert "model.layers.0.self_attn.k_proj.weight (60, 64) <- misshapen" in msg
    assert "model.gated_cross_attn_layers.0.mlp.gate_proj.weight (112, 60) <- misshapen" in msg
    assert "model.vision_model.encoder.layers.0.self_attn.v_proj.bias (40,) <- misshapen" in msg
    # the well-shaped parts are listed beside them, not flagged
    assert "model.layers.0.self_attn.q_proj.weight (64, 64)," in msg
    assert "model.gated_cross_attn_layers.0.mlp.up_proj.weight (112, 64):" in msg


def test_misshapen_fused_part_alone_is_a_clear_error(single):
    """Parts that cannot even be concatenated (different widths) gave a raw RuntimeError from torch.cat."""
    _edit_weights(single, lambda sd: sd.update({"model.layers.2.mlp.gate_proj.weight": torch.randn(112, 32)}))
    with pytest.raises(CheckpointError, match=r"decoder.layers.2.w13.weight needs \(224, 64\): .*"
                                              r"gate_proj.weight \(112, 32\) <- misshapen.*cannot be combined"):
        _state(single)


def test_sharded_index_without_weight_map(sharded):
    (sharded / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": 1}}))
    with pytest.raises(CheckpointError, match="model.safetensors.index.json has no weight_map"):
        _state(sharded)


def test_sharded_index_naming_a_missing_shard(sharded):
    index = json.loads((sharded / "model.safetensors.index.json").read_text())
    shard = sorted(set(index["weight_map"].values()))[-1]
    (sharded / shard).unlink()
    with pytest.raises(FileNotFoundError, match=f"names the shard {shard}, which is not in"):
        _state(sharded)


@pytest.mark.parametrize("text, msg", [("{not json", "is not valid JSON"), ("[1, 2]", "holds list"),
                                       ("null", "holds NoneType")])
def test_source_config_that_is_not_a_json_object_is_named(single, text, msg):
    (single / "config.json").write_text(text)
    with pytest.raises(CheckpointError, match=f"{single / 'config.json'} {msg}"):
        _state(single)


def test_unreadable_weights_say_what_is_wrong(single):
    (single / "model.safetensors").unlink()
    (single / "model.safetensors").mkdir()
    with pytest.raises(CheckpointError, match="model.safetensors.*directory") as e:
        _state(single)
    assert "No such file" not in str(e.value)


def test_no_tokenizer_warns_and_a_broken_one_is_named(single):
    with pytest.warns(UserWarning, match="has no tokenizer.json: the model will take prompts as token ids only"):
        _state(single)
    (single / "tokenizer.json").write_text("garbage")
    with pytest.raises(CheckpointError, match="tokenizer.json is not a valid tokenizer.json"):
        _state(single)


# --- OpenFlamingo sources -------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_mpt(tmp_path_factory):
    pytest.importorskip("einops_exts")
    import openflamingo_util as U

    if not U.have_open_flamingo():
        pytest.skip("open-flamingo 2.0.1 is not installed (make install-test installs it)")
    return U.build(tmp_path_factory.mktemp("of-mpt"), "mpt", 2, vision_format="safetensors")


def test_mpt_ffn_width_from_the_weights(tiny_mpt, tmp_path):
    """transformers' MptMLP builds 4 * d_model whatever expansion_ratio says: a directory whose
    config says 2 holds 4 * d weights and must convert."""
    from lmmrt.convert.openflamingo import convert_openflamingo

    lm_dir = shutil.copytree(tiny_mpt.lm_dir, tmp_path / "lm")
    cfg = json.loads((lm_dir / "config.json").read_text())
    cfg["expansion_ratio"] = 2
    (lm_dir / "config.json").write_text(json.dumps(cfg))
    out = convert_openflamingo(tiny_mpt.checkpoint, lm_dir, tiny_mpt.vision_file, tmp_path / "out", progress=False)
    saved = json.loads((out / "config.json").read_text())
    assert saved["decoder"]["ffn_dim"] == 4 * cfg["d_model"]


def test_every_missing_vision_tensor_named(tiny_mpt, tmp_path):
    from lmmrt.convert.clip import open_vision, vision_config, vision_weight_map

    sd = load_file(str(tiny_mpt.vision_file))
    del sd["visual.transformer.resblocks.0.ln_1.weight"], sd["visual.transformer.resblocks.1.mlp.c_fc.bias"]
    save_file(sd, str(tmp_path / "v.safetensors"))
    src = open_vision(tmp_path / "v.safetensors")
    with pytest.raises(CheckpointError, match=r"missing keys \(2\): transformer.resblocks.0.ln_1.weight, "
                                              r"transformer.resblocks.1.mlp.c_fc.bias"):
        vision_weight_map(src, vision_config(src))


@pytest.mark.parametrize("kind", ["truncated safetensors", "truncated pt", "directory"])
def test_unreadable_openflamingo_checkpoint_is_named(tmp_path, kind):
    from lmmrt.convert.openflamingo import read_openflamingo_checkpoint

    if kind == "directory":
        path = tmp_path / "checkpoint.pt"
        path.mkdir()
    elif kind == "truncated pt":
        path = tmp_path / "checkpoint.pt"
        torch.save({"perceiver.latents": torch.randn(4, 8)}, str(path))
        path.write_bytes(path.read_bytes()[:-16])
    else:
        path = tmp_path / "checkpoint.safetensors"
        save_file({"perceiver.latents": torch.randn(4, 8)}, str(path))
        path.write_bytes(path.read_bytes()[:-16])
    with pytest.raises(CheckpointError, match=f"{path}.*(truncated|directory)") as e:
        read_openflamingo_checkpoint(path)
    assert "holds something other than tensors" not in str(e.value)  # not a pickle problem


def test_misshapen_part_of_a_grouped_query_qkv_is_flagged():
    """With grouped-query heads q, k and v have different rows: the part's share comes from the
    config, so only the bad one is flagged. Shapes are checked before any tensor is read (meta)."""
    import dataclasses

    from lmmrt.convert.common import SourceWeights, convert_state
    from lmmrt.demo import char_tokenizer, demo_config
    from lmmrt.models.flamingo import FlamingoModel

    cfg = demo_config(char_tokenizer().get_vocab_size())
    cfg = dataclasses.replace(cfg, decoder=dataclasses.replace(cfg.decoder, kv_heads=2))
    with torch.device("meta"):
        state = FlamingoModel(cfg).state_dict()
    q_rows, kv_rows, d = 8 * 32, 2 * 32, cfg.decoder.dim
    state = {k: v for k, v in state.items() if k != "decoder.layers.1.wqkv.weight"}
    state.update({"q": torch.empty(q_rows, d, device="meta"), "k": torch.empty(kv_rows + 8, d, device="meta"),
                  "v": torch.empty(kv_rows, d, device="meta")})
    wmap = {k: [k] for k in state if k not in "qkv"}
    wmap["decoder.layers.1.wqkv.weight"] = ["q", "k", "v"]
    with pytest.raises(CheckpointError) as e:
        convert_state(SourceWeights.from_state_dict(state), wmap, cfg, progress=False)
    msg = str(e.value)
    assert f"from q ({q_rows}, {d}), k ({kv_rows + 8}, {d}) <- misshapen, v ({kv_rows}, {d}):" in msg


@pytest.mark.parametrize("kind", ["symlink loop", "file", "missing"])
def test_source_paths_say_what_is_wrong(tmp_path, kind):
    from lmmrt.convert.clip import open_vision
    from lmmrt.convert.hf_lm import read_hf_config
    from lmmrt.convert.openflamingo import read_openflamingo_checkpoint

    src = tmp_path / "src"
    if kind == "symlink loop":
        (tmp_path / "other").symlink_to(src)
        src.symlink_to(tmp_path / "other")
    elif kind == "file":
        src.write_text("x")
    want = {"symlink loop": "src is a symbolic link loop", "file": "src is not a directory",
            "missing": "src does not exist"}[kind]
    for read in (idefics_state, read_hf_config):
        with pytest.raises(OSError, match=want):
            read(src)
    if kind != "file":
        for read in (open_vision, read_openflamingo_checkpoint):
            with pytest.raises(FileNotFoundError, match=want):
                read(src)


def test_cli_prints_a_converter_warning_as_one_lmmrt_line(single, tmp_path, capsys):
    import warnings

    from lmmrt import cli

    with warnings.catch_warnings():
        warnings.simplefilter("always")  # over this module's filter, which silences the warning for the others
        assert cli.main(["convert", "idefics", str(single), str(tmp_path / "out"), "--quiet"]) == 0
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("lmmrt: warning: ") and "has no tokenizer.json" in lines[0], err
    assert "UserWarning" not in err and "warnings.warn" not in err


class _NotATensor:
    pass


@pytest.mark.parametrize("kind", ["truncated zip", "truncated legacy", "pickled object"])
def test_bad_torch_file_is_one_checkpoint_error(tmp_path, kind):
    from lmmrt.convert.common import torch_load_weights_only

    path = tmp_path / "pytorch_model.bin"
    obj = {"w": _NotATensor()} if kind == "pickled object" else {"w": torch.randn(5, 3)}
    torch.save(obj, str(path), _use_new_zipfile_serialization=kind != "truncated legacy")
    if kind != "pickled object":
        path.write_bytes(path.read_bytes()[:-40])
    want = "refuses to unpickle objects" if kind == "pickled object" else "truncated or corrupted torch file"
    with pytest.raises(CheckpointError, match=f"{path}.*{want}") as e:
        torch_load_weights_only(path)
    assert "weights_only=False" not in str(e.value)  # torch's hint to unpickle anyway is not passed on


@pytest.mark.parametrize("dtype", [None, torch.float16])
def test_integer_source_tensor_is_named(single, dtype):
    """Every converter reads through SourceWeights: an integer tensor is refused there, also when dtype=
    would cast it to float (the loader refuses non-float weights, so it must not be converted)."""
    key = "model.layers.1.mlp.up_proj.weight"
    _edit_weights(single, lambda sd: sd.update({key: (sd[key] * 100).to(torch.int8)}))
    with pytest.raises(CheckpointError, match=rf"tensor '{key}' is int8, but lmmrt weights are floating point"):
        idefics_state(single, dtype=dtype, progress=False)
