"""Where the project keeps downloaded and derived data (text, quantized models)."""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    """`$XDG_CACHE_HOME/trellis-runtime`, or `~/.cache/trellis-runtime` when it is unset."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "trellis-runtime"
