"""TrellisLinear: a linear layer whose weight is a QuantizedWeight, multiplied by a per-device backend.

The module keeps the packed weight (the one object every backend reads) and delegates the product to a
backend chosen once, in `select_backend`, for the device. The three backends sit beside this file:
backend_triton.py (CUDA) and backend_cpu.py (C++) multiply straight from the codes; backend_dense.py
decodes the weight once into a dense matrix, wherever neither kernel applies.
"""

from __future__ import annotations

import torch
from torch import nn

from trellis_runtime.backend_dense import DenseBackend
from trellis_runtime.quantized import QuantizedWeight

# The dtype activations and dense weights use on each device type. CPU uses float32: measured over
# SmolLM2-135M's 210 linears, float32 F.linear was as fast as fp16 and an order of magnitude faster
# than bf16 (oneDNN-packed bf16 included), so the halved bytes buy nothing and float32 keeps parity
# with the float reference. CUDA uses bf16, the dtype the checkpoint's dense tensors are stored in.
COMPUTE_DTYPES = {"cpu": torch.float32, "cuda": torch.bfloat16}


def compute_dtype(device: torch.device) -> torch.dtype:
    if device.type not in COMPUTE_DTYPES:
        raise ValueError(f"device type {device.type!r} is not supported: use one of "
                         f"{', '.join(COMPUTE_DTYPES)}")
    return COMPUTE_DTYPES[device.type]


def select_backend(weight: QuantizedWeight, device: torch.device) -> nn.Module:
    """The backend for `device`: on CUDA the Triton kernels (trellis_runtime/backend_triton.py), on CPU
    the C++ kernel for decode steps (trellis_runtime/backend_cpu.py), both reading the packed codes;
    without them, or for weights they refuse, the dense decoded weight (backend_dense.py)."""
    if device.type == "cpu":
        from trellis_runtime.backend_cpu import CpuBackend, cpu_kernels_loaded

        if cpu_kernels_loaded():
            try:
                return CpuBackend(weight)
            except ValueError:  # code values the kernel cannot hold exactly
                pass
    if device.type == "cuda":
        from trellis_runtime.backend_triton import TritonBackend, kernels_available

        if kernels_available():
            try:
                return TritonBackend(weight, device, compute_dtype(device))
            except ValueError:  # a spec or dimension the kernels do not take (kernel_support_error)
                pass
    return DenseBackend(weight, device, compute_dtype(device))


class TrellisLinear(nn.Module):
    """y = x @ W^T (+ bias) for a trellis-quantized W; the bias, where a family has one (Qwen2's q/k/v),
    stays dense."""

    def __init__(self, weight: QuantizedWeight, device: str | torch.device = "cpu",
                 bias: torch.Tensor | None = None) -> None:
        super().__init__()
        self.quantized = weight
        self.out_features, self.in_features = weight.shape
        self.backend = select_backend(weight, torch.device(device))
        self.bias = bias

    @property
    def decoded_bytes(self) -> int:
        return self.backend.decoded_bytes

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.backend.forward(x)  # no hooks on backends: skip nn.Module's call machinery
        return y if self.bias is None else y + self.bias

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, backend={type(self.backend).__name__}")
