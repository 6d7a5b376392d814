"""The dense backend of TrellisLinear: the weight decoded once at load time, multiplied with F.linear.

The fallback wherever no kernel reads the codes (no Triton, no AVX-512, or a weight the kernels
refuse), and the reference the kernel backends are tested against.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from trellis_runtime.quantized import QuantizedWeight


class DenseBackend(nn.Module):
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
