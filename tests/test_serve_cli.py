"""`trellis serve` and `trellis generate` as a user runs them: real processes, a real socket."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_generate_prints_a_greedy_completion(tiny_checkpoint_dir: Path) -> None:
    command = [sys.executable, "-m", "trellis_runtime.cli", "generate", str(tiny_checkpoint_dir),
               "--prompt", "Once upon a time", "--max-tokens", "8"]
    first = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert first.returncode == 0, first.stderr
    assert first.stdout.strip()
    again = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert again.stdout == first.stdout  # greedy is deterministic


def test_generate_rejects_bad_temperature(tiny_checkpoint_dir: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "trellis_runtime.cli", "generate", str(tiny_checkpoint_dir),
         "--prompt", "x", "--temperature", "-1"], capture_output=True, text=True, timeout=300)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        line for line in result.stderr.strip().splitlines() if line.startswith("trellis: error:")]
    assert "temperature" in result.stderr


def test_serve_answers_over_http(tiny_checkpoint_dir: Path) -> None:
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "trellis_runtime.cli", "serve", str(tiny_checkpoint_dir),
         "--port", str(port), "--served-model-name", "tiny"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env={**os.environ})
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 120
        while True:
            try:
                if httpx.get(f"{base}/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.time() < deadline, "server did not become healthy"
            assert process.poll() is None, "server exited"
            time.sleep(0.5)
        models = httpx.get(f"{base}/v1/models").json()
        assert [m["id"] for m in models["data"]] == ["tiny"]
        reply = httpx.post(f"{base}/v1/completions", json={
            "model": "tiny", "prompt": "Hello", "max_tokens": 4, "temperature": 0}, timeout=60)
        assert reply.status_code == 200
        assert reply.json()["usage"]["completion_tokens"] <= 4
    finally:
        process.terminate()
        # SIGTERM drains (nothing is in flight here), then the process exits cleanly.
        assert process.wait(timeout=30) == 0
