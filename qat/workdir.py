"""The resumable-job directory both long jobs (quantize, qat) use: `.<out>.partial` beside the output,
holding files that are each written to a temporary name and renamed, so a kill never leaves a torn one."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors.torch import save_file


def work_dir(out: Path) -> Path:
    return out.parent / f".{out.name}.partial"


def atomic_save(tensors: dict[str, torch.Tensor], path: Path, metadata: dict | None = None) -> None:
    """Write tensors (and optional JSON metadata) to `path` atomically."""
    temporary = path.with_suffix(".tmp")
    # clone: tensors that share storage (linears sharing an input's sign vector) are refused by safetensors
    save_file({k: v.detach().contiguous().clone() for k, v in tensors.items()}, str(temporary),
              metadata=None if metadata is None else {"json": json.dumps(metadata)})
    os.replace(temporary, path)
