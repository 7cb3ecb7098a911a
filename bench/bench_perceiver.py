"""Perceiver Resampler attention microbenchmark (lmmrt.kernels.perceiver_attention).

Shapes (flamingo.md §3): per media item, n = 64 latent queries attend to [F*v media tokens ;
n latents], h heads of dh. OpenFlamingo-9B: Dv 1024, 8 x 64, v = 256 patch tokens; IDEFICS-9B:
Dv 1280, 16 x 96, v = 257 tokens (class token included; the 9B checkpoint has no q/k norms).
M in {1, 8, 32} media items, F in {1, 8} frames (kv length F*v + 64).

Implementations, all on the same rotating inputs (q contiguous; k/v as the strided halves of a
fused kv projection, as the model hands them over):
- eager: lmmrt's torch backend, the plain-PyTorch reference (concatenates, computes in fp32);
- sdpa-concat: torch.cat of the two sources, then F.scaled_dot_product_attention in the input dtype;
- compile: torch.compile of the reference;
- triton / cuda: lmmrt kernels registered for the op (GPU only: on the CPU the Triton interpreter
  is far too slow to time).

Work per call (what "useful" means for every implementation alike):
  FLOPs = 4 * M * h * n * (S + n) * dh         (q.k^T and p.v, 2 FLOPs per multiply-add; S = F*v)
  bytes = e * M * h * dh * (n + n + 2*S + 2*n)  (read q, write out, read k/v media, read k/v latents;
                                                 e = element size; each operand touched once)
Softmax and the optional q/k LayerNorms are not counted.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from bench.harness import BenchRun, Impl, rotation_sets

MODELS = {
    "openflamingo-9b": dict(dv=1024, heads=8, head_dim=64, tokens=256, n_latents=64, qk_norm=False),
    "idefics-9b": dict(dv=1280, heads=16, head_dim=96, tokens=257, n_latents=64, qk_norm=False),
}
MEDIA, FRAMES = (1, 8, 32), (1, 8)
SMOKE_MODELS = {
    "openflamingo-tiny": dict(dv=32, heads=2, head_dim=16, tokens=16, n_latents=8, qk_norm=False),
    "idefics-tiny": dict(dv=48, heads=2, head_dim=24, tokens=17, n_latents=8, qk_norm=True),
}
SMOKE_MEDIA, SMOKE_FRAMES = (1, 3), (1, 2)

FORMULAS = {
    "flops": "4 * M * heads * n_latents * (S + n_latents) * head_dim, S = frames * tokens",
    "bytes": "elem * M * heads * head_dim * (4 * n_latents + 2 * S): q, out, k/v media, k/v latents once each",
}


def work(M: int, S: int, n: int, H: int, dh: int, elem: int) -> tuple[float, float]:
    flops = 4.0 * M * H * n * (S + n) * dh
    nbytes = float(elem) * M * H * dh * (4 * n + 2 * S)
    return flops, nbytes


def make_inputs(spec: dict, M: int, F_: int, dtype, device, n_sets: int) -> list[tuple]:
    H, dh, n, S = spec["heads"], spec["head_dim"], spec["n_latents"], F_ * spec["tokens"]
    norms = (None, None)
    if spec["qk_norm"]:
        norms = tuple((1 + 0.1 * torch.randn(dh, device=device, dtype=dtype), 0.1 * torch.randn(dh, device=device, dtype=dtype))
                      for _ in range(2))
    sets = []
    for _ in range(n_sets):
        q = torch.randn(M, n, H, dh, device=device, dtype=dtype)
        kv_m = torch.randn(M, S, 2, H, dh, device=device, dtype=dtype)
        kv_l = torch.randn(M, n, 2, H, dh, device=device, dtype=dtype)
        sets.append((q, kv_m[:, :, 0], kv_m[:, :, 1], kv_l[:, :, 0], kv_l[:, :, 1], *norms))
    return sets


def sdpa_concat(q, km, vm, kl, vl, qn, kn, eps: float = 1e-5):
    """The baseline a framework would write: materialize [media ; latents], then SDPA."""
    dh = q.shape[-1]
    k, v = torch.cat([km, kl], dim=1), torch.cat([vm, vl], dim=1)
    if qn is not None:
        q = F.layer_norm(q, (dh,), qn[0], qn[1], eps)
    if kn is not None:
        k = F.layer_norm(k, (dh,), kn[0], kn[1], eps)
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
    return out.transpose(1, 2)


def lmmrt_backends(op: str, device: torch.device, exclude=()) -> list[str]:
    """Kernel backends registered for `op` that really run on this device (not a fallback)."""
    from lmmrt.kernels import backend as _backend

    if device.type != "cuda":
        return []
    return [b for b in ("triton", "cuda") if b not in exclude and b in _backend.available(op)
            and _backend.resolve_name(op, b, device) == b]


def impls(device: torch.device, *, use_compile: bool) -> list[Impl]:
    from lmmrt.kernels.perceiver_attention import perceiver_attention, perceiver_attention_reference

    def lm(backend):
        return lambda q, km, vm, kl, vl, qn, kn: perceiver_attention(q, km, vm, kl, vl, q_norm=qn, k_norm=kn,
                                                                     backend=backend)

    # eager first (the reference every other row is compared with), then the kernels, so a
    # slow torch.compile cannot push them out of the time budget.
    out = [Impl("eager", lm("torch"), graph=True)]
    out += [Impl(b, lm(b), kind="lmmrt", graph=True) for b in lmmrt_backends("perceiver_attention", device)]
    out.append(Impl("sdpa-concat", sdpa_concat, graph=True))
    if use_compile:
        compiled = torch.compile(perceiver_attention_reference)
        out.append(Impl("compile", lambda q, km, vm, kl, vl, qn, kn: compiled(q, km, vm, kl, vl, q_norm=qn, k_norm=kn),
                        compiled=True))
    return out


def run(*, device: torch.device, dtype: torch.dtype, out_dir: Path, smoke: bool, budget_s: float,
        ceilings: dict | None = None, use_compile: bool = True) -> dict:
    torch.manual_seed(0)
    b = BenchRun("perceiver", device=device, dtype=dtype, smoke=smoke, out_dir=out_dir, budget_s=budget_s,
                 ceilings=ceilings, formulas=FORMULAS, description=__doc__.split("\n\n")[0])
    models, media, frames = (SMOKE_MODELS, SMOKE_MEDIA, SMOKE_FRAMES) if smoke else (MODELS, MEDIA, FRAMES)
    if device.type != "cuda":
        b.notes.append("CPU run: triton/cuda backends not timed (the Triton interpreter is too slow to time)")
    imps = impls(device, use_compile=use_compile)
    elem = torch.tensor([], dtype=dtype).element_size()
    for M in media:
        for F_ in frames:
            for name, spec in models.items():
                S, n, H, dh = F_ * spec["tokens"], spec["n_latents"], spec["heads"], spec["head_dim"]
                flops, nbytes = work(M, S, n, H, dh, elem)
                shape = dict(model=name, media=M, frames=F_, kv_len=S + n, heads=H, head_dim=dh, n_latents=n,
                             qk_norm=spec["qk_norm"])
                label = f"{name} M={M} F={F_}"
                if b.elapsed > budget_s:
                    b.skip_case("attention", label, shape, [i.name for i in imps], "time budget spent")
                    continue
                sets = rotation_sets(nbytes, device, smoke=smoke)
                inputs = make_inputs(spec, M, F_, dtype, device, sets)
                b.case("attention", label, shape, imps, inputs, flops, nbytes)
                del inputs
    return b.finish()


if __name__ == "__main__":
    import sys

    from bench.run import main

    sys.exit(main(["--only", "perceiver", *sys.argv[1:]]))
