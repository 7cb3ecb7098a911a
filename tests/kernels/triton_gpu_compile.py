"""Compile every Triton kernel for real GPUs (sm_80, sm_90) without one.

The interpreter checks what the kernels compute, not whether they compile for a GPU (tile shapes,
dot operand layouts, shared memory). This script runs each launcher with CPU tensors and the launch
configuration the GPU path would choose (an H100's 132 SMs), records every kernel launch instead
of running it, and compiles the recorded signature ahead of time with triton.compile for each
target, checking the shared memory each kernel needs against the target's per-block limit.
Run as a separate process: TRITON_INTERPRET must be unset when the kernels are defined.
Prints one line per compiled kernel and exits non-zero on the first failure.
"""

from __future__ import annotations

import os
import sys

os.environ.pop("TRITON_INTERPRET", None)

import importlib  # noqa: E402

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402
from triton.runtime.jit import JITFunction  # noqa: E402

# (the package re-exports functions of the same names as these modules: import the modules)
pa = importlib.import_module("lmmrt.kernels.perceiver_attention")
mx = importlib.import_module("lmmrt.kernels.masked_cross_attention")

# per-block shared memory a kernel may use (opt-in maximum): A100 163 KiB, H100 227 KiB
SHARED_LIMIT = {80: 166912, 90: 232448}
TYPES = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32", torch.int32: "i32",
         torch.int64: "i64", torch.bool: "i1"}

launches: list[tuple[JITFunction, list, dict, dict]] = []


def _record(self, *args, grid, warmup, **kwargs):
    opts = {k: kwargs.pop(k) for k in ("num_warps", "num_stages") if k in kwargs}
    launches.append((self, list(args), kwargs, opts))


JITFunction.run = _record
for mod in (pa, mx):  # the GPU path's launch configuration, on an H100-sized GPU
    mod._interpreted = lambda device: False
    mod._sm_count = lambda device: 132


def _signature(fn: JITFunction, args: list, kwargs: dict):
    sig, constexprs = {}, {}
    values = dict(zip(fn.arg_names, args))
    values.update(kwargs)
    for p in fn.params:
        v = values[p.name]
        if p.is_constexpr:
            sig[p.name] = "constexpr"
            constexprs[p.name] = v
        elif isinstance(v, torch.Tensor):
            sig[p.name] = "*" + TYPES[v.dtype]
        elif isinstance(v, bool):
            sig[p.name] = "i1"
        elif isinstance(v, int):
            sig[p.name] = "i32" if -2**31 <= v < 2**31 else "i64"
        elif isinstance(v, float):
            sig[p.name] = "fp32"
        else:
            raise TypeError(f"{fn.__name__}: cannot type argument {p.name}={v!r}")
    return sig, constexprs


def _cases():
    g = torch.Generator().manual_seed(0)
    r = lambda *s, dt: torch.randn(*s, generator=g).to(dt)
    for dt in (torch.float16, torch.bfloat16, torch.float32):
        for dh in (64, 96, 128):
            # Perceiver: 2 media items (one image and an 8-frame clip's worth of keys), q/k norms on/off
            for norm in (False, True):
                M, n, H, S = 2, 64, 8, 257
                kv_m, kv_l = r(M, S, 2, H, dh, dt=dt), r(M, n, 2, H, dh, dt=dt)
                w = (r(dh, dt=dt), r(dh, dt=dt)) if norm else (None, None)
                yield f"perceiver {dt} dh={dh} qk_norm={norm}", lambda kv_m=kv_m, kv_l=kv_l, w=w, dt=dt, dh=dh: \
                    pa._perceiver_attention_launch(r(2, 64, 8, dh, dt=dt), kv_m[:, :, 0], kv_m[:, :, 1],
                                                   kv_l[:, :, 0], kv_l[:, :, 1], w[0], w[1], w[0], w[1],
                                                   torch.empty(2, 64, 8, dh, dtype=dt), 1e-5, dh**-0.5)
            for cumulative in (False, True):
                N, L, H = 5, 64, 4
                k, v = r(N, L, H, dh, dt=dt), r(N, L, H, dh, dt=dt)
                st, cnt = torch.tensor([0, 3], dtype=torch.int32), torch.tensor([3, 2], dtype=torch.int32)
                for T in (97, 1):  # prefill, then decode (split-K + combine)
                    yield f"xattn {dt} dh={dh} T={T} cumulative={cumulative}", \
                        lambda T=T, k=k, v=v, st=st, cnt=cnt, cumulative=cumulative, dt=dt, dh=dh: \
                        mx._masked_cross_attention_launch(
                            r(2, T, 4, dh, dt=dt), k, v, torch.ones(2, T, dtype=torch.int32), st, cnt,
                            torch.empty(2, T, 4, dh, dtype=dt), cumulative, dh**-0.5, 4 if T == 1 else 0)


def main(targets=(80, 90)) -> int:
    n = 0
    for name, launch in _cases():
        launches.clear()
        launch()
        assert launches, f"{name}: no kernel was launched"
        for fn, args, kwargs, opts in launches:
            sig, constexprs = _signature(fn, args, kwargs)
            for cc in targets:
                try:
                    c = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=constexprs),
                                       target=GPUTarget("cuda", cc, 32), options=opts)
                except Exception as e:
                    print(f"FAIL {name} {fn.__name__} sm_{cc}: {type(e).__name__}: {e}")
                    return 1
                shared = c.metadata.shared
                if shared > SHARED_LIMIT[cc]:
                    print(f"FAIL {name} {fn.__name__} sm_{cc}: needs {shared} B of shared memory, "
                          f"the limit is {SHARED_LIMIT[cc]}")
                    return 1
                n += 1
                print(f"ok   {name:45s} {fn.__name__:32s} sm_{cc} warps={opts.get('num_warps')} "
                      f"stages={opts.get('num_stages')} shared={shared}")
    print(f"{n} kernel compilations passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
