"""The one description of the CUDA kernels' launch-argument checks, for both ways of launching them:
the extension's pybind11 glue (csrc/bindings.cpp calls these before every launch) and the NVRTC
JIT (lmmrt.kernels.cuda_jit.launcher). Pure Python, no torch: pointers and strides are integers.

Each check takes exactly the arguments of the entry point of the same name, raises ValueError
naming the entry point and the argument, and returns whether there is anything to launch (False
for an empty batch / zero rows, which launch nothing). Tensor-level checks (shapes, dtypes,
devices) happen earlier, in the op files' Python wrappers.
"""

from __future__ import annotations

DTYPES = ("float32", "float16", "bfloat16")
ELEMENT_SIZE = {"float32": 4, "float16": 2, "bfloat16": 2}
DECODE_HEAD_DIMS = (64, 96, 128)
# The decode kernel moves 16-byte packs of 2-byte elements.
DECODE_VEC = 8


def _bad(fn: str, msg: str) -> ValueError:
    return ValueError(f"{fn}: {msg}")


def _dtype(fn: str, arg: str, s: str) -> str:
    if s not in DTYPES:
        raise _bad(fn, f"{arg} must be 'float32', 'float16' or 'bfloat16', got '{s}'")
    return s


def _require_ptr(fn: str, arg: str, p: int, align: int) -> None:
    if p == 0:
        raise _bad(fn, f"{arg} is a null pointer")
    if p % align:
        raise _bad(fn, f"{arg} must be {align}-byte aligned")


def masked_cross_attention_decode(out, q, k, v, text_time, media_start, media_count, workspace, *, batch, heads,
                                  head_dim, latents, num_media, q_strides, out_strides, kv_strides, index_strides,
                                  index_int64, cumulative, scale, num_splits, dtype, stream) -> bool:
    fn = "masked_cross_attention_decode"
    if _dtype(fn, "dtype", dtype) == "float32":
        raise _bad(fn, "dtype must be 'float16' or 'bfloat16' (float32 is not supported)")
    if head_dim not in DECODE_HEAD_DIMS:
        raise _bad(fn, f"head_dim must be 64, 96 or 128, got {head_dim}")
    if not 0 <= batch <= 65535:
        raise _bad(fn, f"batch must be in [0, 65535], got {batch}")
    if not 0 <= heads <= 65535:
        raise _bad(fn, f"heads must be in [0, 65535], got {heads}")
    if latents < 0 or num_media < 0:
        raise _bad(fn, "latents and num_media must be >= 0")
    if not 1 <= num_splits <= 65535:
        raise _bad(fn, f"num_splits must be in [1, 65535], got {num_splits}")
    if any(s % DECODE_VEC for s in (q_strides[0], q_strides[1], kv_strides[0], kv_strides[1])):
        raise _bad(fn, "q/k/v strides must be multiples of 8 elements (16-byte loads)")
    if batch == 0 or heads == 0:
        return False
    _require_ptr(fn, "out", out, 2)
    _require_ptr(fn, "q", q, 16)
    if num_media > 0 and latents > 0:
        _require_ptr(fn, "k", k, 16)
        _require_ptr(fn, "v", v, 16)
    _require_ptr(fn, "text_time", text_time, 8 if index_int64[0] else 4)
    _require_ptr(fn, "media_start", media_start, 8 if index_int64[1] else 4)
    _require_ptr(fn, "media_count", media_count, 8 if index_int64[2] else 4)
    if num_splits > 1:
        _require_ptr(fn, "workspace", workspace, 4)
    return True


def fused_norm(out, h_out, x, residual, weight, bias, *, rows, dim, eps, layer_norm, dtype, weight_dtype,
               stream) -> bool:
    fn = "fused_norm"
    dt, wdt = _dtype(fn, "dtype", dtype), _dtype(fn, "weight_dtype", weight_dtype)
    if wdt not in (dt, "float32"):
        raise _bad(fn, "weight_dtype must equal dtype or be 'float32'")
    if not 0 <= rows <= 0x7FFFFFFF:
        raise _bad(fn, f"rows must be in [0, 2^31), got {rows}")
    if dim < 1:
        raise _bad(fn, f"dim must be >= 1, got {dim}")
    if (residual == 0) != (h_out == 0):
        raise _bad(fn, "residual and h_out must be given together")
    if bias != 0 and not layer_norm:
        raise _bad(fn, "bias is only valid with layer_norm=True")
    if rows == 0:
        return False
    a, aw = ELEMENT_SIZE[dt], ELEMENT_SIZE[wdt]
    _require_ptr(fn, "out", out, a)
    _require_ptr(fn, "x", x, a)
    _require_ptr(fn, "weight", weight, aw)
    if residual:
        _require_ptr(fn, "residual", residual, a)
        _require_ptr(fn, "h_out", h_out, a)
    if bias:
        _require_ptr(fn, "bias", bias, aw)
    return True


def gated_residual(out, x, branch, gate, *, numel, dim, gate_numel, dtype, gate_dtype, stream) -> bool:
    fn = "gated_residual"
    dt, gdt = _dtype(fn, "dtype", dtype), _dtype(fn, "gate_dtype", gate_dtype)
    if gdt not in (dt, "float32"):
        raise _bad(fn, "gate_dtype must equal dtype or be 'float32'")
    if dim < 1:
        raise _bad(fn, f"dim must be >= 1, got {dim}")
    if numel < 0 or numel % dim:
        raise _bad(fn, "numel must be a non-negative multiple of dim")
    if gate_numel not in (1, dim):
        raise _bad(fn, f"gate must hold 1 or dim ({dim}) elements, got {gate_numel}")
    if numel == 0:
        return False
    a = ELEMENT_SIZE[dt]
    _require_ptr(fn, "out", out, a)
    _require_ptr(fn, "x", x, a)
    _require_ptr(fn, "branch", branch, a)
    _require_ptr(fn, "gate", gate, ELEMENT_SIZE[gdt])
    return True
