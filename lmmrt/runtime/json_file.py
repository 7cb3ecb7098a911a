"""Reading the JSON files of checkpoints and their sources, with errors that name the file.

json.loads raises plain ValueErrors that name nothing: a syntax error, bytes that are not UTF-8, or an
integer literal longer than Python converts (4300 digits), which a hostile config.json can hold.
"""

from __future__ import annotations

import json
from pathlib import Path

from lmmrt.errors import CheckpointError


def read_json(path: str | Path):
    """The JSON value in the file `path`. OSError passes through (the caller says what is missing); any
    content problem is a CheckpointError naming the file."""
    path = Path(path)
    data = path.read_bytes()
    try:
        return json.loads(data.decode("utf-8"))
    except UnicodeDecodeError as e:
        raise CheckpointError(f"{path} is not valid JSON: not UTF-8 text ({e})") from None
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path} is not valid JSON: {e}") from None
    except ValueError as e:  # e.g. "Exceeds the limit (4300 digits) for integer string conversion"
        raise CheckpointError(f"{path} holds a value Python cannot read: {e}") from None
    except RecursionError:
        raise CheckpointError(f"{path} nests its JSON too deeply to read") from None
