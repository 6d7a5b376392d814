"""A quantized linear whose trellis codes are frozen and whose continuous parts train.

The runtime computes y = diag(o) H_out^T (scale T) H_in diag(i) x, with T the tile values the codes
decode to, i and o the input and output vectors (±1 signs after quantization). With the codes fixed,
everything else is still continuous: the vectors, the scale and the code table. End-to-end
distillation (QuIP#'s and QTIP's fine-tuning stage) trains them against the float model, which is
what this module makes possible:

- the vectors become real numbers, initialised at the signs. A real output vector already holds any
  common factor, so the scalar scale stays frozen (training both would be one degree of freedom
  twice). The linears of one input group (q/k/v, gate/up) read the same rotated input, so they share
  one input-vector Parameter and the runtime still rotates their input once;
- the code table (hyb, lut) trains when asked: T is then re-decoded from it every forward.

The forward follows the runtime's own order (rotate the activations, multiply by the rotated tiles,
unrotate), so no (out, in) weight is rebuilt per step when the table is frozen.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from qat.code_table import current_table, hold_code_table
from trellis_runtime.bitstream import unpack_states
from trellis_runtime.codes import state_values
from trellis_runtime.hadamard import rotate, unrotate
from trellis_runtime.quantized import QuantizedWeight, tiles_to_matrix

VECTOR_DTYPE = torch.float16  # how trained vectors are stored (format 2)


class FrozenCodesLinear(nn.Module):
    """y = o * H^T (scale T) H (i * x) + bias, with the codes frozen and o, i (and the table) trained."""

    def __init__(self, weight: QuantizedWeight, input_vector: nn.Parameter,
                 bias: torch.Tensor | None = None, train_table: bool = False) -> None:
        """input_vector: the (possibly shared) input vector Parameter of this linear's input group."""
        super().__init__()
        if input_vector.shape != (weight.shape[1],):
            raise ValueError(f"input vector of shape {tuple(input_vector.shape)} for a weight of "
                             f"shape {weight.shape}")
        self.weight_spec, self.scale = weight.spec, weight.scale.to(torch.float32).clone()
        self.codes = weight.codes
        self.input_vector = input_vector
        self.output_vector = nn.Parameter(weight.output_signs.to(torch.float32).clone())
        self.register_buffer("bias", None if bias is None else bias.detach().clone())
        hold_code_table(self, weight, train_table)
        self.register_buffer("states", unpack_states(weight.codes, weight.spec))
        self.register_buffer("frozen_tiles", None if train_table else self.rotated_tiles().detach())

    def rotated_tiles(self) -> torch.Tensor:
        """scale T (out, in): the rotated matrix the codes decode to, differentiable in a trained table.

        Every state's values are computed once per call (2^L of them) and gathered by the codes:
        re-deriving each weight's table row from its state (HYB's hash, per weight) cost six times
        as much, forward and backward (about 5% of a fine-tuning step)."""
        per_state = state_values(self.weight_spec, current_table(self))  # (2^L, V)
        values = per_state[self.states]  # (rt, ct, steps, V)
        return tiles_to_matrix(values.flatten(2)) * self.scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tiles = self.frozen_tiles if self.frozen_tiles is not None else self.rotated_tiles()
        y = unrotate(F.linear(rotate(x, self.input_vector), tiles.to(x.dtype)), self.output_vector)
        return y if self.bias is None else y + self.bias.to(x.dtype)

    def export(self) -> QuantizedWeight:
        """The packed weight with the trained vectors and table in their stored dtypes."""
        table = current_table(self)
        return QuantizedWeight(
            spec=self.weight_spec, codes=self.codes,
            input_signs=self.input_vector.detach().to(VECTOR_DTYPE).clone(),
            output_signs=self.output_vector.detach().to(VECTOR_DTYPE).clone(), scale=self.scale,
            table=None if table is None else table.detach().to(torch.float16).clone())

    @torch.no_grad()
    def round_to_storage(self) -> None:
        """Round the trained parts to the dtypes a checkpoint stores, so scores are what serves."""
        for param in (self.input_vector, self.output_vector):
            param.copy_(param.to(VECTOR_DTYPE).to(param.dtype))
        if self.table is not None:
            self.table.copy_(self.table.to(torch.float16).to(self.table.dtype))
