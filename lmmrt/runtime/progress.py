"""The progress bars lmmrt shows while it loads or converts weights."""

from __future__ import annotations

import sys


def progress_bar(iterable=None, *, say_when_hidden: bool = False, **options):
    """tqdm over `iterable` (tqdm's `options`: desc, unit, total), drawn only when its stream (stderr) is a
    terminal. Redirected to a file or a pipe, a bar's carriage-return updates pile up as dozens of bars on
    one line of the log (`lmmrt generate CKPT -p hi 2>log`); tqdm's disable=None leaves them out there.
    say_when_hidden: for long work (a conversion), a log still gets one plain line when it starts
    ("converting 1,234 tensors ..."), so that minutes of silence do not read as a hang."""
    from tqdm import tqdm

    bar = tqdm(iterable, disable=None, **options)
    if bar.disable and say_when_hidden:
        total = options.get("total", len(iterable) if hasattr(iterable, "__len__") else None)
        what = f" {total:,} {options.get('unit', 'it')}s" if total is not None else ""
        print(f"{options.get('desc', 'working')}{what} ...", file=sys.stderr, flush=True)
    return bar
