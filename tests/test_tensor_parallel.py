"""Tensor parallelism (lmmrt.parallel) on the CPU with gloo: two ranks, each a process started here with
torchrun's environment (tests/tensor_parallel_worker.py), against the single-process model on the same
checkpoints: tiny IDEFICS (vector gates, q/k norms), OpenFlamingo MPT (6 heads: ALiBi slopes of a non-power
of two, a vocabulary of 93 split unevenly, tied embeddings), OpenFlamingo NeoX (biases, parallel residual,
partial rotary), the splice families LLaVA (LLaMA with grouped K/V heads) and BLIP-2 (OPT), and Mllama
(grouped K/V heads in its cross-attention too, an LM head 8 rows shorter than its embedding). One launch runs every model and both error cases, with a time limit so nothing hangs."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import lmmrt
from lmmrt.cli import main as cli
from lmmrt.parallel import TensorParallel, TensorParallelError, join_group
from lmmrt.parallel.layers import vocab_range
from lmmrt.parallel.plan import rank_config, shard_of

# the tiny models here are saved without tokenizer.json on purpose: the warning users get for that is expected
pytestmark = pytest.mark.filterwarnings("ignore:.*has no tokenizer.json")

pytest.importorskip("transformers")
TESTS = Path(__file__).parent
LAUNCH_TIMEOUT = 300  # seconds for a whole two-process run (about 20 s on a 2-core box)
NEW_TOKENS = 8
RTOL = 1e-5


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(argv: list[str], size: int = 2, *, env_extra: dict | None = None) -> list[subprocess.CompletedProcess]:
    """`size` processes of argv with torchrun's variables, each its RANK; killed after LAUNCH_TIMEOUT."""
    port = str(free_port())
    procs = []
    for rank in range(size):
        env = dict(os.environ, RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(size), LOCAL_WORLD_SIZE=str(size),
                   MASTER_ADDR="127.0.0.1", MASTER_PORT=port, OMP_NUM_THREADS="1", **(env_extra or {}))
        procs.append(subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    done = []
    try:
        for p in procs:
            out, err = p.communicate(timeout=LAUNCH_TIMEOUT)
            done.append(subprocess.CompletedProcess(argv, p.returncode, out, err))
    except subprocess.TimeoutExpired:
        for p in procs:
            p.kill()
        pytest.fail(f"tensor-parallel run did not finish in {LAUNCH_TIMEOUT} s (a hang): {argv}")
    return done


# --- checkpoints ---------------------------------------------------------------------------------
def idefics_checkpoint(root: Path) -> Path:
    from idefics_util import tiny_idefics

    hf = tiny_idefics(seed=3, qk_layer_norms=True, alpha_type="vector")
    hf.save_pretrained(root / "idefics-hf")
    assert cli(["convert", "idefics", str(root / "idefics-hf"), str(root / "idefics"), "--quiet"]) == 0
    return root / "idefics"


def openflamingo_checkpoint(root: Path, family: str) -> Path:
    import openflamingo_util as U

    tf = U.build(root, family, every_n=2)
    out = root / f"openflamingo-{family}"
    assert cli(["convert", "openflamingo", "--checkpoint", str(tf.checkpoint), "--lm", str(tf.lm_dir),
                "--vision", str(tf.vision_file), str(out), "--quiet"]) == 0
    return out


def splice_checkpoint(root: Path, family: str) -> Path:
    if family == "llava":
        from llava_util import tiny_llava

        from lmmrt.convert.llava import convert_llava as convert
        hf = tiny_llava(seed=4)
    else:
        from blip2_util import tiny_blip2

        from lmmrt.convert.blip2 import convert_blip2 as convert
        hf = tiny_blip2(seed=5)
    hf.save_pretrained(root / f"{family}-hf")
    return convert(root / f"{family}-hf", root / family, progress=False)


def mllama_checkpoint(root: Path) -> Path:
    from mllama_util import tiny_mllama

    tiny_mllama(seed=6).save_pretrained(root / "mllama-hf")
    assert cli(["convert", "mllama", str(root / "mllama-hf"), str(root / "mllama"), "--quiet"]) == 0
    return root / "mllama"


def odd_kv_heads_checkpoint(root: Path) -> Path:
    """A random IDEFICS-style model with 6 heads in 3 K/V groups: tp=2 divides the heads, not the groups."""
    import dataclasses

    from lmmrt.demo import demo_config
    from lmmrt.models.random_init import random_model
    from lmmrt.runtime.checkpoint_writer import save_checkpoint

    cfg = demo_config(120)
    cfg = dataclasses.replace(cfg, decoder=dataclasses.replace(cfg.decoder, layers=2, heads=6, kv_heads=3, head_dim=32),
                              xattn=dataclasses.replace(cfg.xattn, layers=[1]))
    return save_checkpoint(root / "odd-kv-heads", cfg, random_model(cfg, seed=5).state_dict())


def small_checkpoint(root: Path, name: str, seed: int) -> Path:
    """A random two-layer IDEFICS-style model (the demo's shapes otherwise)."""
    import dataclasses

    from lmmrt.demo import demo_config
    from lmmrt.models.random_init import random_model
    from lmmrt.runtime.checkpoint_writer import save_checkpoint

    cfg = demo_config(120)
    cfg = dataclasses.replace(cfg, decoder=dataclasses.replace(cfg.decoder, layers=2),
                              xattn=dataclasses.replace(cfg.xattn, layers=[1]))
    return save_checkpoint(root / name, cfg, random_model(cfg, seed=seed).state_dict())


def pixels(n: int, size: int, seed: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(3, size, size, generator=g) for _ in range(n)]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """Checkpoints, their single-process results, and what each of two ranks computed from them."""
    root = tmp_path_factory.mktemp("tp")
    i = 97  # the tiny IDEFICS image token
    models = {"idefics": {"path": idefics_checkpoint(root),
                          "prompts": [[1, 4, i, 7, 8, i, 9, 10], [1, 5, 6, 2, 11, 12, 13]],
                          "images": [pixels(2, 28, 1), []]}}
    import openflamingo_util as U

    if U.have_open_flamingo():
        for family in ("mpt", "neox"):
            models[f"openflamingo-{family}"] = {
                "path": openflamingo_checkpoint(root, family),
                "prompts": [[3, 4, U.IMAGE_ID, 10, 11, U.EOC_ID, U.IMAGE_ID, 14, 15], [5, 6, 7, 8, 9]],
                "images": [U.random_pixels(2, seed=2), []]}
    from blip2_util import IMAGE_TOKEN_ID as BLIP2_IMAGE
    from llava_util import IMAGE_ID as LLAVA_IMAGE

    models["llava"] = {"path": splice_checkpoint(root, "llava"), "images": [pixels(2, 28, 6), []],
                       "prompts": [[1, 5, LLAVA_IMAGE, 7, 8, LLAVA_IMAGE, 9], [1, 6, 12, 13]]}
    models["blip2"] = {"path": splice_checkpoint(root, "blip2"), "images": [pixels(1, 28, 7), []],
                       "prompts": [[BLIP2_IMAGE, 2, 10, 11, 12], [2, 30, 31, 32, 33]]}
    from mllama_util import BOS
    from mllama_util import IMAGE_ID as MLLAMA_IMAGE

    rng = np.random.default_rng(8)
    models["mllama"] = {"path": mllama_checkpoint(root),
                        "prompts": [[BOS, 5, 6, MLLAMA_IMAGE, 7, 8, 9], [MLLAMA_IMAGE, BOS, 13, MLLAMA_IMAGE, 15]],
                        "images": [[(rng.random((20, 50, 3)) * 255).astype(np.uint8)],
                                   [(rng.random((h, w, 3)) * 255).astype(np.uint8) for h, w in ((45, 19), (33, 30))]]}
    for spec in models.values():
        spec["new_tokens"] = NEW_TOKENS
    models["odd-kv-heads"] = {"path": odd_kv_heads_checkpoint(root)}
    # rank 1 is given a directory that does not exist, as when a node lacks the checkpoint
    models["rank1-missing"] = {"path": models["idefics"]["path"], "path_on_rank": {1: root / "not-there"}}
    out = root / "out"
    out.mkdir()
    torch.save({"out": str(out), "models": models}, root / "job.pt")
    procs = launch([sys.executable, str(TESTS / "tensor_parallel_worker.py"), str(root / "job.pt")])
    for p in procs:
        assert p.returncode == 0, p.stderr[-4000:]
    ranks = [torch.load(out / f"rank{r}.pt") for r in range(2)]
    return models, ranks


def single_process(spec: dict) -> tuple[lmmrt.Model, list[torch.Tensor], list[list[int]]]:
    model = lmmrt.load(spec["path"], device="cpu", backend="torch")
    logits = lmmrt.logits(model, spec["prompts"], spec["images"])
    outs = lmmrt.generate(model, spec["prompts"], spec["images"], max_new_tokens=NEW_TOKENS, ignore_eos=True)
    return model, logits, [o.token_ids for o in outs]


@pytest.mark.parametrize("name", ["idefics", "openflamingo-mpt", "openflamingo-neox", "llava", "blip2", "mllama"])
def test_two_ranks_give_the_single_process_logits_and_tokens(run, name):
    models, ranks = run
    if name not in models:
        pytest.skip("open-flamingo 2.0.1 is not installed")
    model, ref_logits, ref_tokens = single_process(models[name])
    for rank, results in enumerate(ranks):
        got = results[name]
        assert "error" not in got, got.get("error")
        assert got["config_heads"] == model.config.decoder.heads // 2
        for a, b in zip(got["logits"], ref_logits):
            assert a.shape == b.shape
            err = float((a - b).abs().max() / b.abs().max())
            assert err <= RTOL, f"rank {rank}: logits rel err {err:.2e}"
        assert got["tokens"] == ref_tokens, f"rank {rank}"
        assert got["fixed_step_tokens"] == ref_tokens, f"rank {rank} (fixed-shape decode step)"
        assert got["sampled_tokens"] == ranks[0][name]["sampled_tokens"], f"rank {rank} sampled other tokens"
        assert got["save_error"][0] == "TensorParallelError"
    assert ranks[0][name]["sampled_tokens"] != ref_tokens  # sampling did sample

    # each rank holds half of the sharded weights (a vocabulary of odd size: one row apart) and all the rest
    tp = TensorParallel(rank=0, size=2)
    whole = {"sharded": 0, "replicated": 0}
    for key, p in model.module.named_parameters():
        whole["sharded" if shard_of(key, model.config, tp) is not None else "replicated"] += p.numel() * p.element_size()
    per_rank = [results[name]["bytes"] for results in ranks]
    print(f"{name}: parameter bytes whole {whole}, per rank {per_rank}")
    assert sum(b["sharded"] for b in per_rank) == whole["sharded"]
    for b in per_rank:
        assert abs(b["sharded"] - whole["sharded"] / 2) <= 0.01 * whole["sharded"]
        assert b["replicated"] == whole["replicated"]


def test_a_head_count_the_size_does_not_divide_fails_on_every_rank(run):
    _, ranks = run
    for results in ranks:
        kind, message = results["odd-kv-heads"]["error"]
        assert kind == "TensorParallelError"
        assert "tp=2 does not divide decoder.kv_heads = 3" in message


def test_a_rank_that_fails_to_load_makes_every_rank_fail_with_its_error(run):
    _, ranks = run
    kind1, message1 = ranks[1]["rank1-missing"]["error"]
    assert kind1 == "FileNotFoundError" and "not-there" in message1
    kind0, message0 = ranks[0]["rank1-missing"]["error"]
    assert kind0 == "FileNotFoundError"
    assert message0 == f"rank 1 of 2 failed while loading: {message1}"


@pytest.fixture(scope="module")
def lifecycle(tmp_path_factory):
    """What each of two ranks saw in tests/tensor_parallel_lifecycle_worker.py (lmmrt starts the group)."""
    root = tmp_path_factory.mktemp("tp-lifecycle")
    job = {"out": str(root), "path": small_checkpoint(root, "a", seed=1), "other_path": small_checkpoint(root, "b", seed=2)}
    torch.save(job, root / "job.pt")
    procs = launch([sys.executable, str(TESTS / "tensor_parallel_lifecycle_worker.py"), str(root / "job.pt")])
    # each step's outcome is saved as soon as known: a rank that aborted leaves the steps it reached
    files = [root / f"lifecycle-rank{r}.pt" for r in range(2)]
    return [torch.load(f) if f.exists() else {} for f in files], procs


def test_lifecycle_ranks_exit_cleanly_with_a_model_still_held(lifecycle):
    for p in lifecycle[1]:
        assert p.returncode == 0, p.stderr[-4000:]
        assert "terminate called" not in p.stderr, p.stderr[-4000:]


@pytest.mark.parametrize("step", ["other_prompt", "other_length", "other_seed", "other_max_new_tokens",
                                  "other_logits"])
def test_ranks_given_different_inputs_fail_on_every_rank_naming_the_rank(lifecycle, step):
    lifecycle = lifecycle[0]
    for results in lifecycle:
        kind, message = results[step]
        assert kind == "TensorParallelError", (kind, message)
        assert "rank 1 of 2 passed other inputs than rank 0" in message
    for results in lifecycle:  # and the group still works
        assert results["after_mismatch"] == lifecycle[0]["a"]
        assert results["after_mismatch"][0] == "ok"


def test_leave_group_releases_one_model_and_the_last_ends_the_group(lifecycle):
    lifecycle = lifecycle[0]
    for results in lifecycle:
        assert results["a"][0] == "ok"
        assert results["b_after_leave_a"] == results["a"]  # b shares a's weights: the same tokens
        assert results["b_after_second_leave_a"] == results["a"]
        kind, message = results["a_after_leave_a"]
        assert kind == "TensorParallelError" and "released with leave_group" in message
        assert results["group_ended"] == ("ok", False)


def test_loading_again_after_the_last_leave_group_starts_a_fresh_group(lifecycle):
    lifecycle = lifecycle[0]
    for results in lifecycle:
        for i in range(3):
            assert results[f"reload{i}"] == results["a"]


def test_ranks_loading_different_checkpoints_fail_on_every_rank(lifecycle):
    lifecycle = lifecycle[0]
    for results in lifecycle:
        kind, message = results["other_checkpoint"]
        assert kind == "TensorParallelError", (kind, message)
        assert "rank 1 of 2 loaded another checkpoint than rank 0" in message
        assert results["group_ended_after_failed_load"] == ("ok", False)


def test_a_group_of_one_rank_is_named_in_the_singular():
    import torch.distributed as dist

    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        with pytest.raises(TensorParallelError, match=r"the process group has 1 rank: "):
            join_group(2, torch.device("cpu"))
    finally:
        dist.destroy_process_group()


def test_cli_under_torchrun_prints_the_single_process_text_once(tmp_path, capsys):
    from lmmrt.demo import save_demo

    path = str(save_demo(tmp_path / "demo"))  # a model with a tokenizer: the CLI takes text
    capsys.readouterr()
    args = ["generate", path, "-p", "abc", "--max-new-tokens", "5", "--ignore-eos", "--device", "cpu",
            "--backend", "torch", "--quiet"]
    assert cli(args) == 0
    expected = capsys.readouterr().out
    procs = launch([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port",
                    str(free_port()), "-m", "lmmrt", *args, "--tp", "2"], size=1)
    assert procs[0].returncode == 0, procs[0].stderr[-4000:]
    assert procs[0].stdout == expected


# --- without processes ---------------------------------------------------------------------------
def test_read_shard_reads_each_part_of_a_fused_tensor_and_column_ranges(tmp_path):
    from safetensors.torch import save_file

    from lmmrt.parallel.load import data_start, read_shard
    from lmmrt.parallel.plan import Shard
    from lmmrt.runtime.safetensors_file import SafetensorsFile

    g = torch.Generator().manual_seed(0)
    rows, cols = torch.randn(37, 23, generator=g), torch.randn(19, 10, generator=g).to(torch.bfloat16)
    save_file({"rows": rows, "cols": cols, "bias": rows[:, 0].clone()}, str(tmp_path / "w.safetensors"))
    weights = SafetensorsFile(tmp_path / "w.safetensors")
    with open(tmp_path / "w.safetensors", "rb") as fh:
        start, fd = data_start(fh), fh.fileno()
        got = read_shard(fd, weights, start, "rows", Shard(0, ((2, 5), (20, 31))))
        assert torch.equal(got, torch.cat([rows[2:5], rows[20:31]]))
        assert torch.equal(read_shard(fd, weights, start, "cols", Shard(1, ((3, 8),))), cols[:, 3:8])
        assert torch.equal(read_shard(fd, weights, start, "bias", Shard(0, ((30, 37),))), rows[30:, 0])


@pytest.mark.parametrize("vocab, size", [(93, 2), (98, 4), (7, 3), (32002, 8)])
def test_vocab_ranges_cover_the_vocabulary_once(vocab, size):
    ranges = [vocab_range(vocab, r, size) for r in range(size)]
    assert ranges[0][0] == 0 and ranges[-1][1] == vocab
    assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:]))
    assert max(b - a for a, b in ranges) == -(-vocab // size)


def test_rank_config_divides_heads_and_widths_and_names_every_bad_count():
    from lmmrt.demo import demo_config

    cfg = demo_config(120)  # decoder 8 heads, ffn 688; xattn 8 heads, ffn 688
    rank = rank_config(cfg, 4)
    assert (rank.decoder.heads, rank.decoder.kv_heads, rank.decoder.ffn_dim) == (2, 2, 172)
    assert (rank.xattn.heads, rank.xattn.ffn_dim) == (2, 172)
    assert rank.decoder.head_dim == cfg.decoder.head_dim and rank.decoder.vocab_size == cfg.decoder.vocab_size
    with pytest.raises(TensorParallelError, match=r"tp=3 does not divide decoder.heads = 8, decoder.kv_heads = 8, "
                                                  r"decoder.ffn_dim = 688, xattn.heads = 8"):
        rank_config(cfg, 3)


def test_tp_without_a_process_group_or_torchrun_says_how_to_start(monkeypatch):
    for var in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(var, raising=False)
    with pytest.raises(TensorParallelError, match=r"torchrun --nproc-per-node 2"):
        join_group(2, torch.device("cpu"))


def test_cli_tp_without_torchrun_is_one_error_line(monkeypatch, tmp_path, capsys):
    from cli_util import assert_one_error_line

    for var in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(var, raising=False)
    assert cli(["generate", str(tmp_path), "-p", "x", "--device", "cpu", "--tp", "2"]) == 2
    err = capsys.readouterr().err
    assert_one_error_line(err)
    assert "torchrun --nproc-per-node 2" in err


@pytest.mark.parametrize("tp", [0, -1, 2.0, "2", True])
def test_tp_must_be_a_positive_integer(tp):
    with pytest.raises(TypeError, match="tp must be an integer >= 1"):
        lmmrt.load("/nonexistent", device="cpu", tp=tp)


def test_generate_video_stream_refuses_a_tensor_parallel_model(tmp_path):
    # Its chunks bypass lmmrt.generate's input agreement and seed broadcast: with temperature > 0 the ranks
    # drew different tokens into the shared all-reduces (a silent wrong answer). Refused until it has them.
    import numpy as np

    import lmmrt
    from lmmrt.demo import save_demo
    from lmmrt.parallel import TensorParallel, TensorParallelError

    model = lmmrt.load(str(save_demo(tmp_path / "demo")), device="cpu")
    model.tp = TensorParallel(rank=0, size=2)
    frames = np.random.default_rng(0).integers(0, 256, (2, 32, 32, 3), dtype=np.uint8)
    with pytest.raises(TensorParallelError, match="generate_video_stream does not run under tensor parallelism"):
        next(iter(lmmrt.generate_video_stream(model, [frames], temperature=1.0, pipelined=False)))
