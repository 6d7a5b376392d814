"""trellis_runtime: the trellis format and math, the quantized model and the engine that serves it.

The public face is three names:

    from trellis_runtime import Engine, SamplingParams, load_model

load_model reads a packed checkpoint into a model, Engine batches requests over it, SamplingParams
says how each request samples. They load on first use (module `__getattr__`), because every import
of a submodule runs this file first: `import trellis_runtime.trellis` must stay as light as the
trellis definition, not pull in the model, the engine and torch with them.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from trellis_runtime.engine import Engine
    from trellis_runtime.model import load_model
    from trellis_runtime.sampling import SamplingParams

__all__ = ["Engine", "SamplingParams", "load_model"]

# Each public name and the module that defines it.
_HOMES = {"Engine": "trellis_runtime.engine", "SamplingParams": "trellis_runtime.sampling",
          "load_model": "trellis_runtime.model"}


def __getattr__(name: str) -> Any:
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(home), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
