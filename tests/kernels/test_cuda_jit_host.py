"""The NVRTC JIT path of the CUDA kernels (lmmrt.kernels.cuda_jit), host side, on the CPU: which kernels
run and why (extension, JIT or none, and what `lmmrt info` says), CuPy-style (DLPack) arrays in and out,
and the disk cache's files (permissions, a failed write, an unwritable --cache-dir). Compiling and the
argument checks: test_cuda_jit.py.
"""

from __future__ import annotations

import errno
import os
import stat

import numpy as np
import pytest
import torch

from lmmrt import cli
from lmmrt.kernels import backend as _backend
from lmmrt.kernels import cuda_jit, norms
from lmmrt.kernels import masked_cross_attention_cuda as mxa
from lmmrt.kernels.cuda_jit import nvrtc_build
from lmmrt.kernels.cuda_jit.dlpack import accepts_dlpack_arrays
from lmmrt.kernels.cuda_jit.launcher import JitKernels

try:  # tests/kernels may or may not be a package, depending on how pytest imports it
    from .nvrtc_probe import needs_nvrtc
except ImportError:
    from nvrtc_probe import needs_nvrtc


# ---- CPU: which kernels run, and why --------------------------------------------------------------

@pytest.fixture
def fresh_choice(monkeypatch):
    _backend.cuda_kernels_choice.cache_clear()
    yield monkeypatch
    _backend.cuda_kernels_choice.cache_clear()


@pytest.mark.parametrize("ext, jit_ok, env, uses", [
    (True, True, "", "extension"), (True, True, "1", "jit"), (False, True, "", "jit"), (False, True, "0", "none"),
    (False, False, "", "none"), (True, False, "1", "extension")])
def test_extension_preferred_jit_when_missing(fresh_choice, ext, jit_ok, env, uses):
    fresh_choice.setattr(_backend, "cuda_extension", lambda: object() if ext else None)
    fresh_choice.setattr(cuda_jit, "jit_unusable_reason", lambda: None if jit_ok else "no CUDA device")
    fresh_choice.setenv("LMMRT_CUDA_JIT", env)
    choice, why = _backend.cuda_kernels_choice()
    assert choice == uses and why
    if not jit_ok and uses == "none":
        assert "no CUDA device" in why
    if uses == "jit":
        assert isinstance(_backend.cuda_kernels(), JitKernels)


def test_info_says_which_kernels_and_why():
    from lmmrt.info import info, info_text

    d = info("torch")["cuda_kernels"]
    assert d["uses"] in ("extension", "jit", "none") and d["why"]
    assert f"CUDA kernels: {d['uses']} (" in info_text("torch")


@needs_nvrtc
def test_info_names_nvrtc_and_the_cache_when_the_jit_runs(monkeypatch, tmp_path):
    from lmmrt.info import info_text

    monkeypatch.setattr(_backend, "cuda_kernels_choice", lambda: ("jit", "lmmrt._C is not built"))
    monkeypatch.setenv("LMMRT_KERNEL_CACHE", str(tmp_path))
    version = ".".join(map(str, nvrtc_build.nvrtc_version()))
    assert f"CUDA kernels: jit (lmmrt._C is not built); NVRTC {version}, cache {tmp_path}" in info_text("torch")


# ---- CPU: foreign (DLPack) arrays ---------------------------------------------------------------

def test_dlpack_arrays_come_back_as_the_same_kind_without_copies():
    seen = {}

    @accepts_dlpack_arrays
    def double_and_sum(x, *, y):
        seen["types"] = (type(x), type(y))
        x.mul_(2)  # in place: shows x is the caller's memory, not a copy
        return x, x + y

    a = np.arange(1, 7, dtype=np.float32).reshape(2, 3)
    b = np.full((2, 3), 0.5, dtype=np.float32)
    x_back, s = double_and_sum(a, y=b)
    assert seen["types"] == (torch.Tensor, torch.Tensor)
    assert isinstance(x_back, np.ndarray) and isinstance(s, np.ndarray)
    np.testing.assert_array_equal(a, np.arange(1, 7, dtype=np.float32).reshape(2, 3) * 2)
    np.testing.assert_array_equal(s, a + 0.5)
    assert np.shares_memory(x_back, a)
    t = torch.ones(2)
    assert double_and_sum(t, y=t)[0] is t  # torch in, torch out, untouched path


def test_public_kernel_functions_take_dlpack_arrays():
    x = np.random.default_rng(0).standard_normal((3, 64)).astype(np.float32)
    w = np.ones(64, dtype=np.float32)
    # converted to (CPU) torch tensors: the device check names the argument, as for a tensor
    with pytest.raises(ValueError, match="rms_norm: x must be a CUDA tensor"):
        norms.rms_norm_cuda(x, w, 1e-5)
    q = np.zeros((1, 1, 2, 64), dtype=np.float16)
    with pytest.raises(ValueError, match="masked_cross_attention_decode: q must be float16"):
        mxa.masked_cross_attention_decode(q.astype(np.float32), q, q, np.zeros(1, np.int32),
                                          np.zeros(1, np.int32), np.zeros(1, np.int32))


# ---- the disk cache: written for other users, refused loudly only where storing is the point -----

def _fake_group() -> "nvrtc_build.CompiledGroup":
    return nvrtc_build.CompiledGroup("norms", 90, b"cubin", {"k": "e"}, {}, "log", False, 0.0)


def test_cache_files_are_world_readable_as_umask_allows(tmp_path):
    mask = os.umask(0o022)
    try:
        nvrtc_build._write_cache(tmp_path, tmp_path / "a.cubin", tmp_path / "a.json", _fake_group())
    finally:
        os.umask(mask)
    for name in ("a.cubin", "a.json"):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == 0o666 & ~mask, name
    assert (tmp_path / "a.cubin").read_bytes() == b"cubin"


def test_failed_cache_write_raises_naming_the_directory_and_leaves_no_temp_file(tmp_path, monkeypatch):
    def full_disk(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(nvrtc_build.os, "fsync", full_disk)
    with pytest.raises(nvrtc_build.KernelCacheError, match=f"kernel cache directory {tmp_path}: No space left"):
        nvrtc_build._write_cache(tmp_path, tmp_path / "a.cubin", tmp_path / "a.json", _fake_group())
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("where, message", [
    ("file", "is not a directory"),
    ("/proc/lmmrt-no-such-dir/sub", "cannot create the kernel cache directory"),  # /proc takes no new entries
])
def test_build_kernels_cli_refuses_a_cache_dir_it_cannot_write(tmp_path, where, message, capsys, monkeypatch):
    path = tmp_path / "red.png" if where == "file" else where
    if where == "file":
        path.write_bytes(b"x")
    monkeypatch.setattr(nvrtc_build, "supported_archs", lambda: (90,))
    monkeypatch.setattr(nvrtc_build, "nvrtc_version", lambda: (13, 0))
    monkeypatch.setattr(nvrtc_build, "compile_group", lambda *a, **k: pytest.fail("compiled before the check"))
    assert cli.main(["build-kernels", "--arch", "90", "--cache-dir", str(path)]) == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("lmmrt: error: ") and message in lines[0] and str(path) in lines[0]
    assert "cubin" not in captured.out
