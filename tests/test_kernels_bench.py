"""`trellis bench kernels`: without a GPU, the correctness suite's errors, as text or one JSON line."""

from __future__ import annotations

import json

import pytest
import torch

from trellis_cli import kernel_suite
from trellis_cli.cli import main


@pytest.fixture
def two_cases(monkeypatch: pytest.MonkeyPatch) -> list:
    """A decode and a hadamard case: the command's plumbing, not the whole suite again."""
    cases = [next(c for c in kernel_suite.CASES if c.kernel == kernel)
             for kernel in ("decode", "hadamard")]
    monkeypatch.setattr(kernel_suite, "CASES", cases)
    return cases


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU the command also times kernels")
def test_json_is_one_line_of_rows(two_cases: list, capsys: pytest.CaptureFixture) -> None:
    assert main(["bench", "kernels", "--json"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 1
    rows = json.loads(lines[0])
    assert [(r["kernel"], r["case"]) for r in rows] == [(c.kernel, c.name) for c in two_cases]
    assert all(set(r) == {"kernel", "case", "max_rel_err"} for r in rows)
    assert all(r["max_rel_err"] <= c.tolerance for r, c in zip(rows, two_cases))


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU the command also times kernels")
def test_text_has_a_line_per_case(two_cases: list, capsys: pytest.CaptureFixture) -> None:
    assert main(["bench", "kernels"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 2
    assert lines[0].startswith("decode") and "max_rel_err" in lines[0]
