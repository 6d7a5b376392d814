"""A quantized linear weight: packed trellis codes plus the rotation and scale that undo it.

The stored matrix is W_rot = H_out diag(output_signs) W diag(input_signs) H_in^T (see hadamard.py),
divided by one scale and cut into 16x16 tiles, each a 256-weight trellis sequence. The same object
serves every backend: the CPU path decodes it once to a dense tensor, GPU kernels read the codes.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from trellis_runtime.bitstream import unpack_states
from trellis_runtime.codes import code_values
from trellis_runtime.hadamard import unrotate_weight
from trellis_runtime.trellis import TILE_COLS, TILE_ROWS, TrellisSpec

TENSOR_SUFFIXES = ("codes", "input_signs", "output_signs", "scale", "code_table")


@dataclass
class QuantizedWeight:
    spec: TrellisSpec
    codes: torch.Tensor  # int32 (out/16, in/16, 8K): tiles row-major, one bitstream each
    # The input and output vectors: int8 +-1 signs from quantization, or float16 real numbers once
    # fine-tuned (checkpoint format 2). Either way W = diag(output) H^T W_rot H diag(input).
    input_signs: torch.Tensor  # (in,)
    output_signs: torch.Tensor  # (out,)
    scale: torch.Tensor  # float32 (1,): multiplies the unit-variance code values
    table: torch.Tensor | None  # float16 code table for hyb/lut, else None

    @property
    def shape(self) -> tuple[int, int]:
        return (self.output_signs.numel(), self.input_signs.numel())

    def decode_rotated(self) -> torch.Tensor:
        """The rotated, scaled reconstruction W_rot (out, in) in float32."""
        states = unpack_states(self.codes, self.spec)  # (rt, ct, steps)
        values = code_values(self.spec, states, self.table)  # (rt, ct, steps, V)
        return tiles_to_matrix(values.flatten(2)) * self.scale.to(torch.float32)

    def dequantize(self) -> torch.Tensor:
        """The dense weight W (out, in) in float32, in the model's original basis."""
        return unrotate_weight(self.decode_rotated(), self.input_signs, self.output_signs)

    def tensors(self, prefix: str) -> dict[str, torch.Tensor]:
        """The safetensors entries of this weight under module name `prefix`."""
        out = {f"{prefix}.codes": self.codes, f"{prefix}.input_signs": self.input_signs,
               f"{prefix}.output_signs": self.output_signs, f"{prefix}.scale": self.scale}
        if self.table is not None:
            out[f"{prefix}.code_table"] = self.table
        return out


def matrix_to_tiles(matrix: torch.Tensor) -> torch.Tensor:
    """(m, n) -> (m/16, n/16, 256): each 16x16 tile flattened row-major, the order a trellis walks."""
    m, n = matrix.shape
    tiles = matrix.reshape(m // TILE_ROWS, TILE_ROWS, n // TILE_COLS, TILE_COLS).permute(0, 2, 1, 3)
    return tiles.reshape(m // TILE_ROWS, n // TILE_COLS, TILE_ROWS * TILE_COLS)


def tiles_to_matrix(tiles: torch.Tensor) -> torch.Tensor:
    """The inverse of matrix_to_tiles: (m/16, n/16, 256) -> (m, n)."""
    row_tiles, col_tiles, _ = tiles.shape
    blocks = tiles.reshape(row_tiles, col_tiles, TILE_ROWS, TILE_COLS).permute(0, 2, 1, 3)
    return blocks.reshape(row_tiles * TILE_ROWS, col_tiles * TILE_COLS)


def tiles_to_codes_shape(out_features: int, in_features: int, spec: TrellisSpec
                         ) -> tuple[int, int, int]:
    return (out_features // TILE_ROWS, in_features // TILE_COLS, spec.words_per_tile)


def quantized_from_tensors(tensors: dict[str, torch.Tensor], prefix: str, spec: TrellisSpec
                           ) -> QuantizedWeight:
    """Rebuild a QuantizedWeight from entries written by `QuantizedWeight.tensors(prefix)`."""
    return QuantizedWeight(spec=spec, codes=tensors[f"{prefix}.codes"],
                           input_signs=tensors[f"{prefix}.input_signs"],
                           output_signs=tensors[f"{prefix}.output_signs"],
                           scale=tensors[f"{prefix}.scale"],
                           table=tensors.get(f"{prefix}.code_table"))
