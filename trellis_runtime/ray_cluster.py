"""The Ray cluster a `--ray` command runs on: the one at --ray-address, or a new local one that
Ctrl-C does not kill under the command. `trellis serve --ray` and `trellis quantize --ray` both use it.

`ray.init()` starts Ray's system processes (GCS, raylet) in the caller's process group, and the
Ctrl-C a terminal sends reaches that whole group: they would die at once, taking the replicas or
tasks with them, and the command could neither drain nor stop cleanly. A signal ignored at exec
stays ignored in the child, so SIGINT is ignored while Ray starts its processes (and so in them and
in the workers they start), then handed back to this process, which stops Ray itself. Ray's own
defaults stay as they are (its token authentication among them).
"""

from __future__ import annotations

import logging
import os
import signal
from contextlib import contextmanager
from typing import Iterator

import ray


@contextmanager
def ray_cluster(address: str | None) -> Iterator[bool]:
    """This process connected, as a driver, to the cluster at `address`, or to a new local one with
    this machine's CPUs (address "local": never a cluster that happens to run on this machine),
    for the block; yields whether the cluster is local (and so stops with the block)."""
    if address is not None:
        ray.init(address=address, logging_level=logging.WARNING)
    else:
        handler = signal.signal(signal.SIGINT, signal.SIG_IGN)
        try:
            ray.init(address="local", num_cpus=os.cpu_count(), include_dashboard=False,
                     logging_level=logging.WARNING)
        finally:
            signal.signal(signal.SIGINT, handler)
    try:
        yield address is None
    finally:
        ray.shutdown()
