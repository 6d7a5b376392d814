"""`trellis serve` and `trellis generate` as a user runs them: real processes, a real socket."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import httpx

from trellis_cli.serve_process import ServeProcess


def test_generate_prints_a_greedy_completion(tiny_checkpoint_dir: Path) -> None:
    command = [sys.executable, "-m", "trellis_cli", "generate", str(tiny_checkpoint_dir),
               "--prompt", "Once upon a time", "--max-tokens", "8"]
    first = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert first.returncode == 0, first.stderr
    assert first.stdout.strip()
    again = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert again.stdout == first.stdout  # greedy is deterministic


def test_generate_runs_with_the_int8_head(tiny_checkpoint_dir: Path) -> None:
    result = subprocess.run([sys.executable, "-m", "trellis_cli", "generate", str(tiny_checkpoint_dir),
                             "--prompt", "Once upon a time", "--max-tokens", "4", "--head", "int8"],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip()


def test_generate_rejects_bad_temperature(tiny_checkpoint_dir: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "trellis_cli", "generate", str(tiny_checkpoint_dir),
         "--prompt", "x", "--temperature", "-1"], capture_output=True, text=True, timeout=300)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        line for line in result.stderr.strip().splitlines() if line.startswith("trellis: error:")]
    assert "temperature" in result.stderr


def test_serve_answers_over_http(tiny_checkpoint_dir: Path) -> None:
    server = ServeProcess([str(tiny_checkpoint_dir), "--served-model-name", "tiny"], timeout_s=120,
                          probe="/health")
    base = server.url
    try:
        models = httpx.get(f"{base}/v1/models").json()
        assert [m["id"] for m in models["data"]] == ["tiny"]
        reply = httpx.post(f"{base}/v1/completions", json={
            "model": "tiny", "prompt": "Hello", "max_tokens": 4, "temperature": 0}, timeout=60)
        assert reply.status_code == 200
        assert reply.json()["usage"]["completion_tokens"] <= 4
    finally:
        # SIGTERM drains (nothing is in flight here), then the process exits cleanly.
        assert server.stop(timeout_s=30) == 0

def test_readme_quotes_the_served_limits() -> None:
    """The README's numbers for the batch, the context cap and `n` are the engine's and the
    schema's, so changing a limit in its one place and not the README fails here."""
    from server.schemas import MAX_CHOICES
    from trellis_runtime.scheduler import DEFAULT_MAX_BATCH, DEFAULT_MAX_SEQ_LEN

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    assert f"| `--max-batch` | `TRELLIS_MAX_BATCH` | `{DEFAULT_MAX_BATCH}` |" in readme
    assert f"| the model's, at most {DEFAULT_MAX_SEQ_LEN} |" in readme
    assert f"`n` (1-{MAX_CHOICES})" in readme
