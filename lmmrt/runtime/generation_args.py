"""Checking and normalizing the generation options of lmmrt.generate before any work is done.

Each option gets lmmrt's own error naming it (TypeError for a wrong type, ValueError for a value out
of range), never a raw torch or Python error from deep inside sampling. numpy integer and float
scalars are accepted where Python ones are; bools are not numbers here (`top_k=True` is a mistake).
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass

import numpy as np
import torch

_SEED_LIMIT = 2**63  # torch.Generator.manual_seed takes a signed 64-bit seed


@dataclass(frozen=True)
class GenerationArgs:
    max_new_tokens: int
    temperature: float
    top_k: int
    top_p: float
    repetition_penalty: float
    seed: int | None
    stop_strings: tuple[str, ...]  # non-empty strings; the text is cut before the first one found
    stop_ids: frozenset[int]  # stop_token_ids plus, unless ignore_eos, the model's eos and stop tokens
    ignore_eos: bool


def _is_int(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _int(name: str, value) -> int:
    if not _is_int(value):
        raise TypeError(f"{name} must be an int, got {value!r} ({type(value).__name__})")
    return int(value)


def _real(name: str, value) -> float:
    if not isinstance(value, numbers.Real) or isinstance(value, bool):
        raise TypeError(f"{name} must be a real number, got {value!r} ({type(value).__name__})")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")
    return value


def _stop_strings(stop) -> tuple[str, ...]:
    if stop is None:
        return ()
    if isinstance(stop, str):
        stop = [stop]
    if not isinstance(stop, (list, tuple)) or not all(isinstance(s, str) for s in stop):
        raise TypeError(f"stop must be a string or a list of strings, got {stop!r}")
    if not all(stop):  # "" is found everywhere: it would cut every answer to nothing
        raise ValueError(f"stop strings must be non-empty, got {list(stop)!r}")
    return tuple(stop)


def _is_integer_array(x) -> bool:
    """A 0-D or 1-D numpy array or torch tensor of integers (the form token ids often arrive in)."""
    if isinstance(x, torch.Tensor):
        return x.dim() <= 1 and not (x.is_floating_point() or x.is_complex() or x.dtype == torch.bool)
    return isinstance(x, np.ndarray) and x.ndim <= 1 and x.dtype.kind in "iu"


def _stop_token_ids(stop_token_ids, vocab: int) -> list[int]:
    if stop_token_ids is None:
        return []
    if _is_int(stop_token_ids):
        stop_token_ids = [stop_token_ids]
    if _is_integer_array(stop_token_ids):
        stop_token_ids = stop_token_ids.reshape(-1).tolist()
    if not isinstance(stop_token_ids, (list, tuple)) or not all(_is_int(t) for t in stop_token_ids):
        raise TypeError(f"stop_token_ids must be an int or a list of ints (token ids), got {stop_token_ids!r}; "
                        "to stop at a piece of text use stop=")
    ids = [int(t) for t in stop_token_ids]
    bad = [t for t in ids if not 0 <= t < vocab]
    if bad:
        raise ValueError(f"stop_token_ids {bad} are outside the vocabulary [0, {vocab})")
    return ids


def check_generation_args(model, *, max_new_tokens=64, temperature=0.0, top_k=0, top_p=1.0,
                          repetition_penalty=1.0, stop=None, stop_token_ids=None, ignore_eos=False,
                          seed=None) -> GenerationArgs:
    """The options of lmmrt.generate, checked against `model` (vocabulary, tokenizer) and normalized."""
    max_new_tokens = _int("max_new_tokens", max_new_tokens)
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    top_k = _int("top_k", top_k)
    temperature = _real("temperature", temperature)
    top_p = _real("top_p", top_p)
    repetition_penalty = _real("repetition_penalty", repetition_penalty)
    bad = [f"{name}={value} (must be {rule})" for name, value, ok, rule in (
        ("temperature", temperature, temperature >= 0, ">= 0"), ("top_k", top_k, top_k >= 0, ">= 0"),
        ("top_p", top_p, 0 < top_p <= 1, "in (0, 1]"),
        ("repetition_penalty", repetition_penalty, repetition_penalty > 0, "> 0")) if not ok]
    if bad:
        raise ValueError("bad sampling option(s): " + ", ".join(bad))
    if seed is not None:
        seed = _int("seed", seed)
        if not 0 <= seed < _SEED_LIMIT:
            raise ValueError(f"seed must be in [0, 2**63), got {seed}")
    if not isinstance(ignore_eos, bool):
        raise TypeError(f"ignore_eos must be True or False, got {ignore_eos!r}")
    cfg = model.config
    ids = set(_stop_token_ids(stop_token_ids, cfg.decoder.vocab_size))
    if not ignore_eos:
        if cfg.eos_token_id is not None:
            ids.add(cfg.eos_token_id)
        ids.update(cfg.stop_token_ids)
    strings = _stop_strings(stop)
    if strings and model.tokenizer is None:
        raise ValueError("stop strings need a tokenizer; this model has none (use stop_token_ids)")
    return GenerationArgs(max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                          repetition_penalty=repetition_penalty, seed=seed, stop_strings=strings,
                          stop_ids=frozenset(ids), ignore_eos=ignore_eos)
