"""The build: CMake configures with the CUDA extension optional, and the installed package reports
what it was built with."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _configure(tmp_path, *defs):
    import pybind11

    cmd = ["cmake", "-S", str(ROOT), "-B", str(tmp_path / "build"), f"-Dpybind11_DIR={pybind11.get_cmake_dir()}",
           f"-DPython_EXECUTABLE={sys.executable}", *defs]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300)


@pytest.mark.skipif(shutil.which("cmake") is None, reason="cmake not installed")
def test_cuda_off_configures_pure_python(tmp_path):
    r = _configure(tmp_path, "-DLMMRT_CUDA=OFF")
    assert r.returncode == 0, r.stderr
    assert "LMMRT_CUDA=OFF, installing pure Python" in r.stdout


@pytest.mark.skipif(shutil.which("cmake") is None or shutil.which("nvcc") is None, reason="needs cmake and nvcc")
def test_cuda_on_configures_with_archs(tmp_path):
    r = _configure(tmp_path, "-DLMMRT_CUDA=ON", "-DLMMRT_CUDA_ARCHS=80;90")
    assert r.returncode == 0, r.stderr
    cache = (tmp_path / "build" / "CMakeCache.txt").read_text()
    assert "LMMRT_CUDA_ARCHS:STRING=80;90" in cache


def test_info_reports_extension_when_built():
    import lmmrt
    from lmmrt.kernels.backend import cuda_extension

    d = lmmrt.info()
    if cuda_extension() is None:
        assert d["cuda_extension"] is None
        assert "not built" in lmmrt.info_text()
    else:
        # the archs it was built for: LMMRT_CUDA_ARCHS when set (bench/device.sh builds for the GPU's
        # own arch), else the build's default
        assert d["cuda_extension"]["cuda_archs"] == os.environ.get("LMMRT_CUDA_ARCHS", "80;90").split(";")
        assert d["cuda_extension"]["cuda_version"].split(".")[0].isdigit()


def test_cli_info_and_help():
    r = subprocess.run([sys.executable, "-m", "lmmrt", "info", "--json"], capture_output=True, text=True)
    assert r.returncode == 0 and '"ops"' in r.stdout
    r = subprocess.run([sys.executable, "-m", "lmmrt", "--help"], capture_output=True, text=True)
    assert r.returncode == 0
    for cmd in ("info", "convert", "generate", "demo"):
        assert cmd in r.stdout
    r = subprocess.run([sys.executable, "-m", "lmmrt", "convert", "idefics", "--help"], capture_output=True, text=True)
    assert "--image-token-id" in r.stdout
