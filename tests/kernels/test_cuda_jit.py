"""The NVRTC JIT path of the CUDA kernels (lmmrt.kernels.cuda_jit).

Runs on the CPU (CI): every kernel compiles with NVRTC for sm_80/sm_90 with no GPU, the cubins hold
the expected entry points, ptxas reports no spills, the disk cache skips NVRTC, a broken source
carries NVRTC's log, the extension and the JIT run the same argument checks and launch geometry.
Which kernels run, CuPy-style (DLPack) arrays and the disk cache's files: test_cuda_jit_host.py;
the GPU tests: test_cuda_jit_gpu.py.
"""

from __future__ import annotations

import sys

import pytest
import torch

from lmmrt import cli
from lmmrt.kernels import backend as _backend
from lmmrt.kernels import cuda_jit
from lmmrt.kernels.cuda_jit import nvrtc_build
from lmmrt.kernels.cuda_jit.launcher import JitKernels

try:  # tests/kernels may or may not be a package, depending on how pytest imports it
    from .nvrtc_probe import NVRTC_MISSING as _NVRTC_MISSING
    from .nvrtc_probe import needs_nvrtc
except ImportError:
    from nvrtc_probe import NVRTC_MISSING as _NVRTC_MISSING
    from nvrtc_probe import needs_nvrtc


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """Every kernel group for sm_80 and sm_90, compiled once into a fresh cache."""
    if _NVRTC_MISSING is not None:
        pytest.skip(f"NVRTC unusable: {_NVRTC_MISSING}")
    cache = tmp_path_factory.mktemp("kernel-cache")
    return cache, nvrtc_build.build_all((80, 90), cache_dir=cache)


# ---- CPU: compile, cache, errors ------------------------------------------------------------------

def test_every_kernel_compiles_with_its_entry_point_and_no_spills(built):
    _, results = built
    assert sorted((r.group, r.arch) for r in results) == sorted(
        (g, a) for g in nvrtc_build.GROUPS for a in (80, 90))
    for r in results:
        assert not r.cached
        assert r.cubin[:4] == b"\x7fELF", f"{r.group} sm_{r.arch}: not an ELF cubin"
        assert set(r.entries) == set(nvrtc_build.GROUPS[r.group].kernels)
        for key, entry in r.entries.items():
            assert entry.encode() in r.cubin, f"{key}: entry {entry} missing from the sm_{r.arch} cubin"
            res = r.resources.get(entry)
            assert res is not None, f"{key}: no ptxas report for {entry} in the NVRTC log"
            assert res["spill_stores"] == 0 and res["spill_loads"] == 0, f"sm_{r.arch} {key} spills: {res}"
            assert 0 < res["registers"] <= 255
    decode = {(r.arch, k) for r in results for k in r.entries if k.startswith("decode_split/bfloat16/")}
    assert decode == {(a, f"decode_split/bfloat16/{d}") for a in (80, 90) for d in (64, 96, 128)}


def test_cache_hit_skips_nvrtc(built, monkeypatch):
    cache, results = built
    first = next(r for r in results if r.group == "norms" and r.arch == 90)

    def no_compile(*a, **k):
        raise AssertionError("NVRTC was called on a cache hit")

    from cupy_backends.cuda.libs import nvrtc

    monkeypatch.setattr(nvrtc, "createProgram", no_compile)
    again = nvrtc_build.compile_group("norms", 90, cache_dir=cache)
    assert again.cached and again.cubin == first.cubin and again.entries == first.entries
    # another arch or another source is another entry: not served from this one
    with pytest.raises(AssertionError, match="NVRTC was called"):
        nvrtc_build.compile_group("norms", 90, cache_dir=cache, source=nvrtc_build.GROUPS["norms"].source() + "\n")


def test_cache_key_covers_source_arch_and_nvrtc_version():
    inc = nvrtc_build.kernel_include_dir()
    base = nvrtc_build.cache_key("x", 90, (13, 0), inc)
    assert len({base, nvrtc_build.cache_key("y", 90, (13, 0), inc), nvrtc_build.cache_key("x", 80, (13, 0), inc),
                nvrtc_build.cache_key("x", 90, (13, 1), inc)}) == 4


@needs_nvrtc
def test_broken_source_error_carries_the_nvrtc_log(tmp_path):
    src = nvrtc_build.GROUPS["norms"].source() + "\nthis_is_not_cuda;\n"
    with pytest.raises(nvrtc_build.KernelBuildError, match=r"(?s)norms kernels for sm_90.*this_is_not_cuda"):
        nvrtc_build.compile_group("norms", 90, cache_dir=tmp_path, source=src)
    assert not list(tmp_path.glob("*.cubin")), "a failed compile left a cache entry"


@needs_nvrtc
def test_missing_cuda_headers_name_the_package_to_install(tmp_path, monkeypatch):
    from cuda import pathfinder

    monkeypatch.setattr(pathfinder, "find_nvidia_header_directory", lambda name: None)
    for var in ("LMMRT_CUDA_INCLUDE", "CUDA_PATH", "CUDA_HOME"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(nvrtc_build, "TOOLKIT_INCLUDE", tmp_path)
    with pytest.raises(nvrtc_build.CudaJitUnavailable, match="pip install nvidia-cuda-runtime"):
        nvrtc_build.compile_group("norms", 90, cache_dir=tmp_path)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # as on a GPU box without headers
    assert "pip install nvidia-cuda-runtime" in cuda_jit.jit_unusable_reason()
    monkeypatch.setenv("CUDA_HOME", "/nonexistent")
    with pytest.raises(ImportError, match="cuda_bf16.h"):  # what the CLI reports as an lmmrt error
        nvrtc_build.cuda_include_dir()


@needs_nvrtc
def test_struct_layout_mismatch_is_a_compile_error(tmp_path):
    """The ctypes parameter structs are checked against csrc's by static_asserts in every compile."""
    from lmmrt.kernels.cuda_jit import kernel_params as kp

    src = nvrtc_build.GROUPS["norms"].source()
    right = f"__builtin_offsetof(lmmrt::NormParams, rows) == {kp.NormParams.rows.offset},"
    assert right in src
    with pytest.raises(nvrtc_build.KernelBuildError, match="NormParams.rows moved"):
        nvrtc_build.compile_group("norms", 80, cache_dir=tmp_path, source=src.replace(right, right.replace(
            f"== {kp.NormParams.rows.offset},", f"== {kp.NormParams.rows.offset + 8},")))


def test_build_kernels_cli_reports_sizes_registers_and_spills(built, capsys):
    cache, _ = built
    assert cli.main(["build-kernels", "--arch", "80", "90", "--cache-dir", str(cache)]) == 0
    out = capsys.readouterr().out
    assert "ptxas -v" in out
    for arch in (80, 90):
        for group in nvrtc_build.GROUPS:
            assert f"sm_{arch} {group}: cubin " in out and "(cached)" in out
    assert out.count("spills 0/0 bytes") == sum(len(g.kernels) for g in nvrtc_build.GROUPS.values()) * 2


@needs_nvrtc
def test_build_kernels_cli_refuses_an_unknown_arch(capsys):
    assert cli.main(["build-kernels", "--arch", "12"]) == 2
    assert "--arch 12: this NVRTC compiles for" in capsys.readouterr().err


def test_build_kernels_cli_without_nvrtc_names_the_package(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "cupy_backends.cuda.libs.nvrtc", None)  # import fails
    assert cli.main(["build-kernels", "--arch", "90"]) == 2
    err = capsys.readouterr().err
    assert "needs CuPy, which is not installed" in err and 'pip install "lmmrt[cupy]"' in err


# ---- CPU: argument checks are the extension's ---------------------------------------------------

_DEC = dict(batch=2, heads=4, head_dim=64, latents=3, num_media=5, q_strides=(256, 64), out_strides=(256, 64),
            kv_strides=(256, 64), index_strides=(1, 1, 1), index_int64=(False, False, False), cumulative=False,
            scale=0.125, num_splits=2, dtype="float16", stream=0)
_DEC_PTRS = (4096, 4096, 4096, 4096, 4096, 4096, 4096, 4096)
_NORM = dict(rows=3, dim=64, eps=1e-5, layer_norm=True, dtype="bfloat16", weight_dtype="float32", stream=0)
_NORM_PTRS = (4096, 4096, 4096, 4096, 4096, 4096)
_GATED = dict(numel=128, dim=64, gate_numel=64, dtype="float16", gate_dtype="float16", stream=0)
_GATED_PTRS = (4096, 4096, 4096, 4096)

BAD_CALLS = [
    ("masked_cross_attention_decode", _DEC_PTRS, {"dtype": "float32"}),
    ("masked_cross_attention_decode", _DEC_PTRS, {"dtype": "int8"}),
    ("masked_cross_attention_decode", _DEC_PTRS, {"head_dim": 80}),
    ("masked_cross_attention_decode", _DEC_PTRS, {"batch": 65536}),
    ("masked_cross_attention_decode", _DEC_PTRS, {"heads": -1}),
    ("masked_cross_attention_decode", _DEC_PTRS, {"latents": -1}),
    ("masked_cross_attention_decode", _DEC_PTRS, {"num_splits": 0}),
    ("masked_cross_attention_decode", _DEC_PTRS, {"kv_strides": (256, 60)}),
    ("masked_cross_attention_decode", (0,) + _DEC_PTRS[1:], {}),
    ("masked_cross_attention_decode", (4096, 4104) + _DEC_PTRS[2:], {}),
    ("masked_cross_attention_decode", _DEC_PTRS[:2] + (4100,) + _DEC_PTRS[3:], {}),
    ("masked_cross_attention_decode", _DEC_PTRS[:4] + (4098,) + _DEC_PTRS[5:], {}),
    ("masked_cross_attention_decode", _DEC_PTRS[:5] + (4100,) + _DEC_PTRS[6:], {"index_int64": (False, True, False)}),
    ("masked_cross_attention_decode", _DEC_PTRS[:7] + (0,), {}),
    ("fused_norm", _NORM_PTRS, {"weight_dtype": "float16"}),
    ("fused_norm", _NORM_PTRS, {"rows": -1}),
    ("fused_norm", _NORM_PTRS, {"dim": 0}),
    ("fused_norm", (4096, 0) + _NORM_PTRS[2:], {}),
    ("fused_norm", _NORM_PTRS, {"layer_norm": False}),
    ("fused_norm", (4097,) + _NORM_PTRS[1:], {}),
    ("fused_norm", _NORM_PTRS[:4] + (4098, 4096), {}),
    ("fused_norm", _NORM_PTRS[:5] + (4097,), {}),
    ("gated_residual", _GATED_PTRS, {"gate_dtype": "bfloat16"}),
    ("gated_residual", _GATED_PTRS, {"dim": 0}),
    ("gated_residual", _GATED_PTRS, {"numel": 100}),
    ("gated_residual", _GATED_PTRS, {"gate_numel": 3}),
    ("gated_residual", (4096, 4096, 4097, 4096), {}),
    ("gated_residual", (4096, 4096, 4096, 0), {}),
]


@pytest.mark.skipif(_backend.cuda_extension() is None, reason="needs the lmmrt._C extension to compare with")
@pytest.mark.parametrize("fn, ptrs, change", BAD_CALLS, ids=[f"{c[0]}-{i}" for i, c in enumerate(BAD_CALLS)])
def test_argument_checks_match_the_extension(fn, ptrs, change):
    """Each bad call is refused by both, with the same message, before either touches CUDA."""
    kwargs = {**{"masked_cross_attention_decode": _DEC, "fused_norm": _NORM, "gated_residual": _GATED}[fn], **change}
    with pytest.raises(ValueError) as ext_err:
        getattr(_backend.cuda_extension(), fn)(*ptrs, **kwargs)
    with pytest.raises(ValueError) as jit_err:
        getattr(JitKernels(), fn)(*ptrs, **kwargs)
    assert str(jit_err.value) == str(ext_err.value)


@pytest.mark.skipif(_backend.cuda_extension() is None, reason="needs the lmmrt._C extension to compare with")
@pytest.mark.parametrize("fn, ptrs, kwargs", [("masked_cross_attention_decode", _DEC_PTRS, _DEC),
                                              ("fused_norm", _NORM_PTRS, _NORM), ("gated_residual", _GATED_PTRS, _GATED)])
def test_both_paths_run_the_one_description_of_the_checks(monkeypatch, fn, ptrs, kwargs):
    """lmmrt.kernels.cuda_launch_checks is what the extension's glue and the JIT both call (no copy)."""
    from lmmrt.kernels import cuda_launch_checks

    seen = []

    def spy(*args, **kw):
        seen.append((args, kw))
        raise ValueError("checked by cuda_launch_checks")

    monkeypatch.setattr(cuda_launch_checks, fn, spy)
    for kernels in (_backend.cuda_extension(), JitKernels()):
        with pytest.raises(ValueError, match="checked by cuda_launch_checks"):
            getattr(kernels, fn)(*ptrs, **kwargs)
    assert len(seen) == 2 and seen[0][0] == seen[1][0] == ptrs
    assert seen[0][1].keys() == seen[1][1].keys() == kwargs.keys()
    assert all(seen[0][1][k] == type(seen[0][1][k])(v) for k, v in kwargs.items())


@pytest.mark.skipif(_backend.cuda_extension() is None, reason="needs the lmmrt._C extension to compare with")
def test_empty_launches_return_without_cuda_in_both():
    for kernels in (_backend.cuda_extension(), JitKernels()):
        assert kernels.masked_cross_attention_decode(*_DEC_PTRS, **{**_DEC, "batch": 0}) is None
        assert kernels.fused_norm(*_NORM_PTRS, **{**_NORM, "rows": 0}) is None
        assert kernels.gated_residual(*_GATED_PTRS, **{**_GATED, "numel": 0}) is None


def _recorded_launches(monkeypatch):
    launches = []
    monkeypatch.setattr(JitKernels, "_launch", lambda self, key, grid, block, stream, args:
                        launches.append((key, tuple(grid), block, stream, args)))
    return launches


def test_every_launch_names_a_compiled_kernel_with_the_extension_geometry(monkeypatch):
    """Without a GPU: what the JIT would launch, for every dtype, head_dim, split count, width and
    alignment. Each key is in the NVRTC catalogue, the geometry is csrc's launchers'."""
    launches = _recorded_launches(monkeypatch)
    catalogue = {k for g in nvrtc_build.GROUPS.values() for k in g.kernels}
    k = JitKernels()
    for dtype in ("float16", "bfloat16"):
        for head_dim in (64, 96, 128):
            for splits in (1, 3):
                launches.clear()
                k.masked_cross_attention_decode(*_DEC_PTRS, **{**_DEC, "dtype": dtype, "head_dim": head_dim,
                                                               "num_splits": splits, "stream": 7})
                assert [(key, grid, block) for key, grid, block, *_ in launches] == [
                    (f"decode_split/{dtype}/{head_dim}", (splits, 4, 2), 128)] + (
                    [(f"decode_combine/{dtype}/{head_dim}", (4, 2), head_dim)] if splits > 1 else [])
                p = launches[0][4][0]
                assert launches[0][3] == 7 and p.num_splits == splits and p.batch == 2 and p.heads == 4
                if splits > 1:  # float32 max/sum pairs after the batch*heads*splits*head_dim accumulators
                    assert p.ws_acc == 4096 and p.ws_ml == 4096 + 4 * 2 * 4 * splits * head_dim
                else:
                    assert p.ws_acc is None and p.ws_ml is None
    for dtype, wdtype in nvrtc_build.NORM_DTYPE_PAIRS:
        for dim, base in ((4096, 4096), (64, 4096 + 4), (97, 4096), (1, 4096)):
            launches.clear()
            k.fused_norm(base, 0, base, 0, 4096, 0, **{**_NORM, "dim": dim, "dtype": dtype, "weight_dtype": wdtype})
            k.gated_residual(base, base, base, 4096, **{**_GATED, "numel": 3 * dim, "dim": dim, "gate_numel": 1,
                                                      "dtype": dtype, "gate_dtype": wdtype})
            (nkey, ngrid, nblock, _, _), (gkey, ggrid, gblock, _, gargs) = launches
            vec = nvrtc_build.norm_vec(dtype, wdtype) if dim % nvrtc_build.norm_vec(dtype, wdtype) == 0 \
                and base % 16 == 0 else 1
            assert nkey == f"norm/{dtype}/{wdtype}/{vec}" and ngrid == (3,)
            assert nblock == min(1024, -(-(dim // vec) // 32) * 32)
            gvec = nvrtc_build.gated_vec(dtype) if dim % nvrtc_build.gated_vec(dtype) == 0 and base % 16 == 0 else 1
            assert gkey == f"gated_residual/{dtype}/{wdtype}/{gvec}" and gblock == 256
            assert gargs[4].value == 3 * dim // gvec and ggrid == (-(-(3 * dim // gvec) // 256),)
            assert {nkey, gkey} <= catalogue


def test_first_launch_loads_both_cubins_for_the_device_arch_and_packs_params(built, monkeypatch):
    """CuPy's device queries, module loads and the driver launch replaced by recorders: the cubin of
    the device's own arch is loaded (from the cache), and the launch's kernel-parameter array points
    at the struct the kernel will read."""
    import ctypes

    from cupy.cuda import function, runtime
    from cupy_backends.cuda.api import driver

    from lmmrt.kernels.cuda_jit import kernel_params as kp

    cache, results = built
    loaded, launched = [], []

    class FakeModule:
        def load(self, cubin):
            loaded.append(cubin)

        def get_function(self, name):
            entries[len(entries) + 1] = name
            return type("F", (), {"ptr": len(entries)})()

    entries = {}

    def launch(f, gx, gy, gz, bx, by, bz, smem, stream, params, extra):
        struct = kp.DecodeParams if "decode" in entries[f] else kp.NormParams
        arg0 = ctypes.c_void_p.from_address(params).value  # the first kernel argument's address
        launched.append(((gx, gy, gz), (bx, by, bz), stream,
                         struct.from_buffer_copy(ctypes.string_at(arg0, ctypes.sizeof(struct)))))

    monkeypatch.setattr(runtime, "getDevice", lambda: 0)
    monkeypatch.setattr(runtime, "getDeviceProperties", lambda d: {"major": 8, "minor": 0})
    monkeypatch.setattr(function, "Module", FakeModule)
    monkeypatch.setattr(driver, "launchKernel", launch)
    k = JitKernels(cache_dir=cache)
    k.masked_cross_attention_decode(*_DEC_PTRS, **{**_DEC, "num_splits": 1, "stream": 99})
    assert sorted(loaded) == sorted(r.cubin for r in results if r.arch == 80) and k.compiled == {0: False}
    (grid, block, stream, p), = launched
    assert grid == (1, 4, 2) and block == (128, 1, 1) and stream == 99
    assert (p.batch, p.heads, p.latents, p.num_media, p.q_stride_b, p.kv_stride_h, p.num_splits) == (
        2, 4, 3, 5, 256, 64, 1)
    assert abs(p.scale - 0.125) < 1e-9 and p.q == 4096 and not p.cumulative
    k.fused_norm(*_NORM_PTRS, **_NORM)
    assert len(loaded) == 2, "modules are loaded once per device"
    grid, block, _, p = launched[1]
    assert grid == (3, 1, 1) and (p.rows, p.dim, p.layer_norm, p.x, p.h_out) == (3, 64, True, 4096, 4096)
