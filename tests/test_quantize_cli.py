"""End to end through the real `trellis` command on a small real Llama model.

Covers: a packed checkpoint that costs exactly K bits per quantized weight, loads and evaluates;
resuming a killed run to the identical result with no half-written output; one-line errors with a
non-zero exit and nothing left behind for each kind of bad input.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from trellis_runtime.checkpoint import WEIGHTS_FILE, load_checkpoint

CALIB_TEXT = "\n\n".join(
    f"Paragraph {i}. The quick brown fox jumps over the lazy dog while the river runs past "
    f"the mill number {i}, and nobody in the village of Trellis remembers why." for i in range(400))
FAST = ["--state-bits", "8", "--calib-windows", "4"]


def trellis(*args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "trellis_cli", *args], capture_output=True,
                          text=True, timeout=timeout, env={**os.environ, "TQDM_DISABLE": "1"})


def assert_one_line_error(result: subprocess.CompletedProcess, *words: str) -> None:
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("trellis: error:")
    for word in words:
        assert word in lines[0], lines[0]


@pytest.fixture(scope="module")
def calib_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("text") / "calib.txt"
    path.write_text(CALIB_TEXT)
    return path


@pytest.fixture(scope="module")
def packed(tiny_model_dir: Path, calib_file: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("packed") / "tiny-2bit"
    result = trellis("quantize", str(tiny_model_dir), "--out", str(out), "--calib-text",
                     str(calib_file), *FAST)
    assert result.returncode == 0, result.stderr
    return out


def test_checkpoint_costs_k_bits_per_weight_and_reconstructs(packed: Path, tiny_model_dir: Path
                                                             ) -> None:
    checkpoint = load_checkpoint(packed)
    assert checkpoint.spec.bits == 2 and checkpoint.spec.state_bits == 8
    original = load_file(str(tiny_model_dir / "model.safetensors"))
    for name, weight in checkpoint.quantized.items():
        out_features, in_features = weight.shape
        assert weight.codes.numel() * 32 == out_features * in_features * checkpoint.spec.bits
        w = original[f"{name}.weight"].to(torch.float32)
        relative = (weight.dequantize() - w).pow(2).mean() / w.pow(2).mean()
        # A 2-bit code at L=8 reaches about 0.09 relative MSE on Gaussian data; BlockLDLQ trades
        # weight error for Hessian-weighted error, so allow more, but far below an unrelated
        # matrix (relative error 2).
        assert 0.02 < relative.item() < 0.5, (name, relative.item())
    assert not any(p.name.endswith(".partial") for p in packed.parent.iterdir())


def test_eval_ppl_json_line(packed: Path, calib_file: Path) -> None:
    result = trellis("eval", "ppl", str(packed), "--text", str(calib_file), "--ctx", "128",
                     "--max-tokens", "512", "--json")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.strip().splitlines()
    assert len(lines) == 1
    record = json.loads(lines[0])
    assert record["tokens"] == 4 * 127
    assert 1.0 < record["ppl"] < 1e6


def test_killed_run_resumes_to_the_same_result(tiny_model_dir: Path, calib_file: Path,
                                               packed: Path, tmp_path: Path) -> None:
    out = tmp_path / "resumed"
    work = tmp_path / ".resumed.partial"
    command = [sys.executable, "-m", "trellis_cli", "quantize", str(tiny_model_dir),
               "--out", str(out), "--calib-text", str(calib_file), "--layers-per-group", "1", *FAST]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                               env={**os.environ, "TQDM_DISABLE": "1"})
    deadline = time.time() + 300
    while time.time() < deadline and not list(work.glob("layers-*.safetensors")):
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert list(work.glob("layers-*.safetensors")), "no layer group finished before the deadline"
    assert not out.exists(), "a killed run must not leave a checkpoint behind"

    result = trellis("quantize", str(tiny_model_dir), "--out", str(out), "--calib-text",
                     str(calib_file), "--layers-per-group", "1", *FAST)
    assert result.returncode == 0, result.stderr
    assert "resuming" in result.stdout
    assert not work.exists()
    resumed, fresh = load_file(str(out / WEIGHTS_FILE)), load_file(str(packed / WEIGHTS_FILE))
    assert resumed.keys() == fresh.keys()
    for name in fresh:
        assert torch.equal(resumed[name], fresh[name]), name


def test_existing_output_is_refused(packed: Path, tiny_model_dir: Path) -> None:
    result = trellis("quantize", str(tiny_model_dir), "--out", str(packed), *FAST)
    assert_one_line_error(result, "already holds a checkpoint")


def test_bad_inputs_fail_in_one_line_and_leave_nothing(tiny_model_dir: Path, tmp_path: Path
                                                       ) -> None:
    out = tmp_path / "out"
    binary = tmp_path / "weights.bin"
    binary.write_bytes(bytes(range(256)) * 8)
    unsupported = tmp_path / "gpt2"
    unsupported.mkdir()
    (unsupported / "config.json").write_text(json.dumps({"model_type": "gpt2", "n_layer": 2}))
    (unsupported / "model.safetensors").write_bytes(b"")
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    cases = [
        (["quantize", str(tmp_path / "missing"), "--out", str(out)], ["not found"]),
        (["quantize", "not-a-builtin-model", "--out", str(out)], ["not found"]),
        (["quantize", str(unsupported), "--out", str(out)], ["unsupported architecture", "gpt2"]),
        (["quantize", str(tiny_model_dir), "--out", str(out), "--calib-text", str(binary)],
         ["binary", str(binary)]),
        (["quantize", str(tiny_model_dir), "--out", str(blocker / "out"), *FAST],
         ["cannot write the output"]),
        (["quantize", str(tiny_model_dir), "--out", str(out), "--state-bits", "8", "--bits", "4",
          "--code", "hyb"], ["K*V < L"]),
        (["quantize", str(tiny_model_dir), "--out", str(out), "--code", "1mad", "--vec", "2"],
         ["V=2"]),
        (["eval", "ppl", str(tmp_path / "missing")], ["not found"]),
    ]
    for args, words in cases:
        assert_one_line_error(trellis(*args), *words)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a-file", "gpt2", "weights.bin"]


def test_bench_codes_json_line() -> None:
    result = trellis("bench", "codes", "--bits", "2", "--state-bits", "10", "--code", "1mad",
                     "--sequences", "8", "--json")
    assert result.returncode == 0, result.stderr
    record = json.loads(result.stdout.strip())
    assert record["bound"] == 0.0625
    assert record["bound"] < record["mse"] < 0.1175  # between D(R) and the Lloyd-Max quantizer
