"""`lmmrt serve` in a child process on 127.0.0.1, for bench/bench_serve.py and tests/serve: started on a
free port (--port 0), ready once it prints its address, stopped with SIGTERM. Every wait is bounded."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

READY = re.compile(r"lmmrt serve: .* on (http://\S+)/v1")


class ServerProcess:
    """`python -m lmmrt serve CKPT --port 0 ARGS...`; its output goes to a log file (a pipe nobody reads
    would fill and block the server)."""

    def __init__(self, checkpoint, *args: str, env: dict | None = None, start_timeout_s: float = 180.0):
        self.log_path = Path(tempfile.mkstemp(prefix="lmmrt-serve-", suffix=".log")[1])
        cmd = [sys.executable, "-m", "lmmrt", "serve", str(checkpoint), "--host", "127.0.0.1", "--port", "0",
               "--no-access-log", *args]
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                         env={**os.environ, **(env or {})})
        self.url = self._wait_ready(start_timeout_s)
        self.base_url = self.url + "/v1"

    def _wait_ready(self, timeout_s: float) -> str:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            m = READY.search(self.log())
            if m:
                return m.group(1)
            if self.proc.poll() is not None:
                raise RuntimeError(f"lmmrt serve exited with {self.proc.returncode}:\n{self.log()}")
            time.sleep(0.2)
        self.kill()
        raise TimeoutError(f"lmmrt serve was not ready within {timeout_s:.0f} s:\n{self.log()}")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self, sig: int = signal.SIGTERM, timeout_s: float = 60.0) -> int:
        """Send `sig`, wait for the exit (killing it after timeout_s); the exit status."""
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.kill()
        return self.proc.returncode

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(30)

    def __enter__(self) -> ServerProcess:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()
        self.log_path.unlink(missing_ok=True)
