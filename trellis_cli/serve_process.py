"""`trellis serve` as a child process on a free local port, returned once it answers: what the
serving benchmarks and the end-to-end CLI tests start, so they wait and fail the same way."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from typing import IO

import httpx


def free_port() -> int:
    """A local TCP port nothing listens on at this moment."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class ServeProcess:
    """`python -m trellis_cli serve *args --port P`, started and waited for.

    `program` replaces `python -m trellis_cli serve` with another server's command that takes
    `--port P` the same way (a benchmark's comparison server). `env` adds variables to this
    process's environment for the server. The constructor returns
    when GET `probe` answers 200 and raises RuntimeError if the process exits
    or `timeout_s` passes first (it is stopped then). `stop()` sends SIGTERM, which drains in-flight
    requests, and returns the exit status.
    """

    def __init__(self, args: list[str], timeout_s: float, probe: str = "/ready",
                 stderr: int | IO | None = subprocess.DEVNULL,
                 env: dict[str, str] | None = None, program: list[str] | None = None) -> None:
        port = free_port()
        self.url = f"http://127.0.0.1:{port}"
        name = "trellis serve" if program is None else program[-1]
        program = program or [sys.executable, "-m", "trellis_cli", "serve"]
        self.process = subprocess.Popen(
            [*program, *args, "--port", str(port)],
            stdout=subprocess.DEVNULL, stderr=stderr, text=True,
            env=None if env is None else {**os.environ, **env})
        deadline = time.monotonic() + timeout_s
        while not self._answers(probe):
            if self.process.poll() is not None:
                raise RuntimeError(f"{name} exited with status {self.process.returncode}")
            if time.monotonic() > deadline:
                self.process.kill()
                self.process.wait()
                raise RuntimeError(f"{name} did not answer {probe} within {timeout_s:.0f} s")
            time.sleep(0.3)

    def _answers(self, probe: str) -> bool:
        try:
            return httpx.get(f"{self.url}{probe}", timeout=2).status_code == 200
        except httpx.TransportError:
            return False

    def stop(self, timeout_s: float = 120) -> int:
        self.process.send_signal(signal.SIGTERM)
        return self.process.wait(timeout=timeout_s)
