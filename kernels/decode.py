"""Trellis decode kernel: packed tile bitstreams -> the rotated, scaled weight matrix.

Used where a dense weight is wanted: the decode-then-cuBLAS path for large batches, and tests. The
code math lives in kernels/tile.py (shared with the fused matmul kernels). Its torch reference is
trellis_runtime.quantized.QuantizedWeight.decode_rotated; in float32 the kernel agrees with it bit
for bit.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.tile import (TILE_COLS, TILE_DIM, TILE_ROWS, TrellisCode, check_power_of_two,
                          decode_block, scale_tensor)

OUT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@triton.jit
def _decode_kernel(
    codes_ptr, table_ptr, scale_ptr, out_ptr,
    out_rows, col_tiles, out_stride, table_stride, fconst,
    STATE_BITS: tl.constexpr, BITS: tl.constexpr, VEC: tl.constexpr, CODE: tl.constexpr,
    MUL: tl.constexpr, ADD: tl.constexpr, AND_MASK: tl.constexpr, XOR_MASK: tl.constexpr,
    MEAN: tl.constexpr, HYB_INDEX_BITS: tl.constexpr,
    BLOCK_O: tl.constexpr, BLOCK_I: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_O + tl.arange(0, BLOCK_O)
    tile_col0 = tl.program_id(1) * (BLOCK_I // TILE_DIM)
    row_ok = rows < out_rows
    values = decode_block(codes_ptr, rows, row_ok, tile_col0, col_tiles, col_tiles,
                          table_ptr, table_stride, fconst, BLOCK_I, STATE_BITS, BITS, VEC, CODE,
                          MUL, ADD, AND_MASK, XOR_MASK, MEAN, HYB_INDEX_BITS)
    values = values * tl.load(scale_ptr)
    cols = tile_col0 * TILE_DIM + tl.arange(0, BLOCK_I)
    mask = row_ok[:, None] & (cols < col_tiles * TILE_DIM)[None, :]
    tl.store(out_ptr + rows[:, None].to(tl.int64) * out_stride + cols[None, :],
             values.to(out_ptr.dtype.element_ty), mask=mask)


def decode_matrix(codes: torch.Tensor, code: TrellisCode, scale: float | torch.Tensor,
                  out: torch.Tensor | None = None, dtype: torch.dtype = torch.float32,
                  block_rows: int = 32, block_cols: int = 64, num_warps: int = 4
                  ) -> torch.Tensor:
    """Decode packed tiles `codes` (rt, ct, 8K) int32 into the scaled (rt*16, ct*16) matrix.

    `out`, if given, must be a (rt*16, ct*16) tensor of one of OUT_DTYPES with unit column stride;
    otherwise one of `dtype` is allocated. float32 output is bit-exact with the torch reference;
    float16/bfloat16 output is that value rounded once.
    """
    code.check_codes(codes)
    for name, value in (("block_rows", block_rows), ("block_cols", block_cols)):
        check_power_of_two(name, value)
    if block_rows < TILE_ROWS or block_cols < TILE_COLS:
        raise ValueError(f"decode blocks must be at least {TILE_ROWS}x{TILE_COLS}")
    row_tiles, col_tiles, _ = codes.shape
    shape = (row_tiles * TILE_ROWS, col_tiles * TILE_COLS)
    if out is None:
        if dtype not in OUT_DTYPES:
            raise ValueError(f"decode output dtype must be one of {OUT_DTYPES}, got {dtype}")
        out = torch.empty(shape, dtype=dtype, device=codes.device)
    elif tuple(out.shape) != shape or out.dtype not in OUT_DTYPES or out.stride(1) != 1:
        raise ValueError(f"decode output must be {shape} float32/float16/bfloat16 with unit "
                         f"column stride, got {tuple(out.shape)} {out.dtype}")
    scale_t = scale_tensor(scale, codes.device)
    table, table_stride = code.table_args(codes.device, scale_t)
    if row_tiles * col_tiles == 0:
        return out
    grid = (triton.cdiv(shape[0], block_rows), triton.cdiv(shape[1], block_cols))
    _decode_kernel[grid](
        codes, table, scale_t, out, shape[0], col_tiles, out.stride(0), table_stride,
        code.fconst(), **code.constexprs(), BLOCK_O=block_rows, BLOCK_I=block_cols,
        num_warps=num_warps,
    )
    return out
