"""The code table (hyb, lut) of a quantized weight inside a training module.

Both trained linears (the soft trellis of BCJR-QAT and the frozen codes of fine-tuning) hold it the
same way: float32, as the Parameter `table` when it trains and as the buffer `frozen_table` when it
does not, so snapshots name it the same in both stages."""

from __future__ import annotations

import torch
from torch import nn

from trellis_runtime.quantized import QuantizedWeight


def hold_code_table(module: nn.Module, weight: QuantizedWeight, train: bool) -> None:
    """Give `module` the weight's table as `table` (trained) or `frozen_table` (the other is None)."""
    if train and weight.table is None:
        raise ValueError(f"code {weight.spec.code} has no table to train")
    table = None if weight.table is None else weight.table.to(torch.float32).clone()
    module.table = nn.Parameter(table) if train else None
    module.register_buffer("frozen_table", None if train else table)


def current_table(module: nn.Module) -> torch.Tensor | None:
    """The table a module holds (trained or frozen), None for computed codes."""
    return module.table if module.table is not None else module.frozen_table
