"""The progress bars of loading and converting: drawn on a terminal, left out when stderr is a file or a pipe,
where their carriage-return updates piled up as dozens of bars on one line of the log."""

from __future__ import annotations

import io
import re
import sys
from pathlib import Path

import pytest

import lmmrt
from lmmrt.cli import main


class Terminal(io.StringIO):
    """stderr as a terminal (tqdm draws its bar only where isatty() says so)."""

    def isatty(self) -> bool:
        return True


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    from lmmrt.demo import save_demo

    return save_demo(tmp_path_factory.mktemp("progress") / "demo")


@pytest.mark.parametrize("tty", [True, False])
def test_load_draws_its_bar_on_a_terminal_only(ckpt, monkeypatch, tty):
    stderr = Terminal() if tty else io.StringIO()
    monkeypatch.setattr(sys, "stderr", stderr)
    lmmrt.load(ckpt, device="cpu", progress=True)
    drawn = stderr.getvalue()
    if tty:
        assert f"loading {ckpt.name}" in drawn and "\r" in drawn, drawn
    else:
        assert drawn == "", drawn


def test_generate_with_stderr_to_a_file_writes_no_bar(ckpt, capsys):
    """`lmmrt generate CKPT -p hi 2>log`: the log holds the summary line, not the load's bar."""
    assert main(["generate", str(ckpt), "-p", "hi", "--max-new-tokens", "2", "--device", "cpu"]) == 0
    err = capsys.readouterr().err
    assert "\r" not in err and "loading" not in err, err
    assert err.count("\n") == 1 and err.startswith("[length: 2 tokens"), err


@pytest.mark.filterwarnings("ignore:.*has no tokenizer.json")  # the tiny model has none, on purpose
@pytest.mark.parametrize("tty", [True, False])
def test_convert_draws_its_bar_on_a_terminal_only(tmp_path, monkeypatch, tty):
    pytest.importorskip("transformers")
    from llava_util import tiny_llava

    from lmmrt.convert.llava import convert_llava

    tiny_llava(seed=1).save_pretrained(tmp_path / "src")
    stderr = Terminal() if tty else io.StringIO()
    monkeypatch.setattr(sys, "stderr", stderr)
    convert_llava(tmp_path / "src", tmp_path / "out", progress=True)
    drawn = stderr.getvalue()
    if tty:
        assert "converting" in drawn and "\r" in drawn, drawn
    else:  # one plain line when the work starts, so a log is not silent for minutes
        assert re.fullmatch(r"converting [\d,]+ tensors \.\.\.\n", drawn), drawn


def test_every_bar_lmmrt_draws_goes_through_progress_bar():
    """So that each follows the terminal-only rule: lmmrt's sources create no tqdm of their own."""
    package = Path(lmmrt.__file__).parent
    own = [str(p.relative_to(package)) for p in package.rglob("*.py")
           if "tqdm" in p.read_text() and p.name != "progress.py"]
    assert own == [], own
