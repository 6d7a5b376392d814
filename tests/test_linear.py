"""TrellisLinear computes x @ W^T for the dequantized W and reports what its dense copy costs."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from trellis_runtime.backend_cpu import CpuBackend, cpu_kernels_loaded
from trellis_runtime.backend_dense import DenseBackend
from trellis_runtime.checkpoint import load_checkpoint
from trellis_runtime.linear import TrellisLinear, compute_dtype


def test_forward_is_x_times_dequantized_transpose(tiny_checkpoint_dir: Path) -> None:
    weight = load_checkpoint(tiny_checkpoint_dir).quantized["model.layers.0.mlp.down_proj"]
    linear = TrellisLinear(weight, "cpu")
    assert (linear.out_features, linear.in_features) == (64, 192)
    # The C++ kernel for decode-sized batches where it is available (tests/test_kernels_cpu.py).
    assert isinstance(linear.backend, CpuBackend if cpu_kernels_loaded() else DenseBackend)
    x = torch.randn(5, 192, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(linear(x), x @ weight.dequantize().T)
    assert linear(x[0]).shape == (64,)  # any leading dims, as nn.Linear
    assert linear.decoded_bytes == 64 * 192 * 4


def test_unsupported_device_type() -> None:
    with pytest.raises(ValueError, match="device type 'meta' is not supported"):
        compute_dtype(torch.device("meta"))
