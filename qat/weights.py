"""A float model's tensors, read by name when they are needed instead of all at once.

Quantization needs one group of layers at a time, so reading a safetensors directory lazily (one tensor
from its memory-mapped shard at a time, sharded or not) keeps the float model out of memory: an 8B
model would otherwise hold 32 GB in float32 before the first layer is quantized. A GGUF source has no
such index, so transformers reads it whole (GGUF sources are small models in practice).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Protocol

import torch
from safetensors import SafetensorError, safe_open

from trellis_runtime.errors import SourceError

INDEX_FILE = "model.safetensors.index.json"


class Weights(Protocol):
    def get(self, name: str, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The tensor `name` (a transformers parameter name) in `dtype`."""


class SafetensorsWeights:
    """The tensors of a Hugging Face model directory, each read from its shard on request."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        index = directory / INDEX_FILE
        try:
            if index.is_file():
                weight_map = json.loads(index.read_text())["weight_map"]
                self.file_of = {name: directory / file for name, file in weight_map.items()}
            else:
                self.file_of = {}
                for path in sorted(directory.glob("*.safetensors")):
                    with safe_open(str(path), framework="pt") as handle:
                        self.file_of.update(dict.fromkeys(handle.keys(), path))
        except (OSError, ValueError, KeyError, SafetensorError) as err:
            raise SourceError(f"cannot load the weights of {directory}: {err}") from None

    def get(self, name: str, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Opened per tensor, so no shard stays mapped (and resident) after its tensors are read."""
        path = self.file_of.get(name)
        if path is None:
            raise SourceError(f"{self.directory}: the weights hold no tensor {name!r}")
        with safe_open(str(path), framework="pt") as handle:
            return handle.get_tensor(name).to(dtype)


class StateDictWeights:
    """Tensors of a model already in memory (a GGUF source, which transformers reads whole)."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.state = model.state_dict()

    def get(self, name: str, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        if name not in self.state:
            raise SourceError(f"the model holds no tensor {name!r}")
        return self.state[name].detach().to(dtype)
