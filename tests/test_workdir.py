"""The work directory of a long job: what a failure keeps, and how a Ctrl-C is reported.

Ctrl-C is a real SIGINT sent to this process. The body that turns the KeyboardInterrupt into a
ValueError does what safetensors does when the interrupt lands while it reads a tensor."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest

from qat.workdir import removed_unless_resumable, work_dir


def _press_ctrl_c_inside_native_code() -> None:
    try:
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(5)  # the handler runs before this returns
    except KeyboardInterrupt:
        raise ValueError("could not determine the shape of object type 'UntypedStorage'") from None
    raise AssertionError("SIGINT did not interrupt")


def test_ctrl_c_turned_into_another_error_is_still_an_interrupt_with_the_resume_hint(
        tmp_path: Path) -> None:
    out = tmp_path / "model"
    with pytest.raises(KeyboardInterrupt) as info:
        with removed_unless_resumable(out, lambda work: True) as work:
            work.mkdir()
            _press_ctrl_c_inside_native_code()
    assert str(info.value) == f"run the same command again to resume from {work_dir(out)}"
    assert isinstance(info.value.__cause__, ValueError)
    assert work_dir(out).is_dir()
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_an_error_without_ctrl_c_stays_itself_and_an_unresumable_directory_goes(
        tmp_path: Path) -> None:
    out = tmp_path / "model"
    with pytest.raises(ValueError, match="a bug"):
        with removed_unless_resumable(out, lambda work: False) as work:
            work.mkdir()
            raise ValueError("a bug")
    assert not work_dir(out).exists()


def test_nested_jobs_report_one_interrupt(tmp_path: Path) -> None:
    """A recipe runs its stages as jobs inside its own: the inner job sees the Ctrl-C too."""
    outer, inner = tmp_path / "recipe", tmp_path / "recipe-stage"
    with pytest.raises(KeyboardInterrupt) as info:
        with removed_unless_resumable(outer, lambda work: False):
            with removed_unless_resumable(inner, lambda work: True) as work:
                work.mkdir()
                _press_ctrl_c_inside_native_code()
    assert str(info.value) == f"run the same command again to resume from {work_dir(inner)}"
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
