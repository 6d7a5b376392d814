"""A trainable linear whose weight is the BCJR soft reconstruction of a continuous latent.

The latent lives in the model's original basis ("pre-IP"): every forward rotates it with the
checkpoint's own sign vectors and Hadamard transforms, divides by the checkpoint's scale, and
replaces each 16x16 tile by its posterior-mean trellis reconstruction at temperature T. The result is
scaled, rotated back and used as a dense weight. Gradients reach the latent through the BCJR
(a Boltzmann expectation over trellis paths) and, optionally, reach the code table.

The scale stays at the PTQ value unless it is trained: recomputing it from the latent each step would rescale
the whole codeword sequence by ~1/sqrt(1 - MSE) and move every tile off the PTQ solution at step 0.
So hardening the untouched latent gives back exactly the PTQ codes. Training the scale (and the table)
is an option beyond the published recipe; both get real gradients through the soft reconstruction.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from qat.code_table import current_table, hold_code_table
from qat.soft_trellis import soft_reconstruct
from trellis_runtime.bitstream import pack_states
from trellis_runtime.codes import state_values
from trellis_runtime.hadamard import rotate_weight, unrotate_weight
from trellis_runtime.quantized import QuantizedWeight, matrix_to_tiles, tiles_to_matrix
from trellis_runtime.trellis import TILE_COLS, TILE_ROWS
from trellis_runtime.viterbi import encode


class SoftTrellisLinear(nn.Module):
    """y = x W^T with W the soft trellis reconstruction of `latent` (trainable, fp32)."""

    def __init__(self, weight: QuantizedWeight, train_table: bool = False,
                 train_scale: bool = False, bias: torch.Tensor | None = None) -> None:
        """bias: the layer's dense bias where its family has one (kept frozen, as the runtime keeps it)."""
        super().__init__()
        self.spec = weight.spec
        self.register_buffer("bias", None if bias is None else bias.detach().clone())
        self.ptq = weight
        self.latent = nn.Parameter(weight.dequantize())
        self.register_buffer("input_signs", weight.input_signs.clone())
        self.register_buffer("output_signs", weight.output_signs.clone())
        scale = weight.scale.to(torch.float32).clone()
        if train_scale:
            self.scale = nn.Parameter(scale)
        else:
            self.register_buffer("scale", scale)
        hold_code_table(self, weight, train_table)
        self.temperature = 1.0
        self.hard_weight: torch.Tensor | None = None  # set by use_hard() for evaluation

    def values(self) -> torch.Tensor:
        """Every state's reconstruction values (2^L, V), differentiable in a trained table."""
        return state_values(self.spec, current_table(self))

    def unit_tiles(self) -> torch.Tensor:
        """The latent in the rotated, unit-scaled basis, as trellis tiles (tiles, 256)."""
        rotated = rotate_weight(self.latent, self.input_signs, self.output_signs) / self.scale
        return matrix_to_tiles(rotated).flatten(0, 1)

    def soft_weight(self) -> torch.Tensor:
        tiles = soft_reconstruct(self.unit_tiles(), self.values(), self.spec, self.temperature)
        rows, cols = self.latent.shape[0] // TILE_ROWS, self.latent.shape[1] // TILE_COLS
        rotated = tiles_to_matrix(tiles.reshape(rows, cols, -1)) * self.scale
        return unrotate_weight(rotated, self.input_signs, self.output_signs)

    @torch.no_grad()
    def harden(self) -> QuantizedWeight:
        """Viterbi re-encoding of the latent: the packed weight a checkpoint stores."""
        table = current_table(self)
        table = None if table is None else table.detach().to(torch.float16)  # as it is stored
        states = encode(self.unit_tiles(), state_values(self.spec, table), self.spec)
        rows, cols = self.latent.shape[0] // TILE_ROWS, self.latent.shape[1] // TILE_COLS
        return QuantizedWeight(
            spec=self.spec, codes=pack_states(states.reshape(rows, cols, -1), self.spec),
            input_signs=self.ptq.input_signs, output_signs=self.ptq.output_signs,
            scale=self.scale.detach().clone(), table=table)

    def use_hard(self, weight: QuantizedWeight | None) -> None:
        """Evaluate with a hardened weight (or go back to the soft one with None)."""
        self.hard_weight = None if weight is None else weight.dequantize()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.hard_weight if self.hard_weight is not None else self.soft_weight()
        return F.linear(x, weight.to(x.dtype), None if self.bias is None else self.bias.to(x.dtype))

    def extra_repr(self) -> str:
        return f"shape={tuple(self.latent.shape)}, spec={self.spec}, T={self.temperature:.4g}"
