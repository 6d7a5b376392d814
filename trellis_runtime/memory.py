"""Handing memory the process has freed back to the operating system.

glibc's malloc raises its mmap threshold after the first large block is freed (up to 32 MiB), so the
float32 copies and other temporaries of a model load end up on its heap, and freeing them leaves the
pages resident: a CPU model that dropped its 405 MiB of copies (TrellisModel.drop_float_copies)
still showed them in its RSS. malloc_trim returns the free pages at once.
"""

from __future__ import annotations

import ctypes
import functools


@functools.lru_cache(maxsize=1)
def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(None)


def return_freed_memory() -> bool:
    """Give the heap's free pages back to the OS: True when some were, False when none were free
    or the C library has no malloc_trim (not glibc) and keeps them as it sees fit."""
    trim = getattr(_libc(), "malloc_trim", None)
    return trim is not None and trim(0) == 1
