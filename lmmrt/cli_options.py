"""What the `lmmrt` subcommand modules share: the argparse types and options (checked without torch),
the input-file check, and the help formatter.

Only the standard library, like lmmrt.cli: the parser is built for `lmmrt --help`.
"""

from __future__ import annotations

import argparse
import errno
import math
import os
import stat

# The names lmmrt.kernels.backend.BACKENDS and lmmrt.api.parse_dtype accept, spelled out here so that the
# parser checks them without importing torch (tests/test_cli.py checks that the lists agree).
BACKEND_NAMES = ("auto", "torch", "triton", "cuda")
DTYPE_NAMES = ("float32", "fp32", "float16", "fp16", "half", "bfloat16", "bf16")


def _number(kind, rule: str, ok):
    """An argparse type: an int or a finite float for which ok(value) holds, `rule` saying what is allowed."""
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"expected {'an integer' if kind is int else 'a number'}, got {text!r}") from None
        if not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"must be a finite number {rule}, got {text}")
        if not ok(value):
            raise argparse.ArgumentTypeError(f"must be {rule}, got {text}")
        return value
    return parse


COUNT = _number(int, ">= 0", lambda v: v >= 0)
POSITIVE_INT = _number(int, ">= 1", lambda v: v >= 1)
TOKEN_ID = _number(int, "a token id >= 0", lambda v: v >= 0)


DTYPE_OPTION = dict(default=None, type=str.lower, choices=DTYPE_NAMES, metavar="float32|float16|bfloat16")
TP_OPTION = dict(type=POSITIVE_INT, default=1, metavar="N",
                 help="split the language model over N processes (tensor parallelism), one per GPU: start them "
                      "with `torchrun --nproc-per-node N -m lmmrt ...`; output is printed by rank 0 only")
# "auto" is lmmrt.load's own default; --no-cuda-graph gives a server or a script the eager step when
# capture misbehaves on some GPU or driver
CUDA_GRAPH_OPTION = dict(action=argparse.BooleanOptionalAction, default="auto",
                         help="decode with a fixed-shape step replayed as a CUDA graph (default: on CUDA when the "
                              "step's ops allow it, else eager); --no-cuda-graph: always the eager step")
BACKEND_OPTION = dict(default=None, type=str.lower, choices=BACKEND_NAMES, metavar="auto|torch|triton|cuda",
                      help="which kernels the ops use; auto: the fastest available on the device "
                           "(default: $LMMRT_BACKEND, else auto)")


def _bool(v: str) -> bool:
    if v.lower() in ("true", "1", "yes"):
        return True
    if v.lower() in ("false", "0", "no"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {v!r}")


def input_file(path: str, what: str) -> str:
    """`path` if it is a readable regular file, else an error saying what it is instead (checked before
    any model is loaded: a typo must not cost the load of a 9B checkpoint)."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        if os.path.islink(path):
            raise FileNotFoundError(f"{what} {path} is a broken symlink (to {os.readlink(path)}, "
                                    "which does not exist)") from None
        raise FileNotFoundError(f"{what} not found: {path}") from None
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise OSError(f"{what} {path} is a symlink loop: following it never reaches a file") from None
        raise OSError(f"cannot access {what} {path}: {e.strerror}") from None
    if stat.S_ISDIR(st.st_mode):
        raise IsADirectoryError(f"{what} {path} is a directory, not a file")
    if not stat.S_ISREG(st.st_mode):  # a FIFO or a device would block or never end
        raise OSError(f"{what} {path} is not a regular file")
    try:
        with open(path, "rb"):
            pass
    except OSError as e:
        raise OSError(f"cannot read {what} {path}: {e.strerror}") from None
    return path


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Appends "(default: X)" to an option's help, except where there is no default worth printing (None,
    False, an empty list: the help says in words what happens) or the help already gives it."""

    def _get_help_string(self, action):
        d = action.default
        if d is None or d is False or d == [] or d is argparse.SUPPRESS or "default" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)
