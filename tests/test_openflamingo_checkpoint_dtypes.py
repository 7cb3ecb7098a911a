"""OpenFlamingo's checkpoint.pt (a torch pickle) is held to the same rule as a .safetensors one: lmmrt
weights are floating point, and an integer tensor (e.g. a quantized one) is refused naming it, never
cast to float into weights of numbers that never were."""

from __future__ import annotations

import pytest
import torch

from lmmrt.convert.openflamingo import read_openflamingo_checkpoint
from lmmrt.runtime.weights import CheckpointError


@pytest.mark.parametrize("key, tensor", [
    ("perceiver.latents", torch.arange(1, 13, dtype=torch.int32).reshape(3, 4)),
    ("lang_encoder.gated_cross_attn_layers.0.attn_gate", torch.tensor([1], dtype=torch.int64)),
])
def test_an_integer_tensor_in_a_torch_checkpoint_is_refused_naming_it(tmp_path, key, tensor):
    path = tmp_path / "checkpoint.pt"
    sd = {"perceiver.norm.weight": torch.randn(4), key: tensor}
    torch.save({"model_state_dict": {f"module.{k}": v for k, v in sd.items()}}, path)
    with pytest.raises(CheckpointError, match=rf"checkpoint\.pt: tensor '{key}' is {str(tensor.dtype)[6:]}, but"):
        read_openflamingo_checkpoint(path)


def test_float_tensors_of_a_torch_checkpoint_are_read_unchanged(tmp_path):
    path = tmp_path / "checkpoint.pt"
    sd = {"perceiver.latents": torch.randn(3, 4), "lang_encoder.gated_cross_attn_layers.0.attn_gate":
          torch.randn(1, dtype=torch.float64), "perceiver.norm.weight": torch.randn(4, dtype=torch.float16)}
    torch.save({f"module.{k}": v for k, v in sd.items()}, path)
    got = read_openflamingo_checkpoint(path)
    assert sorted(got) == sorted(sd)
    for k, v in sd.items():
        assert got[k].dtype == v.dtype and torch.equal(got[k], v)
