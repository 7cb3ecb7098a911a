"""`lmmrt convert idefics`: sharded checkpoints, --dtype, the tokenizer and its image token."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from safetensors import safe_open

import lmmrt


@pytest.fixture(scope="module")
def hf(tmp_path_factory):
    from idefics_util import tiny_idefics

    model = tiny_idefics(seed=3, qk_layer_norms=True)
    d = tmp_path_factory.mktemp("hf")
    model.save_pretrained(d / "single")
    model.save_pretrained(d / "sharded", max_shard_size="100KB")
    return d


def _convert(src, out, *extra):
    r = subprocess.run([sys.executable, "-m", "lmmrt", "convert", "idefics", str(src), str(out), *extra],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    return r


def _tensors(path):
    with safe_open(str(path / "model.safetensors"), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


def test_sharded_equals_single_file(hf, tmp_path):
    assert (hf / "sharded" / "model.safetensors.index.json").exists()
    r = _convert(hf / "single", tmp_path / "a")
    assert "converting" in r.stderr and "\r" not in r.stderr  # stderr is a pipe: one plain line, no bar
    _convert(hf / "sharded", tmp_path / "b", "--quiet")
    a, b = _tensors(tmp_path / "a"), _tensors(tmp_path / "b")
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    cfg = json.loads((tmp_path / "a" / "config.json").read_text())
    assert cfg["image_token_id"] == 97  # IDEFICS convention without a tokenizer: the last extra token


def test_dtype_option(hf, tmp_path):
    _convert(hf / "single", tmp_path / "bf16", "--dtype", "bfloat16", "--quiet")
    assert {t.dtype for t in _tensors(tmp_path / "bf16").values()} == {torch.bfloat16}
    m = lmmrt.load(tmp_path / "bf16", device="cpu")
    assert m.dtype == torch.bfloat16


def test_tokenizer_sets_image_token_and_template(hf, tmp_path):
    from tokenizers import Tokenizer, models

    src = tmp_path / "withtok"
    src.mkdir()
    for f in (hf / "single").iterdir():
        (src / f.name).write_bytes(f.read_bytes())
    vocab = {f"t{i}": i for i in range(90)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="t0"))
    tok.add_special_tokens(["<fake_token_around_image>", "<image>"])  # ids 90, 91
    tok.save(str(src / "tokenizer.json"))
    _convert(src, tmp_path / "out", "--quiet")
    cfg = json.loads((tmp_path / "out" / "config.json").read_text())
    assert cfg["image_token_id"] == 91
    assert cfg["image_prompt_template"] == "<fake_token_around_image>{image}<fake_token_around_image>"
    assert (tmp_path / "out" / "tokenizer.json").exists()
    m = lmmrt.load(tmp_path / "out", device="cpu")
    assert m.tokenizer is not None and m.tokenizer.token_to_id("<image>") == 91


def test_image_token_id_option(hf, tmp_path):
    _convert(hf / "single", tmp_path / "o", "--image-token-id", "96", "--quiet")
    assert json.loads((tmp_path / "o" / "config.json").read_text())["image_token_id"] == 96


def test_not_an_idefics_dir(tmp_path):
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "config.json").write_text(json.dumps({"model_type": "llama"}))
    r = subprocess.run([sys.executable, "-m", "lmmrt", "convert", "idefics", str(tmp_path / "src"), str(tmp_path / "o")],
                       capture_output=True, text=True)
    assert r.returncode == 2 and "model_type is 'llama', expected 'idefics'" in r.stderr


@pytest.mark.filterwarnings("ignore:.*has no tokenizer.json")  # its tiny model has no tokenizer.json, on purpose
def test_load_transformers_dir_directly(hf, tmp_path):
    """lmmrt.load on a transformers IDEFICS directory converts in memory: same logits as converting first."""
    _convert(hf / "sharded", tmp_path / "c", "--quiet")
    a = lmmrt.load(tmp_path / "c", device="cpu", backend="torch")
    b = lmmrt.load(hf / "sharded", device="cpu", backend="torch")
    ids = [1, 5, 97, 6, 7]
    px = [torch.randn(3, 28, 28, generator=torch.Generator().manual_seed(0))]
    assert torch.equal(lmmrt.logits(a, [ids], [px])[0], lmmrt.logits(b, [ids], [px])[0])
