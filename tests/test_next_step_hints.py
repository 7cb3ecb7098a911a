"""Errors that tell a user what to do next name the command to run, spelled for where they were made: a
transformers directory names its `lmmrt convert FORMAT` command, and a tensor-parallel size that does not
match the process group names `--tp N` on the command line (tp=N in Python)."""

from __future__ import annotations

import json
import shlex

import pytest
import torch
import torch.distributed as dist
from cli_util import assert_one_error_line

import lmmrt
from lmmrt.cli import CONVERTERS, build_parser, main
from lmmrt.errors import CheckpointError
from lmmrt.parallel import TensorParallel, TensorParallelError
from lmmrt.parallel.load import load_shard
from lmmrt.runtime.weights import CONVERT_FORMATS


def transformers_dir(root, model_type: str):
    d = root / f"hf {model_type}"  # a space: the command in the message must stay one argument
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"model_type": model_type}))
    return d


@pytest.mark.parametrize("model_type, fmt", [("mllama", "mllama"), ("llava", "llava"), ("blip-2", "blip2"),
                                             ("clip", "clip")])
def test_a_transformers_directory_names_its_convert_command(tmp_path, model_type, fmt, capsys):
    src = transformers_dir(tmp_path, model_type)
    command = f"lmmrt convert {fmt} {shlex.quote(str(src))} OUT"
    with pytest.raises(CheckpointError) as e:
        lmmrt.load(src, device="cpu")
    assert f"model_type={model_type!r}" in str(e.value) and f"(`{command}`)" in str(e.value), e.value
    assert main(["generate", str(src), "-p", "x", "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert_one_error_line(err)
    assert f"(`{command}`)" in err, err


def test_a_transformers_directory_of_another_model_points_at_the_formats(tmp_path):
    with pytest.raises(CheckpointError, match=r"model_type='mpt'.*`lmmrt convert --help` lists the formats"):
        lmmrt.load(transformers_dir(tmp_path, "mpt"), device="cpu")


def test_tensor_parallelism_names_the_convert_command_even_for_idefics(tmp_path):
    src = transformers_dir(tmp_path, "idefics")  # converted in memory by a single-process load, not by tp
    with pytest.raises(TensorParallelError, match=r"`lmmrt convert idefics .* OUT`.*lmmrt checkpoints only"):
        load_shard(src, TensorParallel(rank=0, size=2), device=torch.device("cpu"))


@pytest.mark.parametrize("fmt", sorted(set(CONVERT_FORMATS.values())))
def test_each_named_convert_command_is_one_the_parser_takes(fmt):
    assert fmt in CONVERTERS
    args = build_parser().parse_args(["convert", fmt, "SRC", "OUT"])
    assert (args.src, args.out) == ("SRC", "OUT")


@pytest.fixture
def one_rank_group():
    """A process group of one gloo rank, as a caller that initialised torch.distributed has."""
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def test_a_tp_size_unlike_the_group_names_tp_in_python_and_the_option_on_the_command_line(
        one_rank_group, tmp_path, capsys):
    with pytest.raises(TensorParallelError, match=r"start 2 processes, or pass tp=1 \(--tp 1\)"):
        lmmrt.load(tmp_path, device="cpu", tp=2)
    assert main(["generate", str(tmp_path), "-p", "x", "--device", "cpu", "--tp", "2"]) == 2
    err = capsys.readouterr().err
    assert_one_error_line(err)
    assert "(start 2 processes, or pass --tp 1)" in err, err
