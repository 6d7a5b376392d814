"""How `trellis quantize` fails: input checks before anything heavy, and what a failed run leaves.

Failures are real inputs (a too-short calibration text, truncated weights), never stand-ins for the
project's own code: a check that ran in the wrong order or a leftover directory would show here.
"""

from __future__ import annotations

import shutil
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
    # The weights really are unreadable: loading them is what fails once the text is no obstacle.
    with pytest.raises(SourceError, match="cannot load"):
        quantize_model(str(truncated_weights), out, QuantizeOptions(spec=SPEC, hessian=False))


def test_missing_tokenizer_is_refused_before_the_work_directory(tiny_model_dir: Path,
                                                               tmp_path: Path) -> None:
    source = tmp_path / "no-tokenizer"
    source.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy(tiny_model_dir / name, source / name)
    with pytest.raises(SourceError, match="has no tokenizer"):
        quantize_model(str(source), tmp_path / "out", QuantizeOptions(spec=SPEC, hessian=False))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["no-tokenizer"]
