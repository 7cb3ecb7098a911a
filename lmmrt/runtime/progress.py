"""The progress bars lmmrt shows while it loads or converts weights."""

from __future__ import annotations


def progress_bar(iterable=None, **options):
    """tqdm over `iterable` (tqdm's `options`: desc, unit, total), drawn only when its stream (stderr) is a
    terminal. Redirected to a file or a pipe, a bar's carriage-return updates pile up as dozens of bars on
    one line of the log (`lmmrt generate CKPT -p hi 2>log`); tqdm's disable=None leaves them out there."""
    from tqdm import tqdm

    return tqdm(iterable, disable=None, **options)
