"""Peak memory of lmmrt.load: weights go from the file to their final dtype and device with no
float32 copy of the model on the way (issue 10). Measured in a fresh process, on the CPU from the
resident-set high-water mark with MALLOC_PERTURB_ set (so allocated but untouched memory counts),
on a GPU from torch.cuda.max_memory_allocated."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import save_file

from lmmrt.demo import save_demo
from lmmrt.models.config import DecoderConfig, ModelConfig, PerceiverConfig, VisionConfig, XAttnConfig
from lmmrt.models.random_init import random_model


def _config() -> ModelConfig:
    """About 33M parameters (66 MB in bf16), no single tensor over 5% of them."""
    d = 512
    return ModelConfig(
        vision=VisionConfig(image_size=56, patch_size=14, width=128, layers=2, heads=4, mlp_dim=256),
        perceiver=PerceiverConfig(dim=128, depth=1, heads=4, head_dim=32, n_latents=16, mlp_dim=256),
        decoder=DecoderConfig(family="llama", vocab_size=2048, dim=d, layers=8, heads=8, ffn_dim=1408,
                              max_seq_len=256),
        xattn=XAttnConfig(style="idefics", layers=[0, 4], heads=8, head_dim=64, media_dim=128, ffn_dim=1408),
        image_token_id=5)


@pytest.fixture(scope="module")
def bf16_ckpt(tmp_path_factory):
    """A bf16 checkpoint of a few tens of MB, and the demo checkpoint to warm the loader up with."""
    root = tmp_path_factory.mktemp("loadmem")
    cfg = _config()
    state = {k: v.to(torch.bfloat16).contiguous() for k, v in random_model(cfg, seed=3).state_dict().items()}
    out = root / "bf16"
    out.mkdir()
    cfg.save(out / "config.json")
    save_file(state, str(out / "model.safetensors"), metadata={"format": "lmmrt"})
    nbytes = sum(v.numel() * v.element_size() for v in state.values())
    largest = max(v.numel() * v.element_size() for v in state.values())
    return out, save_demo(root / "demo", dtype=torch.bfloat16), nbytes, largest


# Runs in a fresh process: one warm-up load (imports, first-call allocations), then the measured one.
_MEASURE = r"""
import json, sys, torch, lmmrt
ckpt, warm, device = sys.argv[1:4]
lmmrt.load(warm, device=device, backend="torch")

def status(field):
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
with open("/proc/self/clear_refs", "w") as f:  # resets VmHWM to the current RSS
    f.write("5")
rss0 = status("VmRSS")
if device == "cuda":
    torch.cuda.synchronize(); torch.cuda.reset_peak_memory_stats()
    gpu0 = torch.cuda.memory_allocated()
model = lmmrt.load(ckpt, device=device, backend="torch")
out = {"cpu_peak": status("VmHWM") - rss0, "dtype": str(model.dtype)}
if device == "cuda":
    out["gpu_peak"] = torch.cuda.max_memory_allocated() - gpu0
print(json.dumps(out))
"""


def _measure(ckpt, warm, device: str) -> dict:
    env = dict(os.environ, MALLOC_PERTURB_="85")
    r = subprocess.run([sys.executable, "-c", _MEASURE, str(ckpt), str(warm), device],
                       capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


def test_cpu_load_peak_is_at_most_1_3x_the_weights(bf16_ckpt):
    ckpt, warm, nbytes, _ = bf16_ckpt
    got = _measure(ckpt, warm, "cpu")
    assert got["dtype"] == "torch.bfloat16"
    assert got["cpu_peak"] <= 1.3 * nbytes, (
        f"load added {got['cpu_peak'] / 2**20:.1f} MiB for {nbytes / 2**20:.1f} MiB of bf16 weights "
        f"({got['cpu_peak'] / nbytes:.2f}x)")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_gpu_load_peak_is_the_weights_plus_one_tensor(bf16_ckpt):
    ckpt, warm, nbytes, largest = bf16_ckpt
    got = _measure(ckpt, warm, "cuda")
    assert got["gpu_peak"] <= 1.05 * nbytes + largest, (
        f"load peaked at {got['gpu_peak'] / 2**20:.1f} MiB of GPU memory for {nbytes / 2**20:.1f} MiB of "
        f"bf16 weights (largest tensor {largest / 2**20:.1f} MiB)")
