"""The resume snapshot of a training run: its counters, the trained parameters and AdamW's moments.

One safetensors file in the work directory, rewritten atomically at step 0 and at every evaluation
(BCJR-QAT's hardened snapshots, fine-tuning's scored ones). The run's counters travel as the file's JSON metadata; the optimizer state is stored
too, so a resumed run takes exactly the steps the interrupted one would have taken.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import nn

from qat.workdir import atomic_save, read_metadata

SNAPSHOT_FILE = "snapshot.safetensors"


@dataclass
class RunState:
    """The mutable state of a run that a snapshot holds."""

    step: int = 0  # steps done
    best_ppl: float = math.inf
    best_step: int = 0
    ptq_ppl: float = math.inf
    lr: float = 0.0  # relative to each matrix's scale: the option, or the budget's suggestion
    layers: list[int] = field(default_factory=list)
    radii: dict[str, float] = field(default_factory=dict)


def save_snapshot(path: Path, run: object, soft: dict[str, nn.Module],
                  optimizer: torch.optim.Optimizer) -> None:
    """`run` is the run's dataclass of counters (RunState here, FinetuneState for fine-tuning)."""
    tensors: dict[str, torch.Tensor] = {}
    for name, module in soft.items():
        for pname, param in module.named_parameters():
            tensors[f"{name}.{pname}"] = param
    state = optimizer.state_dict()["state"]
    for index, slots in state.items():
        for key, value in slots.items():
            tensors[f"adam.{index}.{key}"] = torch.as_tensor(value).reshape(-1) if key == "step" \
                else value
    atomic_save(tensors, path, asdict(run))


def read_run_state(path: Path) -> RunState:
    """The counters of the snapshot at `path` (the optimizer is built from them before loading it)."""
    return RunState(**read_metadata(path))


def load_snapshot(path: Path, soft: dict[str, nn.Module],
                  optimizer: torch.optim.Optimizer | None) -> None:
    """Restore the trained parameters and (unless None) the optimizer's state from `path`."""
    tensors = load_file(str(path))
    with torch.no_grad():
        for name, module in soft.items():
            for pname, param in module.named_parameters():
                param.copy_(tensors[f"{name}.{pname}"])
    if optimizer is None:
        return
    state = optimizer.state_dict()
    slots: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        if key.startswith("adam."):
            _, index, slot = key.split(".", 2)
            slots.setdefault(int(index), {})[slot] = value.reshape(()) if slot == "step" else value
    state["state"] = slots
    optimizer.load_state_dict(state)
