"""Packed codes repacked for tensor-core operands: lanes decode exactly the checkpoint's states, and
the emulated m16n8k16 MMAs over the fragments give the reference product."""

from __future__ import annotations

import pytest
import torch

from trellis_cli.kernel_suite import random_weight
from trellis_kernels.fragments import (a_fragments, b_operand, input_operand, lane_states,
                                       mma_m16n8k16, output_rows, repack)
from trellis_runtime.bitstream import unpack_states
from trellis_runtime.codes import code_values
from trellis_runtime.quantized import tiles_to_matrix
from trellis_runtime.trellis import TrellisSpec


@pytest.mark.parametrize("spec", [TrellisSpec(16, 2, 2, "hyb"), TrellisSpec(16, 3, 2, "hyb"),
                                  TrellisSpec(16, 4, 2, "hyb"), TrellisSpec(12, 2, 1, "1mad"),
                                  TrellisSpec(16, 3, 1, "3inst"), TrellisSpec(10, 4, 1, "lut")],
                         ids=str)
def test_lanes_decode_the_checkpoints_states(spec: TrellisSpec) -> None:
    """Any bitstream is a tail-biting path, so random words cover every window position."""
    codes = torch.randint(-2**31, 2**31, (3, 8, spec.words_per_tile), dtype=torch.int64,
                          generator=torch.Generator().manual_seed(spec.bits)).to(torch.int32)
    repacked = repack(codes, spec.bits)
    assert repacked.shape == (3, 2, 32, spec.bits)
    assert torch.equal(lane_states(repacked, spec.state_bits, spec.bits, spec.vec),
                       unpack_states(codes, spec))


def test_repack_refuses_rows_not_a_multiple_of_four_tiles() -> None:
    with pytest.raises(ValueError, match="multiple of 4"):
        repack(torch.zeros(2, 6, 16, dtype=torch.int32), 2)


@pytest.mark.parametrize("spec,batch", [(TrellisSpec(16, 2, 2, "hyb"), 1),
                                        (TrellisSpec(16, 2, 2, "hyb"), 8),
                                        (TrellisSpec(16, 4, 2, "hyb"), 5),
                                        (TrellisSpec(12, 2, 1, "1mad"), 3)], ids=str)
def test_emulated_mmas_over_the_fragments_give_the_product(spec: TrellisSpec, batch: int) -> None:
    """Two MMAs per tile, A holding the batch at both row parities: the tile's product with x,
    from the values the lanes decode (float16, as the tensor cores take them)."""
    weight = random_weight(spec, 32, 128, seed=spec.bits + batch, scale=1.0)
    states = lane_states(repack(weight.codes, spec.bits), spec.state_bits, spec.bits, spec.vec)
    values = tiles_to_matrix(code_values(spec, states, weight.table).flatten(2))
    assert torch.equal(values, weight.decode_rotated())
    matrix = values.half()  # exact for tables; computed codes round, as for any tl.dot
    x = torch.randn(batch, 128, generator=torch.Generator().manual_seed(9)).half()
    y = torch.zeros(batch, 32, dtype=torch.float64)
    for row_tile in range(2):
        for col_tile in range(8):
            tile = matrix[16 * row_tile:16 * row_tile + 16, 16 * col_tile:16 * col_tile + 16]
            x_tile = x[:, 16 * col_tile:16 * col_tile + 16]
            d = torch.zeros(32, 4, dtype=torch.float64)
            for mma in range(2):
                d = mma_m16n8k16(a_fragments(input_operand(x_tile, mma)), b_operand(tile, mma), d)
            y[:, 16 * row_tile:16 * row_tile + 16] += output_rows(d, batch)
    reference = x.double() @ matrix.double().T
    torch.testing.assert_close(y, reference, rtol=1e-12, atol=1e-12)
