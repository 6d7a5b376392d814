"""The Triton decode kernel against the torch reference (QuantizedWeight.decode_rotated), bit-exact.

Without a GPU, tests/conftest.py sets TRITON_INTERPRET=1 before anything imports triton, so the kernel
runs in Triton's interpreter on the CPU.
"""

from __future__ import annotations

import itertools

import pytest
import torch

from trellis_kernels import trellis_code
from trellis_kernels.decode import decode_matrix
from trellis_kernels.trellis_code import TrellisCode
from trellis_runtime import trellis
from trellis_runtime.codes import kernel_constants, table_shape
from trellis_runtime.errors import UnsupportedSpecError
from trellis_runtime.quantized import QuantizedWeight
from trellis_runtime.trellis import TrellisSpec

CONSTANTS = kernel_constants()  # the one definition lives in trellis_runtime/codes.py

SPECS = [
    (16, 2, 2, "hyb"), (12, 2, 2, "hyb"), (16, 2, 1, "1mad"), (16, 3, 1, "3inst"),
    (12, 4, 1, "1mad"), (10, 2, 2, "lut"), (9, 3, 1, "1mad"), (11, 1, 1, "lut"),
    (13, 1, 1, "3inst"), (8, 3, 2, "hyb"),
]


def _weight(spec: TrellisSpec, row_tiles: int, col_tiles: int, seed: int) -> QuantizedWeight:
    gen = torch.Generator().manual_seed(seed)
    codes = torch.randint(-2**31, 2**31, (row_tiles, col_tiles, spec.words_per_tile),
                          dtype=torch.int64, generator=gen).to(torch.int32)
    shape = table_shape(spec)
    table = None if shape is None else torch.randn(*shape, generator=gen).to(torch.float16)
    scale = (torch.rand(1, generator=gen) * 0.1 + 0.01).to(torch.float32)
    ones = lambda n: torch.ones(n, dtype=torch.int8)  # noqa: E731
    return QuantizedWeight(spec=spec, codes=codes, input_signs=ones(col_tiles * 16),
                           output_signs=ones(row_tiles * 16), scale=scale, table=table)


def test_kernels_cover_the_trellis_definition() -> None:
    """The kernels restate the trellis facts they cannot import (trellis_kernels imports nothing of
    the project): the tile, the code names and the V each code emits must be trellis_runtime's, the
    constants each code asks for must be ones codes.py hands over, and every spec the format
    accepts must be one the kernels accept."""
    assert (trellis_code.TILE_ROWS, trellis_code.TILE_COLS, trellis_code.TILE_DIM.value) == (
        trellis.TILE_ROWS, trellis.TILE_COLS, trellis.TILE_ROWS)
    assert tuple(trellis_code.CODE_IDS) == trellis.CODES
    assert trellis_code.SUPPORTED_VEC == trellis.SUPPORTED_VEC
    assert set().union(*trellis_code.REQUIRED_CONSTANTS.values()) <= set(CONSTANTS)
    accepted = 0
    for code, state_bits, bits in itertools.product(
            trellis.CODES, range(trellis.MIN_STATE_BITS, trellis.MAX_STATE_BITS + 1),
            range(1, trellis.MAX_BITS + 1)):
        for vec in trellis.SUPPORTED_VEC[code]:
            try:
                spec = TrellisSpec(state_bits, bits, vec, code)
            except UnsupportedSpecError:
                continue
            shape = table_shape(spec)
            table = None if shape is None else torch.zeros(shape, dtype=torch.float16)
            TrellisCode(state_bits, bits, vec, code, table, CONSTANTS)  # raises if refused
            accepted += 1
    assert accepted > 100  # the loop did run over the whole definition


@pytest.mark.parametrize("state_bits,bits,vec,code", SPECS)
def test_decode_kernel_matches_reference(state_bits: int, bits: int, vec: int, code: str) -> None:
    spec = TrellisSpec(state_bits=state_bits, bits=bits, vec=vec, code=code)
    weight = _weight(spec, 2, 3, seed=state_bits * 100 + bits * 10 + vec)  # 32x48 matrix
    expected = weight.decode_rotated()
    out = torch.full((32, 48), float("nan"), dtype=torch.float32)  # poisoned: catches gaps
    got = decode_matrix(weight.codes, TrellisCode(state_bits, bits, vec, code, weight.table,
                                                  CONSTANTS),
                        weight.scale, out=out, block_rows=32, block_cols=64)
    assert got is out
    assert not torch.isnan(got).any()
    assert torch.equal(got, expected)


def test_decode_kernel_partial_blocks_and_float_scale() -> None:
    """Several programs each way, the last ones partly masked (48x80 in 32x32 blocks); scale as a
    float."""
    spec = TrellisSpec(state_bits=16, bits=2, vec=1, code="1mad")
    weight = _weight(spec, 3, 5, seed=7)
    weight.scale = torch.tensor([0.03125], dtype=torch.float32)
    out = torch.full((48, 80), float("nan"), dtype=torch.float32)
    got = decode_matrix(weight.codes, TrellisCode(16, 2, 1, "1mad", None, CONSTANTS), 0.03125,
                        out=out, block_rows=32, block_cols=32)
    assert torch.equal(got, weight.decode_rotated())


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_decode_kernel_half_output_is_the_reference_rounded_once(dtype: torch.dtype) -> None:
    """The dense weight for decode-then-matmul comes out in the activation dtype directly.

    float16 is exact; Triton's interpreter truncates to bfloat16 where a GPU rounds, so bfloat16 is
    held to one unit in the last place.
    """
    spec = TrellisSpec(state_bits=12, bits=2, vec=2, code="hyb")
    weight = _weight(spec, 2, 2, seed=11)
    got = decode_matrix(weight.codes, TrellisCode(12, 2, 2, "hyb", weight.table, CONSTANTS),
                        weight.scale, dtype=dtype, block_rows=32, block_cols=32)
    assert got.dtype == dtype
    expected = weight.decode_rotated()
    if dtype == torch.float16:
        assert torch.equal(got, expected.to(dtype))
    else:
        torch.testing.assert_close(got.float(), expected, rtol=2**-7, atol=0)


@pytest.mark.parametrize("state_bits,bits,vec,code,kwargs", [
    (16, 2, 2, "1mad", {}),  # 1mad is scalar
    (16, 2, 1, "hyb", {}),  # hyb is 2-D
    (16, 5, 1, "1mad", {}),  # K too large
    (17, 2, 1, "1mad", {}),  # window would not fit the two-word read
    (8, 4, 2, "lut", {}),  # K*V >= L
    (16, 2, 2, "vq", {}),  # unknown code
    (10, 2, 2, "lut", {"table": None}),  # table code without its table
    (16, 2, 1, "3inst", {"constants": {}}),  # missing constants
])
def test_decode_kernel_rejects_unsupported(state_bits: int, bits: int, vec: int, code: str,
                                           kwargs: dict) -> None:
    table = kwargs.get("table", torch.zeros(1 << state_bits, vec, dtype=torch.float16)
                       if code == "lut" else None)
    with pytest.raises(ValueError):
        TrellisCode(state_bits, bits, vec, code, table, kwargs.get("constants", CONSTANTS))


@pytest.mark.parametrize("codes", [
    torch.zeros(1, 1, 16, dtype=torch.int64),  # not int32
    torch.zeros(1, 16, dtype=torch.int32),  # not (rt, ct, 8K)
    torch.zeros(1, 1, 24, dtype=torch.int32),  # 8K words for K=3, not K=2
    torch.zeros(1, 2, 32, dtype=torch.int32)[:, :, :16],  # not contiguous
])
def test_decode_kernel_rejects_bad_codes(codes: torch.Tensor) -> None:
    with pytest.raises(ValueError, match="codes must be"):
        decode_matrix(codes, TrellisCode(16, 2, 1, "1mad", None, CONSTANTS), 1.0)
