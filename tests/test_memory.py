"""Freed heap memory goes back to the OS (glibc's malloc_trim), as the CPU model load relies on."""

from __future__ import annotations

import platform
from pathlib import Path

import pytest
import torch

from trellis_runtime.memory import return_freed_memory


def resident_mib() -> float:
    status = Path("/proc/self/status").read_text()
    return int(status.split("VmRSS:")[1].split()[0]) / 1024


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc" or not Path("/proc/self/status").exists(),
                    reason="needs glibc on Linux")
def test_freed_heap_blocks_leave_the_resident_set() -> None:
    # Freeing one 8 MiB block raises glibc's mmap threshold above 1 MiB, so the 1 MiB blocks after it
    # come from the heap, which keeps them resident once freed, until trimmed.
    large = torch.ones(2 * 2**20)
    del large
    blocks = [torch.ones(2**18) for _ in range(192)]  # 192 MiB, every page touched
    del blocks
    held = resident_mib()
    assert return_freed_memory()
    assert resident_mib() < held - 100
