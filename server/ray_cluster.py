"""A local Ray instance for `trellis serve --ray` without --ray-address, started so that Ctrl-C
drains the server instead of killing Ray under it.

`ray.init()` starts Ray's system processes (GCS, raylet) in the caller's process group, and the
Ctrl-C a terminal sends reaches that whole group: they would die at once, taking the replicas and
every running stream with them. A signal ignored at exec stays ignored in the child, so SIGINT is
ignored while Ray starts its processes (and so in them and in the workers they start), then handed
back to this process, which drains and stops Ray itself. Ray's own defaults stay as they are (its
token authentication among them).
"""

from __future__ import annotations

import logging
import signal
from contextlib import contextmanager
from typing import Iterator

import ray


@contextmanager
def local_ray(cpus: int) -> Iterator[None]:
    """A new local Ray instance with `cpus` CPUs for the block, this process its driver
    (address "local": never a cluster that happens to run on this machine)."""
    handler = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        ray.init(address="local", num_cpus=cpus, include_dashboard=False,
                 logging_level=logging.WARNING)
    finally:
        signal.signal(signal.SIGINT, handler)
    try:
        yield
    finally:
        ray.shutdown()
