"""Trellis decode: packed tile bitstreams -> the rotated, scaled weight matrix.

Used where a dense weight is wanted: the decode-then-cuBLAS path for large batches, and tests.
It runs the fused matmul's kernel (trellis_kernels/matmul.py) in its DECODE mode: the same lanes, words
loaded a block ahead and shared-memory table lookups, storing each decoded block times the
scale instead of multiplying it. Its torch reference is
trellis_runtime.quantized.QuantizedWeight.decode_rotated; in float32 the kernel agrees with it
bit for bit.
"""

from __future__ import annotations

import torch
import triton

from trellis_kernels.launch import Launch
from trellis_kernels.matmul import DECODE, default_splits, kernel_launch, split_tiles
from trellis_kernels.trellis_code import (TILE_COLS, TILE_ROWS, TrellisCode, check_power_of_two,
                                          scale_tensor)

OUT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# Default (block_rows, block_cols, num_warps): 64 row pairs x 4 tiles, one lane per thread.
DECODE_BLOCKS = (128, 64, 8)


def decode_matrix(codes: torch.Tensor, code: TrellisCode, scale: float | torch.Tensor,
                  out: torch.Tensor | None = None, dtype: torch.dtype = torch.float32,
                  block_rows: int = DECODE_BLOCKS[0], block_cols: int = DECODE_BLOCKS[1],
                  num_warps: int = DECODE_BLOCKS[2], splits: int | None = None) -> torch.Tensor:
    """Decode packed tiles `codes` (rt, ct, 8K) int32 into the scaled (rt*16, ct*16) matrix.

    `out`, if given, must be a (rt*16, ct*16) tensor of one of OUT_DTYPES with unit column stride;
    otherwise one of `dtype` is allocated. float32 output is bit-exact with the torch reference;
    float16/bfloat16 output is that value rounded once. A program decodes block_rows rows over
    one of `splits` slices of the columns, block_cols at a time (default: enough slices to give
    every SM a few programs, 1 off the GPU).
    """
    launch, out = decode_launch(codes, code, scale, out, dtype, block_rows, block_cols,
                                num_warps, splits)
    if launch is not None:
        launch.run()
    return out


def decode_launch(codes: torch.Tensor, code: TrellisCode, scale: float | torch.Tensor,
                  out: torch.Tensor | None = None, dtype: torch.dtype = torch.float32,
                  block_rows: int = DECODE_BLOCKS[0], block_cols: int = DECODE_BLOCKS[1],
                  num_warps: int = DECODE_BLOCKS[2], splits: int | None = None
                  ) -> tuple[Launch | None, torch.Tensor]:
    """decode_matrix's launch (None for an empty matrix) and output, checked but not run."""
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
    if row_tiles * col_tiles == 0:
        return None, out
    block_tiles = block_cols // TILE_COLS
    if splits is None:
        splits = default_splits(shape[0], col_tiles, block_rows, block_tiles, codes.device)
    tiles_per_split = split_tiles(col_tiles, splits, block_tiles)
    grid = (triton.cdiv(shape[0], block_rows), triton.cdiv(col_tiles, tiles_per_split), 1)
    return kernel_launch(None, codes, code, out, grid, tiles_per_split, 1, block_rows // 2,
                         block_tiles, DECODE, num_warps, 2, scale=scale_t), out
