"""Compile every Triton kernel for real GPUs (sm_80, sm_90) without one, exactly as launched.

The interpreter checks what the kernels compute, not whether they compile for a GPU (tile shapes,
dot operand layouts, shared memory, registers). This script runs each launcher with CPU tensors and
the launch configuration the GPU path would choose (an H100's 132 SMs), records every kernel launch
instead of running it, and compiles it ahead of time for each target through triton's own launch
path: the JIT function's binder and `_pack_args` (what `JITFunction.run` does before compiling)
with the target's backend. So the compiled kernel has the real specialization: pointer alignment
(`tt.divisibility` 16), integer arguments divisible by 16, and strides equal to 1 folded into
constants. A hand-written signature without those compiles a different kernel (no vectorized,
pipelined loads): for the bf16 head-dim-128 cross-attention prefill, 32 KiB of shared memory on
sm_90 (40 KiB on sm_80) instead of the real 112 KiB (88 KiB).

Checks per compiled kernel: shared memory within the target's per-block limit, and no register
spills (ptxas -v) where SPILL_FREE says so. Run as a separate process: TRITON_INTERPRET must be
unset when the kernels are defined. Prints one line per compiled kernel (FAIL lines for the
failures) and exits non-zero if any failed. `--dh 160,192` / `--dtype bf16` / `--arch 80` select a subset.

To cover a new kernel, add a generator of (name, dtype, head_dim, launch) to CASE_GROUPS; `launch`
calls the kernel's real launcher with CPU tensors.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import re
import sys
import tempfile

os.environ.pop("TRITON_INTERPRET", None)
# A cached kernel skips ptxas, whose log is where the spill counts come from: compile afresh.
os.environ["TRITON_ALWAYS_COMPILE"] = "1"
os.environ["TRITON_CACHE_DIR"] = tempfile.mkdtemp(prefix="lmmrt-aot-")

import importlib  # noqa: E402

import torch  # noqa: E402
import triton  # noqa: E402
from triton import knobs  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource, make_backend  # noqa: E402
from triton.runtime.jit import JITFunction, create_function_from_signature  # noqa: E402

# (the package re-exports functions of the same names as these modules: import the modules)
pa = importlib.import_module("lmmrt.kernels.perceiver_attention")
mx = importlib.import_module("lmmrt.kernels.masked_cross_attention")
da = importlib.import_module("lmmrt.kernels.decode_attention")

# per-block shared memory a kernel may use (opt-in maximum): A100 163 KiB, H100/H200 227 KiB
SHARED_LIMIT = {80: 166912, 90: 232448}
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
HEAD_DIMS = (64, 96, 128, 160, 192, 256)
# (dtype, head dims) that must compile without register spills (the production configurations)
SPILL_FREE = {torch.bfloat16: (64, 96, 128)}
_SPILL = re.compile(r"(\d+) bytes spill stores, (\d+) bytes spill loads")
_REGS = re.compile(r"Used (\d+) registers")

launches: list[tuple[JITFunction, tuple, dict]] = []


def _record(self, *args, grid, warmup, **kwargs):
    launches.append((self, args, kwargs))


def _patch_launchers() -> None:
    JITFunction.run = _record
    for mod in (pa, mx, da):  # the GPU path's launch configuration, on an H100-sized GPU
        mod._interpreted = lambda device: False
        mod._sm_count = lambda device: 132


def _specialize(fn: JITFunction, args: tuple, kwargs: dict, cc: int):
    """What JITFunction.run derives from a launch's arguments on an sm_<cc> GPU before compiling:
    (target, options, signature, constexprs, attrs)."""
    target = GPUTarget("cuda", cc, 32)
    backend = make_backend(target)
    kwargs = dict(kwargs, debug=kwargs.get("debug", fn.debug) or knobs.runtime.debug,
                  instrumentation_mode=knobs.compilation.instrumentation_mode)
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    bound_args, specialization, options = binder(*args, **kwargs)
    return (target, *fn._pack_args(backend, kwargs, bound_args, specialization, options))


def launch_key(fn: JITFunction, args: tuple, kwargs: dict, cc: int) -> str:
    _, options, signature, constexprs, attrs = _specialize(fn, args, kwargs, cc)
    return f"{fn.__name__} {cc} {signature} {constexprs} {attrs} {options}"


def compile_as_launched(fn: JITFunction, args: tuple, kwargs: dict, cc: int):
    """Compile one recorded launch for sm_<cc> the way JITFunction.run would on that GPU.

    Returns (compiled kernel, ptxas log)."""
    target, options, signature, constexprs, attrs = _specialize(fn, args, kwargs, cc)
    src = ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs)
    log = io.StringIO()
    with knobs.nvidia.scope(), contextlib.redirect_stdout(log):
        knobs.nvidia.dump_ptxas_log = True
        compiled = triton.compile(src, target=target, options=options.__dict__)
    return compiled, log.getvalue()


def spills(ptxas_log: str) -> tuple[int, int]:
    """(spill store bytes, spill load bytes) summed over the functions in a ptxas -v log."""
    found = _SPILL.findall(ptxas_log)
    if not found:
        raise RuntimeError(f"no spill line in the ptxas log:\n{ptxas_log}")
    return sum(int(s) for s, _ in found), sum(int(ld) for _, ld in found)


def _rand(g, *shape, dtype):
    return torch.randn(*shape, generator=g).to(dtype)


def perceiver_cases(dtypes, head_dims):
    # 2 media items of 257 keys each (one image with its CLS token), 64 latents, K/V as the halves
    # of fused projections (the model's strided views), q/k LayerNorms on and off.
    g = torch.Generator().manual_seed(0)
    M, n, H, S = 2, 64, 8, 257
    for dt in dtypes:
        for dh in head_dims:
            for norm in (False, True):
                kv_m, kv_l = _rand(g, M, S, 2, H, dh, dtype=dt), _rand(g, M, n, 2, H, dh, dtype=dt)
                w = (_rand(g, dh, dtype=dt), _rand(g, dh, dtype=dt)) if norm else (None, None)
                q = _rand(g, M, n, H, dh, dtype=dt)

                def launch(q=q, kv_m=kv_m, kv_l=kv_l, w=w, dh=dh):
                    pa._perceiver_attention_launch(q, kv_m[:, :, 0], kv_m[:, :, 1], kv_l[:, :, 0], kv_l[:, :, 1],
                                                   w[0], w[1], w[0], w[1], torch.empty_like(q), 1e-5, dh**-0.5)
                yield f"perceiver qk_norm={norm}", dt, dh, launch


def xattn_cases(dtypes, head_dims):
    # 5 packed media of 64 latents; prefill (T=97) and decode (T=1, 4 forced splits: split + combine);
    # the immediate and cumulative modes, and Mllama's range mode with media_len over 4 query heads
    # sharing 1 kv head (GQA)
    g = torch.Generator().manual_seed(1)
    N, L, H = 5, 64, 4
    st, cnt = torch.tensor([0, 3], dtype=torch.int32), torch.tensor([3, 2], dtype=torch.int32)
    media_len = torch.tensor([64, 33, 1, 64, 20], dtype=torch.int32)
    for dt in dtypes:
        for dh in head_dims:
            k, v = _rand(g, N, L, H, dh, dtype=dt), _rand(g, N, L, H, dh, dtype=dt)
            k1, v1 = _rand(g, N, L, 1, dh, dtype=dt), _rand(g, N, L, 1, dh, dtype=dt)
            for mode in ("immediate", "cumulative", "range"):
                mllama = mode == "range"
                for T in (97, 1):
                    q = _rand(g, 2, T, H, dh, dtype=dt)

                    def launch(q=q, k=k1 if mllama else k, v=v1 if mllama else v, T=T, mode=mode, mllama=mllama,
                               dh=dh):
                        tt = torch.ones(2, T, dtype=torch.int32)
                        mx._masked_cross_attention_launch(
                            q, k, v, tt, tt if mllama else None, st, cnt, media_len if mllama else None,
                            torch.empty_like(q), mx._MODE_IDS[mode], dh**-0.5, 4 if T == 1 else 0)
                    yield f"xattn T={T} mode={mode}", dt, dh, launch


def decode_attention_cases(dtypes, head_dims):
    # KV-cache self-attention decode: 2 rows, 8 query heads over 2 kv heads, a 1024-slot cache seen
    # as one layer's view of a (2, 2, B, KV, S, dh) K/V tensor; the planned split count (4 here:
    # split-K + combine). ALiBi on and off in bf16 (the spill-checked dtype), on elsewhere.
    g = torch.Generator().manual_seed(2)
    B, H, KV, S = 2, 8, 2, 1024
    ks, ke = torch.tensor([0, 3]), torch.tensor([500, 1024])
    for dt in dtypes:
        for dh in head_dims:
            cache = _rand(g, 2, 2, B, KV, S, dh, dtype=dt)
            for alibi in (False, True) if dt == torch.bfloat16 else (True,):
                q = _rand(g, B, H, dh, dtype=dt)

                def launch(q=q, cache=cache, alibi=alibi, dh=dh):
                    da._decode_attention_launch(q, cache[1, 0], cache[1, 1], ks, ke, torch.rand(H) if alibi else None,
                                                torch.empty_like(q), dh**-0.5, 0)
                yield f"decode_attention alibi={alibi}", dt, dh, launch


CASE_GROUPS = [perceiver_cases, xattn_cases, decode_attention_cases]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dtype", default=",".join(DTYPES), help="comma-separated: fp16,bf16,fp32")
    ap.add_argument("--dh", default=",".join(map(str, HEAD_DIMS)), help="comma-separated head dims")
    ap.add_argument("--arch", default="80,90", help="comma-separated compute capabilities")
    a = ap.parse_args(argv)
    dtypes = [DTYPES[d] for d in a.dtype.split(",")]
    head_dims = [int(d) for d in a.dh.split(",")]
    targets = [int(c) for c in a.arch.split(",")]
    _patch_launchers()
    n, failed, seen = 0, 0, set()
    for group in CASE_GROUPS:
        for name, dt, dh, launch in group(dtypes, head_dims):
            launches.clear()
            launch()
            if not launches:
                print(f"FAIL {name} {dt} dh={dh}: no kernel was launched")
                failed += 1
            for fn, args, kwargs in launches:
                for cc in targets:
                    what = f"{name} {dt} dh={dh} {fn.__name__} sm_{cc}"
                    try:
                        key = launch_key(fn, args, kwargs, cc)
                        if key in seen:  # e.g. the combine kernel, alike in both modes
                            continue
                        seen.add(key)
                        c, log = compile_as_launched(fn, args, kwargs, cc)
                        st, ld = spills(log)
                    except Exception as e:
                        print(f"FAIL {what}: {type(e).__name__}: {e}")
                        failed += 1
                        continue
                    shared = c.metadata.shared
                    regs = _REGS.search(log)
                    line = (f"{name} {str(dt):14s} dh={dh:<3d} {fn.__name__:30s} sm_{cc} "
                            f"warps={c.metadata.num_warps} stages={c.metadata.num_stages} shared={shared} "
                            f"regs={regs.group(1) if regs else '?'} spill={st}/{ld}")
                    if shared > SHARED_LIMIT[cc]:
                        print(f"FAIL {line}: needs more shared memory than the limit {SHARED_LIMIT[cc]}")
                        failed += 1
                    elif (st or ld) and dh in SPILL_FREE.get(dt, ()):
                        print(f"FAIL {line}: register spills")
                        failed += 1
                    else:
                        n += 1
                        print(f"ok   {line}")
    print(f"{n} kernel compilations passed, {failed} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
