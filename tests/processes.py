"""Finding a test's Ray workers by the title Ray gives their processes (`ray::<actor or task>`),
to kill one the way a crash or the OOM killer would."""

from __future__ import annotations

import subprocess


def pids_titled(prefix: str) -> set[int]:
    """The pids of the processes whose command line, as `ps` shows it, starts with `prefix`."""
    listing = subprocess.run(["ps", "-eo", "pid=,args="], capture_output=True, text=True).stdout
    return {int(line.split(None, 1)[0]) for line in listing.splitlines()
            if line.split(None, 1)[1].startswith(prefix)}
