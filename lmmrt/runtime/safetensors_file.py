"""Reading an lmmrt model.safetensors one tensor at a time, each straight into its final dtype and
device, with every problem named: the file, the keys, the reason.

The tensor bytes are read with plain file reads into a tensor of the stored dtype, not through a
memory map: pages of a mapped file count in the process's resident memory while the map is open,
so a mapped read of the whole file would double the peak of a load. The header is checked by
safetensors itself first (offsets, sizes, truncation); only its offsets are then read from JSON.
"""

from __future__ import annotations

import errno
import json
import os
import struct
import warnings
from pathlib import Path

import torch

from lmmrt.errors import CheckpointError

# Stored dtype (safetensors' name) -> torch dtype, for the float types a model can be loaded from.
FLOAT_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}
# The dtype a model loads in when none is asked for, per stored dtype: float64 runs as float32
# (no kernel of lmmrt takes float64); the others as stored.
LOAD_DTYPE = {"F64": torch.float32, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}
_READ_CHUNK = 1 << 26


def why_missing(path: Path) -> str | None:
    """Why `path` cannot be reached, in words (None when it can): a symlink loop or a broken link
    is not a missing file, and saying so points at the real problem."""
    try:
        os.stat(path)
    except OSError as e:
        if e.errno == errno.ELOOP:
            return f"{path} is a symbolic link loop"
        if path.is_symlink():
            return f"{path} is a broken symbolic link (to {os.readlink(path)})"
        if e.errno == errno.ENOENT:
            return f"{path} does not exist"
        return f"cannot read {path}: {e.strerror}"
    return None


def check_readable(path: Path) -> None:
    """FileNotFoundError when the file is not there (saying why), CheckpointError when it is there
    but cannot be read (a directory, no permission, ...)."""
    reason = why_missing(path)
    if reason is not None:
        raise FileNotFoundError(f"no weights file at {path}" if reason.endswith("does not exist") else reason)
    try:
        with open(path, "rb") as fh:
            fh.read(1)
    except OSError as e:
        raise CheckpointError(f"cannot read {path}: {e.strerror or e}") from None


class SafetensorsFile:
    """The header of a safetensors file (keys, stored dtypes, shapes) and per-tensor reads."""

    def __init__(self, path: str | Path):
        from safetensors import safe_open

        self.path = Path(path)
        check_readable(self.path)
        try:
            # safetensors validates the header (offsets inside the file, no overlap, no truncation)
            with safe_open(str(self.path), framework="pt") as f:
                self.metadata = f.metadata() or {}
            with open(self.path, "rb") as fh:
                (n,) = struct.unpack("<Q", fh.read(8))
                header = json.loads(fh.read(n))
        except OSError as e:
            raise CheckpointError(f"cannot read {self.path}: {e.strerror or e}") from None
        except Exception as e:  # safetensors raises its own SafetensorError for a bad header
            raise CheckpointError(f"{self.path} is not a readable safetensors file "
                                  f"(truncated or corrupted?): {e}") from None
        header.pop("__metadata__", None)
        self._data_start = 8 + n
        self.entries = {k: (v["dtype"], tuple(v["shape"]), tuple(v["data_offsets"])) for k, v in header.items()}

    def keys(self) -> list[str]:
        return list(self.entries)

    def shapes(self) -> dict[str, tuple[int, ...]]:
        return {k: shape for k, (_, shape, _) in self.entries.items()}

    def check_float(self) -> None:
        """Refuse integer, bool and other non-float tensors: cast to float they would load as
        numbers that were never weights (an all-int32 file "generates" zeros)."""
        bad: dict[str, list[str]] = {}
        for k, (dt, _, _) in self.entries.items():
            if dt not in FLOAT_DTYPES:
                bad.setdefault(dt, []).append(k)
        if bad:
            parts = [f"{dt} ({len(ks)}): " + ", ".join(sorted(ks)[:8]) + (" ..." if len(ks) > 8 else "")
                     for dt, ks in sorted(bad.items())]
            raise CheckpointError(f"{self.path}: weights must be floating point (F32, F16, BF16 or F64); "
                                  f"these are not: " + "; ".join(parts))

    def load_dtype(self) -> torch.dtype:
        """The dtype to load in when none is asked for: the stored one. A file that mixes float
        dtypes loads in the dtype that holds most of its elements (ties: the wider), with a warning
        that names the keys in the other dtypes; pass dtype= to choose."""
        counts: dict[str, int] = {}
        for dt, shape, _ in self.entries.values():
            counts[dt] = counts.get(dt, 0) + _numel(shape)
        if not counts:
            return torch.float32
        width = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2}
        order = sorted(counts, key=lambda dt: (counts[dt], width[dt], dt), reverse=True)
        chosen = order[0]
        if len(order) > 1:
            others = sorted(k for k, (dt, _, _) in self.entries.items() if dt != chosen)
            warnings.warn(f"{self.path} mixes float dtypes ({', '.join(f'{dt}: {counts[dt]} elements' for dt in order)});"
                          f" loading as {LOAD_DTYPE[chosen]}, the dtype of most weights. Keys in other dtypes "
                          f"({len(others)}): {', '.join(others[:8])}{' ...' if len(others) > 8 else ''}. "
                          f"Pass dtype= (--dtype) to choose.", stacklevel=3)
        return LOAD_DTYPE[chosen]

    def read(self, fh, key: str, *, device, dtype: torch.dtype) -> torch.Tensor:
        """Tensor `key` from the open file `fh`, in `dtype` on `device`: read into a tensor of the
        stored dtype, converted (one transient copy of this tensor only) when the dtype differs."""
        dt, shape, (begin, end) = self.entries[key]
        stored = torch.empty(shape, dtype=FLOAT_DTYPES[dt])
        nbytes = end - begin
        if nbytes != stored.numel() * stored.element_size():
            raise CheckpointError(f"{self.path}: tensor {key!r} has {nbytes} bytes for shape {shape} {dt}")
        if nbytes:
            buf = memoryview(stored.reshape(-1).view(torch.uint8).numpy())
            fh.seek(self._data_start + begin)
            done = 0
            while done < nbytes:
                got = fh.readinto(buf[done:done + _READ_CHUNK])
                if not got:
                    raise CheckpointError(f"{self.path}: tensor {key!r} cannot be read (file truncated?)")
                done += got
        return stored.to(device=device, dtype=dtype)


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= s
    return n
