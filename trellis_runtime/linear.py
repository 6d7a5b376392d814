"""TrellisLinear: a linear layer whose weight is a QuantizedWeight, multiplied by a per-device backend.

The module keeps the packed weight (the one object every backend reads) and delegates the product to a
backend chosen once, in `select_backend`, for the device: on CUDA the Triton kernels multiply
straight from the codes; elsewhere the weight is decoded once into a dense matrix.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from trellis_runtime.quantized import QuantizedWeight

# The dtype activations and dense weights use on each device type. CPU uses float32: on the 2-core
# Sapphire Rapids (AMX) development machine, one token through SmolLM2-135M's 210 linears took 18-24 ms
# with float32 F.linear against 276 ms in bf16 (24 ms in fp16, 29 ms with oneDNN-packed bf16), so the
# halved bytes buy nothing and float32 keeps parity with the float reference. CUDA uses bf16,
# the dtype the checkpoint's dense tensors are stored in.
COMPUTE_DTYPES = {"cpu": torch.float32, "cuda": torch.bfloat16}


def compute_dtype(device: torch.device) -> torch.dtype:
    if device.type not in COMPUTE_DTYPES:
        raise ValueError(f"device type {device.type!r} is not supported: use one of "
                         f"{', '.join(COMPUTE_DTYPES)}")
    return COMPUTE_DTYPES[device.type]


class DecodedBackend(nn.Module):
    """Decode the weight once at load time, then multiply with F.linear.

    Costs the full dense matrix in memory (4 bytes a weight in float32, against 2 bits packed), but where
    no kernel reads the codes directly this is the fastest product: decoding per call would run the
    trellis reference for every token.
    """

    def __init__(self, weight: QuantizedWeight, device: torch.device, dtype: torch.dtype) -> None:
        super().__init__()
        dense = weight.dequantize().to(device=device, dtype=dtype).contiguous()
        self.register_buffer("dense", dense, persistent=False)

    @property
    def decoded_bytes(self) -> int:
        """Memory held beyond the packed codes, reported at model load."""
        return self.dense.numel() * self.dense.element_size()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.dense)


def select_backend(weight: QuantizedWeight, device: torch.device) -> nn.Module:
    """The backend for `device`: on CUDA the Triton kernels (trellis_runtime/kernel_linear.py), on CPU
    the C++ kernel for decode steps (trellis_runtime/cpu_linear.py), both reading the packed codes;
    without them, or for weights they refuse, the torch reference decode."""
    if device.type == "cpu":
        from trellis_runtime.cpu_linear import CpuKernelBackend, cpu_kernels_loaded

        if cpu_kernels_loaded():
            try:
                return CpuKernelBackend(weight)
            except ValueError:  # code values the kernel cannot hold exactly
                pass
    if device.type == "cuda":
        from trellis_runtime.kernel_linear import (KernelBackend, kernel_support_error,
                                                   kernels_available)

        if kernels_available() and kernel_support_error(weight) is None:
            return KernelBackend(weight, device, compute_dtype(device))
    return DecodedBackend(weight, device, compute_dtype(device))


class TrellisLinear(nn.Module):
    """y = x @ W^T for a trellis-quantized W (no bias: Llama-family linears have none)."""

    def __init__(self, weight: QuantizedWeight, device: str | torch.device = "cpu") -> None:
        super().__init__()
        self.quantized = weight
        self.out_features, self.in_features = weight.shape
        self.backend = select_backend(weight, torch.device(device))

    @property
    def decoded_bytes(self) -> int:
        return self.backend.decoded_bytes

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.backend.forward(x)  # no hooks on backends: skip nn.Module's call machinery

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"backend={type(self.backend).__name__}")
