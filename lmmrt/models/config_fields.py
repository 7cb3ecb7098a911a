"""Checks for single config fields: type, sign and range, each failure a ConfigError naming the field.

JSON gives ints, floats, bools, strings, lists and null; these checks are strict about them (a bool
is not an int, "true" is not a bool, 2.0 is not an int) because a config that says something odd
is more likely broken than meant, and every later use assumes the exact type.
"""

from __future__ import annotations

import dataclasses
import math
import numbers

from lmmrt.errors import ConfigError

# Upper bounds far above any released model (IDEFICS-80B: dim 8192, 80 layers, vocab 32k) that
# stop a corrupted or hostile config.json from asking for an absurd model before anything is built.
MAX_DIM = 1 << 16
MAX_LAYERS = 1024
MAX_VOCAB = 1 << 22
MAX_SEQ_LEN = 1 << 22
MAX_IMAGE_SIZE = 8192
MAX_MEDIA_TOKENS = 1 << 16


def _show(value) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def integer(value, name: str, *, lo: int, hi: int) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ConfigError(f"{name} = {_show(value)}: must be an integer (got {type(value).__name__})")
    value = int(value)
    if not lo <= value <= hi:
        raise ConfigError(f"{name} = {value}: must be between {lo} and {hi}")
    return value


def optional_integer(value, name: str, *, lo: int, hi: int) -> int | None:
    return None if value is None else integer(value, name, lo=lo, hi=hi)


def real(value, name: str, *, lo: float | None = None, hi: float | None = None, lo_open: bool = False) -> float:
    """A finite float (an int is accepted: JSON writes 1.0 as 1 sometimes); lo_open excludes lo."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ConfigError(f"{name} = {_show(value)}: must be a number (got {type(value).__name__})")
    value = float(value)
    if not math.isfinite(value):
        raise ConfigError(f"{name} = {value}: must be a finite number")
    if lo is not None and (value <= lo if lo_open else value < lo):
        raise ConfigError(f"{name} = {value}: must be {'>' if lo_open else '>='} {lo}")
    if hi is not None and value > hi:
        raise ConfigError(f"{name} = {value}: must be <= {hi}")
    return value


def boolean(value, name: str) -> bool:
    if not isinstance(value, bool):
        raise ConfigError(f"{name} = {_show(value)}: must be true or false (got {type(value).__name__})")
    return value


def choice(value, name: str, choices) -> str:
    if not isinstance(value, str) or value not in choices:
        raise ConfigError(f"{name} = {_show(value)}: must be one of {', '.join(sorted(choices))}")
    return value


def text(value, name: str, *, nonempty: bool = True) -> str:
    if not isinstance(value, str):
        raise ConfigError(f"{name} = {_show(value)}: must be a string (got {type(value).__name__})")
    if nonempty and not value:
        raise ConfigError(f"{name}: must not be empty")
    return value


def integer_list(value, name: str, *, lo: int, hi: int, max_len: int) -> list[int]:
    if not isinstance(value, (list, tuple)):
        raise ConfigError(f"{name} = {_show(value)}: must be a list of integers (got {type(value).__name__})")
    if len(value) > max_len:
        raise ConfigError(f"{name}: {len(value)} entries, at most {max_len} allowed")
    return [integer(v, f"{name}[{i}]", lo=lo, hi=hi) for i, v in enumerate(value)]


def real_triple(value, name: str, *, positive: bool) -> tuple[float, float, float]:
    """Per-channel image statistics: three finite numbers (all > 0 for a divisor)."""
    if not isinstance(value, (list, tuple)) or len(value) != 3:
        raise ConfigError(f"{name} = {_show(value)}: must be three numbers (one per RGB channel)")
    return tuple(real(v, f"{name}[{i}]", lo=0.0 if positive else None, lo_open=positive)
                 for i, v in enumerate(value))


def check_known_fields(d: dict, klass, *, part: str | None = None) -> None:
    """A ConfigError naming the keys of `d` that are not fields of the dataclass `klass` (a typo must not
    be silently dropped); `part` names the sub-config they were found in."""
    unknown = set(d) - {f.name for f in dataclasses.fields(klass)}
    if unknown:
        raise ConfigError(f"unknown {part + ' ' if part else ''}fields {sorted(unknown)}")


class JsonConfig:
    """to_dict / from_dict of a top-level config dataclass (ModelConfig, ClipConfig); each subclass builds
    itself from a copy of the parsed JSON object in `_from_dict`."""

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d, *, where: str = "config.json"):
        """A config from parsed config.json; every problem is a ConfigError that starts with `where`."""
        try:
            if not isinstance(d, dict):
                raise ConfigError(f"must hold a JSON object of config fields, not {type(d).__name__}")
            return cls._from_dict(dict(d))
        except ConfigError as e:
            raise ConfigError(f"{where}: {e}") from None
