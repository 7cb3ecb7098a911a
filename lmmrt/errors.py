"""lmmrt's own exception types, in a module of their own so that the config, the weights loader
and the converters can all raise them without importing one another."""

from __future__ import annotations


class CheckpointError(ValueError):
    """A checkpoint (config.json, weights or tokenizer) that lmmrt cannot use; the message names
    the file and what is wrong with it (the key, the field)."""


class ConfigError(CheckpointError):
    """A config field with the wrong type, sign or range, or fields that contradict each other."""
