"""`trellis quantize --ray`: the groups of layers quantized as Ray tasks, in parallel.

Once a group's float Hessians exist, quantizing it needs nothing from the other groups (the
calibration activations pass through the float layers, never the quantized ones), so the driver
streams the float model once, collecting Hessians as qat.ptq does, and hands each group to a task
as soon as its Hessians are in: one GPU per task on CUDA, --threads CPUs per task on CPU. A task
reads its float weights itself, from the same source (every node must reach it), and returns the
group's packed tensors; the driver saves each group's file as qat.ptq does, so the run stays
resumable and the checkpoint is the single-process one, byte for byte.

A task whose worker dies (killed, out of memory, a lost node) is run again by Ray, up to
TASK_RETRIES times; an error raised by the quantization itself is not retried (it would fail the
same way) and fails the run.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

import ray
import torch
from tqdm import tqdm

from qat.ptq import GroupQuantizer, QuantizeOptions
from qat.sources import resolve_source, source_weights
from trellis_runtime.architecture import ModelShape

TASK_RETRIES = 3


@ray.remote(max_retries=TASK_RETRIES, retry_exceptions=False)
def quantize_group(source_name: str, config: dict, options: QuantizeOptions,
                   table: torch.Tensor | None, layers: list[int],
                   hessians: dict[str, torch.Tensor] | None, threads: int
                   ) -> dict[str, torch.Tensor]:
    """The packed tensors of `layers`, exactly as the single-process run makes them."""
    torch.set_num_threads(threads)
    weights = source_weights(resolve_source(source_name))
    quantizer = GroupQuantizer(weights, ModelShape.from_config(config), options, table)
    with tqdm(total=len(layers), disable=True) as progress:
        return quantizer(layers, hessians, progress)


class RayGroups:
    """Groups of layers submitted as tasks, collected as they finish."""

    def __init__(self, source_name: str, config: dict, options: QuantizeOptions,
                 table: torch.Tensor | None, threads: int) -> None:
        self.source_name = source_name
        self.config = config
        self.options = options
        self.table = table  # the run's starting table, made once by the driver
        self.threads = threads
        self.pending: dict[ray.ObjectRef, tuple[list[int], Path]] = {}

    def submit(self, layers: list[int], hessians: dict[str, torch.Tensor] | None,
               path: Path) -> None:
        resources = ({"num_gpus": 1, "num_cpus": 1} if self.options.device == "cuda"
                     else {"num_cpus": self.threads})
        task = quantize_group.options(**resources).remote(
            self.source_name, self.config, self.options, self.table, layers, hessians,
            self.threads)
        self.pending[task] = (layers, path)

    def finished(self) -> Iterator[tuple[list[int], Path, dict[str, torch.Tensor]]]:
        """(layers, their file, their tensors) of each task, in the order they finish."""
        while self.pending:
            [task], _ = ray.wait(list(self.pending), num_returns=1)
            layers, path = self.pending.pop(task)
            yield layers, path, ray.get(task)
