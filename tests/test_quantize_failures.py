"""How `trellis quantize` fails: input checks before anything heavy, and what a failed run leaves.

Failures are real inputs (a too-short calibration text, truncated weights), never stand-ins for the
project's own code: a check that ran in the wrong order or a leftover directory would show here.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from qat.ptq import QuantizeOptions, quantize_model
from trellis_runtime.errors import SourceError, TrellisError
from trellis_runtime.trellis import spec_for

SPEC = spec_for("1mad", state_bits=8)


@pytest.fixture(scope="module")
def truncated_weights(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny model with its config and tokenizer intact but its weights cut short: everything
    up to loading the weights succeeds."""
    directory = tmp_path_factory.mktemp("sources") / "truncated"
    shutil.copytree(tiny_model_dir, directory)
    weights = directory / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    return directory


def test_calibration_text_is_checked_before_the_weights_and_the_work_directory(
        truncated_weights: Path, tmp_path: Path) -> None:
    short = tmp_path / "short.txt"
    short.write_text("Too few words to calibrate on.\n\nStill too few.\n")
    out = tmp_path / "out" / "tiny"
    options = QuantizeOptions(spec=SPEC, calib_text=str(short), calib_windows=4)
    with pytest.raises(TrellisError, match=r"calibration text has \d+ tokens; need at least 2048"):
        quantize_model(str(truncated_weights), out, options)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["short.txt"]  # no work directory, no out
    # The weights really are unreadable: loading them is what fails once the text is no obstacle,
    # after the work directory was made; with nothing finished in it, it is removed.
    with pytest.raises(SourceError, match="cannot load") as info:
        quantize_model(str(truncated_weights), out, QuantizeOptions(spec=SPEC, hessian=False))
    assert "resume" not in str(info.value)
    assert not (out.parent / ".tiny.partial").exists() and not out.exists()


def test_missing_tokenizer_is_refused_before_the_work_directory(tiny_model_dir: Path,
                                                               tmp_path: Path) -> None:
    source = tmp_path / "no-tokenizer"
    source.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy(tiny_model_dir / name, source / name)
    with pytest.raises(SourceError, match="has no tokenizer"):
        quantize_model(str(source), tmp_path / "out", QuantizeOptions(spec=SPEC, hessian=False))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["no-tokenizer"]


def test_an_interrupted_run_keeps_its_finished_work_and_says_how_to_resume(tiny_model_dir: Path,
                                                                          tmp_path: Path) -> None:
    """Ctrl-C once the first layer is saved: the work directory stays, the one line says how to resume,
    and running the same command again finishes from it."""
    calib = tmp_path / "calib.txt"
    calib.write_text("\n\n".join(f"Paragraph {i}. The quick brown fox jumps over the lazy dog by "
                                   f"mill number {i}." for i in range(400)))
    out = tmp_path / "tiny"
    work = tmp_path / ".tiny.partial"
    command = [sys.executable, "-m", "trellis_cli", "quantize", str(tiny_model_dir), "--out",
               str(out), "--calib-text", str(calib), "--state-bits", "8", "--calib-windows", "4",
               "--layers-per-group", "1"]
    env = {**os.environ, "TQDM_DISABLE": "1"}
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               env=env)
    deadline = time.time() + 300
    first_layer = work / "layers-000-000.safetensors"
    while time.time() < deadline and not first_layer.is_file():
        time.sleep(0.02)
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=300)
    assert process.returncode == 130, stderr
    assert stderr.strip().splitlines()[-1] == (
        f"trellis: interrupted; run the same command again to resume from {work}")
    assert first_layer.is_file() and not out.exists()

    resumed = subprocess.run(command, capture_output=True, text=True, timeout=600, env=env)
    assert resumed.returncode == 0, resumed.stderr
    assert f"resuming from {work}" in resumed.stdout
    assert out.is_dir() and not work.exists()
