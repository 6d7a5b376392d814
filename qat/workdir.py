"""The resumable-job directory both long jobs (quantize, qat) use: `.<out>.partial` beside the output,
holding files that are each written to a temporary name and renamed, so a kill never leaves a torn one.

A run that fails keeps the directory only when it holds finished work a rerun resumes from (each job
says what counts); otherwise the directory goes, so a failed run leaves nothing behind."""

from __future__ import annotations

import json
import os
import shutil
import signal
import sys
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

import torch
from safetensors.torch import save_file

from trellis_runtime.checkpoint import load_checkpoint
from trellis_runtime.errors import TrellisError


def work_dir(out: Path) -> Path:
    return out.parent / f".{out.name}.partial"


@contextmanager
def removed_unless_resumable(out: Path, resumable: Callable[[Path], bool]) -> Iterator[Path]:
    """Run a job's body on `out`'s work directory. If the body fails (any exception, Ctrl-C too)
    and `resumable(work)` says the directory holds finished work, it is kept and the error ends
    with how to resume; otherwise it is removed."""
    work = work_dir(out)
    with _ctrl_c_watched() as ctrl_c_pressed:
        try:
            yield work
        except BaseException as caught:
            # Native code can turn the KeyboardInterrupt raised inside it into another error
            # (safetensors reading a tensor gives a ValueError): a Ctrl-C is still reported as one.
            interrupted = ctrl_c_pressed() and not isinstance(caught, KeyboardInterrupt)
            err = KeyboardInterrupt() if interrupted else caught
            if work.is_dir() and resumable(work):
                _add_resume_hint(err, f"run the same command again to resume from {work}")
            else:
                shutil.rmtree(work, ignore_errors=True)
            if err is caught:
                raise
            raise err from caught


_ctrl_c_count = 0


def _count_ctrl_c(signum: int, frame: object) -> None:
    global _ctrl_c_count
    _ctrl_c_count += 1
    signal.default_int_handler(signum, frame)  # raises KeyboardInterrupt, as without this handler


@contextmanager
def _ctrl_c_watched() -> Iterator[Callable[[], bool]]:
    """Yield a test for "Ctrl-C was pressed since entry". Ctrl-C still raises KeyboardInterrupt;
    the handler only counts it on the way. Where someone else owns SIGINT (a server, another
    thread) nothing is installed and the test only sees the counts of an enclosing watch."""
    start = _ctrl_c_count
    install = (threading.current_thread() is threading.main_thread()
               and signal.getsignal(signal.SIGINT) is signal.default_int_handler)
    if install:
        signal.signal(signal.SIGINT, _count_ctrl_c)
    try:
        yield lambda: _ctrl_c_count > start
    finally:
        if install:
            signal.signal(signal.SIGINT, signal.default_int_handler)


def _add_resume_hint(err: BaseException, hint: str) -> None:
    """The CLI prints a TrellisError's and a KeyboardInterrupt's message as its one line: the hint
    goes at its end. Any other exception (a bug) prints a traceback, so the hint is printed apart."""
    if isinstance(err, (TrellisError, KeyboardInterrupt)):
        err.args = (f"{err}; {hint}" if str(err) else hint,)
    else:
        print(f"trellis: {hint}", file=sys.stderr)


def prepare(out: Path, arguments: str) -> bool:
    """Create or reuse `out`'s work directory for a job with these arguments (canonical JSON):
    True when it already held a run with the same arguments, which the job resumes; a run with
    other arguments is thrown away. A clear TrellisError if the output cannot be written."""
    work = work_dir(out)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        work.mkdir(exist_ok=True)
        probe = work / ".write-test"
        probe.write_text("ok")
        probe.unlink()
    except OSError as err:
        raise TrellisError(f"cannot write the output {out}: {err.strerror or err}") from None
    args_file = work / "args.json"
    same = args_file.is_file() and args_file.read_text() == arguments
    if args_file.is_file() and not same:
        print(f"note: {work} holds a run with other arguments; starting over")
        shutil.rmtree(work)
        work.mkdir()
    args_file.write_text(arguments)
    return same


def read_metadata(path: Path) -> dict:
    """The JSON metadata atomic_save wrote into a safetensors file."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        return json.loads(handle.metadata()["json"])


def atomic_save(tensors: dict[str, torch.Tensor], path: Path, metadata: dict | None = None) -> None:
    """Write tensors (and optional JSON metadata) to `path` atomically."""
    temporary = path.with_suffix(".tmp")
    # clone: tensors that share storage (linears sharing an input's sign vector) are refused by safetensors
    save_file({k: v.detach().contiguous().clone() for k, v in tensors.items()}, str(temporary),
              metadata=None if metadata is None else {"json": json.dumps(metadata)})
    os.replace(temporary, path)


def publish(out: Path, write: Callable[[Path], None]) -> None:
    """Put a finished job's checkpoint at `out` in one step: `write` fills an empty `final` directory
    inside the work directory, which must load as a checkpoint before it is renamed to `out`; then
    the work directory goes. A reader never sees a half-written checkpoint, and a job killed before
    the rename resumes and writes it again."""
    work = work_dir(out)
    final = work / "final"
    if final.exists():
        shutil.rmtree(final)
    final.mkdir()
    write(final)
    load_checkpoint(final)  # never publish a checkpoint that does not load
    os.replace(final, out)
    shutil.rmtree(work)
