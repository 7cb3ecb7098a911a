"""`lmmrt serve`'s options are checked before the model loads: each mistake is one `lmmrt: error:` line and
exit status 2, and nothing is loaded (the "loading" line never shows)."""

from __future__ import annotations

import socket

import pytest
from cli_util import assert_one_error_line

from lmmrt.cli import main
from lmmrt.cli_serve import byte_size, pixel_count


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A directory that passes the pre-load checks (its weights are never read by these tests)."""
    d = tmp_path_factory.mktemp("ckpt")
    (d / "config.json").write_text("{}")
    return d


def run(capsys, *argv) -> str:
    try:
        status = main(["serve", *map(str, argv)])
    except SystemExit as e:  # argparse's errors exit from inside the parser
        status = e.code
    assert status == 2
    err = capsys.readouterr().err
    assert_one_error_line(err)
    assert "loading" not in err
    return err


def test_bad_options_fail_before_the_load(capsys, checkpoint, tmp_path):
    assert "--port" in run(capsys, checkpoint, "--port", "70000")
    assert "--max-memory" in run(capsys, checkpoint, "--max-memory", "12X")
    assert "--memory-fraction" in run(capsys, checkpoint, "--memory-fraction", "0")
    assert "not allowed with" in run(capsys, checkpoint, "--max-memory", "1G", "--memory-fraction", "0.5")
    assert "--max-batch" in run(capsys, checkpoint, "--max-batch", "0")
    assert "--api-key" in run(capsys, checkpoint, "--api-key", "")
    assert "--served-model-name is empty" in run(capsys, checkpoint, "--served-model-name", "")
    assert "--served-model-name is empty" in run(capsys, checkpoint, "--served-model-name", " ")
    assert "not found" in run(capsys, tmp_path / "missing")
    assert "--allowed-local-media-path" in run(capsys, checkpoint, "--allowed-local-media-path", tmp_path / "none")
    assert "--allowed-local-media-path is empty" in run(capsys, checkpoint, "--allowed-local-media-path", "")
    assert "not allowed with" in run(capsys, checkpoint, "--allowed-local-media-path", tmp_path,
                                     "--allow-local-files")
    (tmp_path / "chat_template.jinja").write_text("{% if %}")
    (tmp_path / "config.json").write_text("{}")
    assert "not a valid Jinja template" in run(capsys, tmp_path)


def test_a_port_in_use_fails_before_the_load(capsys, checkpoint):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        assert f"cannot listen on 127.0.0.1:{port}" in run(capsys, checkpoint, "--port", port)


def test_pixel_counts(capsys, checkpoint):
    """The help says 'default 4096x4096': that spelling was refused ('expected an integer')."""
    assert [pixel_count(s) for s in ("16777216", "4096x4096", "640X480")] == [16 << 20, 16 << 20, 640 * 480]
    assert "--max-image-pixels" in run(capsys, checkpoint, "--max-image-pixels", "0x5")
    assert "--max-request-pixels" in run(capsys, checkpoint, "--max-request-pixels", "4096x")


def test_byte_sizes():
    assert [byte_size(s) for s in ("1073741824", "1G", "1GiB", "512M", "1.5k")] == [1 << 30, 1 << 30, 1 << 30,
                                                                                   512 << 20, 1536]


def test_sigterm_while_loading_stops_with_a_message(tmp_path):
    """The weights file is a FIFO nobody writes: the load blocks in it, deterministically, when SIGTERM
    comes. It stops as Ctrl-C does (a message, status 130); before, the signal killed it silently (-15)."""
    import os
    import signal
    import subprocess
    import sys
    import time

    from lmmrt.demo import char_tokenizer, demo_config
    from lmmrt.runtime.checkpoint_writer import save_checkpoint

    tok = char_tokenizer()
    ckpt = tmp_path / "ckpt"
    save_checkpoint(ckpt, demo_config(tok.get_vocab_size()), {}, tokenizer=tok, metadata={"source": "test"})
    for weights in ckpt.glob("*.safetensors"):
        weights.unlink()
        os.mkfifo(weights)
    log = tmp_path / "log.txt"
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "lmmrt", "serve", str(ckpt), "--port", "0", "--device",
                                 "cpu"], stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while "loading" not in log.read_text() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.1)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 130, log.read_text()
    finally:
        proc.kill()
    assert "SIGTERM while starting (checks, imports, loading the model): stopping" in log.read_text()


def test_sigterm_before_the_model_loads_stops_with_a_message(tmp_path):
    """config.json is a FIFO: the pre-load checks block reading it (before torch is imported) when SIGTERM
    comes. Before, the handler was installed only just before the load: the signal killed it silently (-15)."""
    import errno
    import os
    import signal
    import subprocess
    import sys
    import time

    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    os.mkfifo(ckpt / "config.json")
    log = tmp_path / "log.txt"
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "lmmrt", "serve", str(ckpt), "--port", "0", "--device",
                                 "cpu"], stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    try:
        deadline, writer = time.monotonic() + 60, None
        while writer is None and proc.poll() is None and time.monotonic() < deadline:
            try:  # succeeds once the server has the FIFO open for reading (it then blocks in read)
                writer = os.open(ckpt / "config.json", os.O_WRONLY | os.O_NONBLOCK)
            except OSError as e:
                assert e.errno == errno.ENXIO, e
                time.sleep(0.05)
        assert writer is not None, log.read_text()
        time.sleep(0.2)  # into its read
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 130, log.read_text()
        os.close(writer)
    finally:
        proc.kill()
    assert "SIGTERM while starting" in log.read_text() and "serve: loading" not in log.read_text()
