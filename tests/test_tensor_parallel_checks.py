"""The tensor-parallel checks that run in one process: the digest of a call's inputs the ranks compare
(equal calls spelled differently must agree), the checkpoint identity they compare at load (bytes past
the safetensors header count), and a group that ends while a call still runs (lmmrt's error, not
torch's). The two-process behaviour is in tests/test_tensor_parallel.py."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.distributed as dist

import lmmrt
from lmmrt.parallel import TensorParallelError, checkpoint_identity
from lmmrt.parallel.agree import input_digest


def generate_digest(**changes) -> str:
    """The digest of a generate call with lmmrt.generate's defaults, as lmmrt.generate passes them."""
    inputs = dict(prompts=["a <image> b"], images=None, max_new_tokens=8, temperature=0.0, top_k=0, top_p=1.0,
                  repetition_penalty=1.0, stop=None, stop_token_ids=None, ignore_eos=False, seed=None, stream=False)
    return input_digest("generate", **{**inputs, **changes})


@pytest.mark.parametrize("changes", [
    dict(temperature=0), dict(top_p=1), dict(repetition_penalty=np.float32(1.0)), dict(max_new_tokens=np.int64(8)),
    dict(images=[[]]), dict(images=[]), dict(images=([],)), dict(prompts=("a <image> b",)), dict(prompts="a <image> b"),
    dict(stop=[]), dict(stop_token_ids=[]),
])
def test_an_equal_call_spelled_differently_has_the_same_digest(changes):
    assert generate_digest(**changes) == generate_digest()


def test_equal_token_ids_images_and_stops_in_other_forms_have_the_same_digest():
    image = np.random.default_rng(0).integers(0, 256, (5, 7, 3), dtype=np.uint8)
    ids = [3, 9, 4]
    base = generate_digest(prompts=[ids], images=[[image]], stop=["x"], stop_token_ids=[5, 2])
    assert generate_digest(prompts=torch.tensor(ids), images=[image], stop="x", stop_token_ids=(2, 5)) == base
    assert generate_digest(prompts=(tuple(ids),), images=image, stop=("x",),
                           stop_token_ids=torch.tensor([5, 2])) == base


@pytest.mark.parametrize("changes", [
    dict(temperature=0.5), dict(top_p=0.9), dict(max_new_tokens=9), dict(seed=0), dict(prompts=["a <image> c"]),
    dict(images=[[np.zeros((2, 2, 3), np.uint8)]]), dict(stop="b"), dict(stop_token_ids=[2]), dict(stream=True),
])
def test_another_call_has_another_digest(changes):
    assert generate_digest(**changes) != generate_digest()


def test_checkpoint_identity_covers_the_end_and_the_middle_of_the_weights_file(tmp_path):
    # 5 MiB of weights: a byte changed past the first 2 MiB (a fine-tune that froze the first tensors)
    # or in a block sampled from the middle must change the identity the ranks compare at load
    size = 5 << 20
    data = np.random.default_rng(1).integers(0, 256, size, dtype=np.uint8)
    (tmp_path / "config.json").write_text(json.dumps({"a": 1}))
    weights = tmp_path / "model.safetensors"
    weights.write_bytes(data.tobytes())
    base = checkpoint_identity(tmp_path, None)
    for offset in (size - 7, size * 5 // 16 + 3, size * 9 // 16 + 100):  # the end, two of the 8 blocks
        changed = data.copy()
        changed[offset] ^= 0xFF
        weights.write_bytes(changed.tobytes())
        assert checkpoint_identity(tmp_path, None) != base, offset
    weights.write_bytes(data.tobytes())
    assert checkpoint_identity(tmp_path, None) == base


def test_a_group_that_ends_during_a_generate_stream_raises_a_tensor_parallel_error(tmp_path):
    from lmmrt.api import _load_tensor_parallel
    from lmmrt.demo import save_demo

    path = save_demo(tmp_path / "demo")
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        model = _load_tensor_parallel(path, torch.device("cpu"), None, backend="torch", progress=False,
                                      cuda_graph=False, tp=1)
        stream = lmmrt.generate(model, "a photo of", max_new_tokens=6, ignore_eos=True, stream=True)
        next(stream)
    finally:
        dist.destroy_process_group()
    with pytest.raises(TensorParallelError, match="process group of this tensor-parallel model has ended"):
        list(stream)
