"""The public face of trellis_runtime: three names that resolve to their definitions, loaded lazily
so that importing a light submodule does not import the model or the engine."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

import trellis_runtime

ROOT = Path(__file__).resolve().parents[1]


def test_public_names_resolve_to_their_definitions() -> None:
    from trellis_runtime.engine import Engine
    from trellis_runtime.model import load_model
    from trellis_runtime.sampling import SamplingParams

    assert trellis_runtime.Engine is Engine
    assert trellis_runtime.load_model is load_model
    assert trellis_runtime.SamplingParams is SamplingParams
    assert sorted(trellis_runtime.__all__) == ["Engine", "SamplingParams", "load_model"]
    assert set(trellis_runtime.__all__) <= set(dir(trellis_runtime))


def test_star_import_gives_exactly_the_public_names() -> None:
    namespace: dict = {}
    exec("from trellis_runtime import *", namespace)
    assert sorted(k for k in namespace if k != "__builtins__") == sorted(trellis_runtime.__all__)


def test_unknown_name_is_an_attribute_error() -> None:
    with pytest.raises(AttributeError, match="no attribute 'Engin'"):
        trellis_runtime.Engin  # noqa: B018


def test_a_light_submodule_loads_neither_model_nor_engine() -> None:
    """Run in a fresh interpreter: this one has imported everything already."""
    code = ("import sys, trellis_runtime.trellis\n"
            "print(sorted(m for m in sys.modules if m in ('torch', 'transformers', "
            "'trellis_runtime.model', 'trellis_runtime.engine')))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT,
                            check=True)
    assert result.stdout.strip() == "[]"
