"""Flags generated from options dataclasses (trellis_cli/options.py), on a small dataclass of every
kind of field and on the real `trellis quantize` and `trellis qat`."""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import pytest

from qat.ptq import QuantizeOptions
from qat.train import QatOptions
from trellis_cli.cli import build_parser, main
from trellis_cli.options import add_option_flags, flag_fields, options_from_arguments
from trellis_runtime.trellis import spec_for


@dataclass(frozen=True)
class Example:
    count: int = field(default=3, metadata={"help": "how many"})
    rate: float | None = None
    name: str | None = None
    mode: Literal["fast", "slow"] = "fast"
    verbose: bool = False
    checked: bool = field(default=True, metadata={"help": "skip the check"})
    internal: float = field(default=0.5, metadata={"flag": False})


def example_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="example")
    add_option_flags(parser, Example)
    return parser


def test_no_flags_give_the_dataclass_defaults() -> None:
    assert options_from_arguments(Example, example_parser().parse_args([])) == Example()


def test_every_kind_of_field_takes_its_flag() -> None:
    args = example_parser().parse_args(["--count", "5", "--rate", "0.25", "--name", "x",
                                        "--mode", "slow", "--verbose", "--no-checked"])
    assert options_from_arguments(Example, args, internal=2.0) == Example(
        count=5, rate=0.25, name="x", mode="slow", verbose=True, checked=False, internal=2.0)


def test_a_field_marked_not_a_flag_has_none(capsys: pytest.CaptureFixture) -> None:
    assert [f.name for f in flag_fields(Example)] == [
        "count", "rate", "name", "mode", "verbose", "checked"]
    with pytest.raises(SystemExit) as exit:
        example_parser().parse_args(["--internal", "1"])
    assert exit.value.code == 2
    assert "unrecognized arguments: --internal 1" in capsys.readouterr().err


def test_a_field_no_flag_can_parse_is_refused() -> None:
    @dataclass
    class Unparseable:
        shape: tuple = (1, 2)

    with pytest.raises(TypeError, match="no flag for a field"):
        add_option_flags(argparse.ArgumentParser(), Unparseable)


def command_help(command: str, monkeypatch: pytest.MonkeyPatch,
                 capsys: pytest.CaptureFixture) -> str:
    monkeypatch.setenv("COLUMNS", "1000")  # one line per flag, so help text is matched whole
    with pytest.raises(SystemExit) as exit:
        main([command, "--help"])
    assert exit.value.code == 0
    return capsys.readouterr().out


@pytest.mark.parametrize("command,options_type", [("quantize", QuantizeOptions),
                                                  ("qat", QatOptions)])
def test_every_flag_field_is_a_flag_with_its_help(command: str, options_type: type,
                                                  monkeypatch: pytest.MonkeyPatch,
                                                  capsys: pytest.CaptureFixture) -> None:
    lines = command_help(command, monkeypatch, capsys).splitlines()
    for option in flag_fields(options_type):
        name = option.name.replace("_", "-")
        flag = f"--no-{name}" if option.default is True else f"--{name}"
        at = next((i for i, line in enumerate(lines) if line.strip().startswith(flag + " ")
                   or line.strip() == flag), None)
        assert at is not None, f"{command} has no {flag}"
        help_text = option.metadata.get("help", "")  # beside the flag, or below a long one
        assert help_text in lines[at] or lines[at + 1].strip() == help_text, (flag, help_text)


def test_quantize_and_qat_flags_left_out_give_the_options_defaults() -> None:
    parser = build_parser()
    args = parser.parse_args(["qat", "checkpoint", "--out", "out"])
    assert options_from_arguments(QatOptions, args) == QatOptions()
    spec = spec_for("hyb", state_bits=12)
    args = parser.parse_args(["quantize", "src", "--out", "out"])
    assert options_from_arguments(QuantizeOptions, args, spec=spec) == QuantizeOptions(spec=spec)


def test_qat_flags_reach_the_options() -> None:
    args = build_parser().parse_args(["qat", "checkpoint", "--out", "out", "--steps", "3",
                                      "--lr", "0.5", "--loss", "mse", "--train-scale",
                                      "--teacher", "teacher-dir", "--device", "cuda"])
    assert options_from_arguments(QatOptions, args) == QatOptions(
        steps=3, lr=0.5, loss="mse", train_scale=True, teacher="teacher-dir", device="cuda")


@pytest.mark.parametrize("flags,error", [
    (["--steps", "x"], "argument --steps: invalid int value: 'x'"),
    (["--loss", "l1"], "argument --loss: invalid choice: 'l1'"),
    (["--device", "tpu"], "argument --device: invalid choice: 'tpu'"),
])
def test_a_bad_flag_value_exits_2_naming_it(flags: list[str], error: str,
                                            capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as exit:
        main(["qat", "checkpoint", "--out", "out", *flags])
    assert exit.value.code == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith("trellis qat: error: ") and error in last


def test_a_bad_option_value_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """Values of the right type that the options refuse: the options' own check, before any
    model is read."""
    assert main(["qat", str(tmp_path / "missing"), "--out", str(tmp_path / "out"),
                 "--steps", "0"]) == 2
    assert capsys.readouterr().err == "trellis: error: --steps must be at least 1, got 0\n"
    assert not (tmp_path / "out").exists()


def test_spec_flags_left_out_give_the_default_spec_on_every_device() -> None:
    """What quantize makes with no spec flags is what serve and generate quantize to."""
    from trellis_cli.flags import DEFAULT_CODE, DEFAULT_STATE_BITS, default_spec, spec_from_arguments
    from trellis_runtime.devices import DEVICES

    assert set(DEFAULT_STATE_BITS) == set(DEVICES) == set(DEFAULT_CODE)
    args = build_parser().parse_args(["quantize", "src", "--out", "out"])
    for device in DEVICES:
        assert spec_from_arguments(args, DEFAULT_STATE_BITS[device], DEFAULT_CODE[device]) == \
            default_spec(device)
    assert default_spec("cpu").code == "3inst" and default_spec("cpu").vec == 1
    given = build_parser().parse_args(["quantize", "src", "--out", "out", "--code", "hyb"])
    assert spec_from_arguments(given, 12, "3inst").code == "hyb"


def test_state_bits_help_states_the_default_each_command_uses(
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    from trellis_cli.flags import DEFAULT_STATE_BITS
    from trellis_runtime.trellis import MAX_STATE_BITS

    quantize = command_help("quantize", monkeypatch, capsys)
    for device, bits in DEFAULT_STATE_BITS.items():
        assert f"{bits} on {device.upper()}" in quantize
    with pytest.raises(SystemExit):
        main(["bench", "codes", "--help"])
    assert f"; default {MAX_STATE_BITS}\n" in capsys.readouterr().out
